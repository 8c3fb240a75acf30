"""Named student shapes: zero-argument functions that return a stock `HubertConfig`.

A recipe names one of these (`student.preset`) plus a few overrides; `build_student_config`
maps the same fields onto WavLM or Wav2Vec2 when the recipe asks for those architectures.

Every preset keeps the wav2vec conv kernels/strides, so the frame grid is the standard one
(400-sample receptive field, 320-sample hop: 49 frames for 1.0 s at 16 kHz), which is the grid
the teacher aligns its targets to.

Two defaults differ from the stock config, both for distillation:
- `layerdrop=0.0`: a dropped layer would make the per-layer targets meaningless.
- `apply_spec_augment=False`: the student is trained in train mode without a `mask_time_indices`
  argument, so HF would otherwise mask random spans of the features it must reproduce.
  Fine-tuners turn it back on with `from_pretrained(..., apply_spec_augment=True)`.
- `mask_time_prob=0.0`: otherwise HF creates a `masked_spec_embed` parameter that distillation
  never uses (it would stay random and make DDP search for unused parameters every step).

CPU timings below: 2 threads, 10 s of audio, fp32 (see DESIGN.md, "Facts measured").
"""

from __future__ import annotations

from typing import Callable

from transformers import HubertConfig

__all__ = [
    "PRESETS",
    "distilhubert",
    "hubert_2l_768_conv256",
    "hubert_4l_384_conv256",
    "hubert_2l_384_conv128",
    "tiny",
]

# wav2vec 2.0 front-end geometry: keep it, or the student's frames stop lining up with the targets.
_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)


def _hubert(
    num_hidden_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    intermediate_size: int,
    conv_channels: int,
    feat_extract_norm: str,
    **extra,
) -> HubertConfig:
    return HubertConfig(
        num_hidden_layers=num_hidden_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        conv_dim=(conv_channels,) * len(_CONV_KERNEL),
        conv_kernel=_CONV_KERNEL,
        conv_stride=_CONV_STRIDE,
        feat_extract_norm=feat_extract_norm,
        layerdrop=0.0,
        apply_spec_augment=False,
        mask_time_prob=0.0,
        **extra,
    )


def distilhubert() -> HubertConfig:
    """DistilHuBERT's shape: 2 layers, hidden 768, 12 heads, FFN 3072, 512x7 group-norm conv.

    23.5M params; ~824 ms per 10 s on CPU, 77% of it in the 512-channel conv front-end.
    Group norm is not batch-invariant under zero padding: train it on equal-length crops.
    Like the released DistilHuBERT, the feature projection has no layer norm.
    """
    return _hubert(2, 768, 12, 3072, 512, "group", feat_proj_layer_norm=False)


def hubert_2l_768_conv256() -> HubertConfig:
    """2 layers, hidden 768, 12 heads, FFN 3072, 256x7 layer-norm conv.

    20.2M params; ~400 ms per 10 s on CPU (half of DistilHuBERT's time at 86% of its size).
    """
    return _hubert(2, 768, 12, 3072, 256, "layer")


def hubert_4l_384_conv256() -> HubertConfig:
    """4 layers, hidden 384, 6 heads, FFN 1536, 256x7 layer-norm conv.

    9.4M params; ~313 ms per 10 s on CPU: deeper but narrower than DistilHuBERT.
    """
    return _hubert(4, 384, 6, 1536, 256, "layer")


def hubert_2l_384_conv128() -> HubertConfig:
    """2 layers, hidden 384, 6 heads, FFN 1536, 128x7 layer-norm conv.

    5.0M params; ~145 ms per 10 s on CPU, the cheapest preset meant for real use.
    """
    return _hubert(2, 384, 6, 1536, 128, "layer")


def tiny() -> HubertConfig:
    """For the offline CPU demo and tests: 2 layers, hidden 32, 2 heads, FFN 64, 16x7 conv.

    Layer-norm front-end; positional conv of width 16 in 2 groups (the base models use 128/16,
    far wider than a 32-dim model needs). About 0.03M params; not meant to learn anything useful.
    """
    return _hubert(2, 32, 2, 64, 16, "layer", num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)


PRESETS: dict[str, Callable[[], HubertConfig]] = {
    "distilhubert": distilhubert,
    "hubert_2l_768_conv256": hubert_2l_768_conv256,
    "hubert_4l_384_conv256": hubert_4l_384_conv256,
    "hubert_2l_384_conv128": hubert_2l_384_conv128,
    "tiny": tiny,
}
