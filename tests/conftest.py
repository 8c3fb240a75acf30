"""Shared fixtures: tiny random-init upstream models built from configs, saved locally.

Nothing here downloads anything: every model is built from a config, written with
`save_pretrained`, and loaded back from the folder by the code under test.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from threads, and on shared cores extra threads cost 10-50x.
torch.set_num_threads(1)

# A thin wav2vec-style conv front-end with the standard kernels/strides, so the
# frame grid is the real one (320-sample hop, 400-sample receptive field).
_W2V_COMMON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(16, 16, 16, 16, 16, 16, 16),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    layerdrop=0.0,
)

TINY_CONFIGS: dict[str, dict] = {
    "wavlm": dict(model_type="wavlm", **_W2V_COMMON, num_buckets=16, max_bucket_distance=64),
    "hubert": dict(model_type="hubert", **_W2V_COMMON),
    "wav2vec2": dict(model_type="wav2vec2", **_W2V_COMMON),
    "data2vec-audio": dict(model_type="data2vec-audio", **{**_W2V_COMMON, "num_conv_pos_embeddings": 5}),
    "whisper": dict(
        model_type="whisper",
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=64,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    ),
}


def tiny_config(kind: str, **overrides) -> dict:
    """A `{"config": {...}}` upstream spec for a tiny random-init model."""
    return {"config": {**TINY_CONFIGS[kind], **overrides}}


def _save_tiny(kind: str, folder) -> str:
    from transformers import AutoConfig, AutoModel

    cfg = dict(TINY_CONFIGS[kind])
    model_type = cfg.pop("model_type")
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model(model_type, **cfg))
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_upstream_dirs(tmp_path_factory) -> dict[str, str]:
    """Local folders of tiny saved upstreams, keyed by model type."""
    root = tmp_path_factory.mktemp("upstreams")
    return {kind: _save_tiny(kind, root / kind) for kind in TINY_CONFIGS}


def make_wave(seconds: float, seed: int = 0, sr: int = 16000) -> torch.Tensor:
    """A deterministic speech-like test signal: harmonics with a slow envelope plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 110 + 40 * rng.random()
    sig = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t + rng.random())
    sig = sig * env + 0.05 * rng.standard_normal(t.shape)
    return torch.from_numpy((0.3 * sig / np.abs(sig).max()).astype(np.float32))


@pytest.fixture
def wave():
    return make_wave
