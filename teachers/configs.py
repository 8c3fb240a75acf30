"""Upstream geometries as `{"config": ...}` specs (random init, no download), one definition each.

REAL: the published sizes, for cost and throughput benchmarks. The wav2vec-family config
defaults ARE the base geometry (12 layers, 768 wide, 512x7 conv front-end); WavLM Base+ differs
from WavLM Base only in its training data. Whisper: only the encoder runs or counts, so every
Whisper config carries the same one-layer decoder stub with a 64-token vocabulary (the real
decoder and its 52k-token embedding would only slow the build).

TINY: 2-layer, 32-wide models with the real frame grids (wav2vec conv kernels and strides, the
30 s Whisper window), for tests and the benchmarks' --quick runs.
"""

from __future__ import annotations

__all__ = ["REAL", "TINY", "real_config", "tiny_config"]

_WHISPER_DECODER_STUB = dict(
    decoder_layers=1, decoder_ffn_dim=256, vocab_size=64, max_target_positions=64, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, decoder_start_token_id=1, num_mel_bins=80, max_source_positions=1500,
)

REAL: dict[str, dict] = {
    "wavlm": dict(model_type="wavlm"),
    "hubert": dict(model_type="hubert"),
    "wav2vec2": dict(model_type="wav2vec2"),
    "data2vec-audio": dict(model_type="data2vec-audio"),
    "whisper-base": dict(model_type="whisper", d_model=512, encoder_layers=6, encoder_attention_heads=8,
                         encoder_ffn_dim=2048, decoder_attention_heads=8, **_WHISPER_DECODER_STUB),
    "whisper-small": dict(model_type="whisper", d_model=768, encoder_layers=12, encoder_attention_heads=12,
                          encoder_ffn_dim=3072, decoder_attention_heads=12, **_WHISPER_DECODER_STUB),
}

_TINY_W2V = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16, 16, 16, 16, 16, 16),
    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, layerdrop=0.0,
)
_TINY_WHISPER = dict(model_type="whisper", d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                     **{**_WHISPER_DECODER_STUB, "decoder_ffn_dim": 64}, decoder_attention_heads=2)

TINY: dict[str, dict] = {
    "wavlm": dict(model_type="wavlm", **_TINY_W2V, num_buckets=16, max_bucket_distance=64),
    "hubert": dict(model_type="hubert", **_TINY_W2V),
    "wav2vec2": dict(model_type="wav2vec2", **_TINY_W2V),
    "data2vec-audio": dict(model_type="data2vec-audio", **{**_TINY_W2V, "num_conv_pos_embeddings": 5}),
    "whisper": _TINY_WHISPER,
    "whisper-base": _TINY_WHISPER,
    "whisper-small": _TINY_WHISPER,
}


def real_config(name: str, **overrides) -> dict:
    """A copy of REAL[name] with `overrides` (e.g. feat_extract_norm="layer")."""
    return {**REAL[name], **overrides}


def tiny_config(name: str, **overrides) -> dict:
    """A copy of TINY[name] with `overrides`."""
    return {**TINY[name], **overrides}
