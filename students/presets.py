"""Named student shapes: zero-argument functions that return a stock HF config.

Two families:
- raw-waveform students (`HubertConfig`; `build_student_config` maps the same fields onto WavLM
  or Wav2Vec2 when the recipe asks for those architectures): a 7-layer conv front-end reads the
  16 kHz samples;
- log-mel students (`Wav2Vec2BertConfig`, `student.arch: wav2vec2_bert`, names `w2vbert_*`): a
  Conformer over 80-band filterbanks stacked by two (students/logmel.py). The filterbank costs
  a few ms per 10 s where the conv front-end costs most of a small HuBERT's time.

A recipe names one of these (`student.preset`) plus a few overrides.

Every HuBERT preset keeps the wav2vec conv kernels/strides, so the frame grid is the standard one
(400-sample receptive field, 320-sample hop: 49 frames for 1.0 s at 16 kHz), which is the grid
the teacher aligns its targets to; the log-mel students' stacked 20 ms frames land on the same
grid (students/logmel.py).

Defaults that differ from the stock configs, all for distillation:
- `layerdrop=0.0`: a dropped layer would make the per-layer targets meaningless.
- `apply_spec_augment=False`: the student is trained in train mode without a `mask_time_indices`
  argument, so HF would otherwise mask random spans of the features it must reproduce.
  Fine-tuners turn it back on with `from_pretrained(..., apply_spec_augment=True)`.
- `mask_time_prob=0.0`: otherwise HF creates a `masked_spec_embed` parameter that distillation
  never uses (it would stay random and make DDP search for unused parameters every step).

Log-mel presets also use rotary positions: the stock `relative_key` builds a frames x frames x
head-width tensor per layer (2 x 384 on 10 s: 69.7 ms with it, 26.4 ms rotary, DESIGN.md).

CPU timings below: 2 threads, 10 s of audio, fp32 (see DESIGN.md, "Facts measured";
benchmarks/README.md for the log-mel rows).
"""

from __future__ import annotations

from typing import Callable

from transformers import HubertConfig, PretrainedConfig, Wav2Vec2BertConfig

__all__ = [
    "PRESETS",
    "distilhubert",
    "hubert_2l_768_conv256",
    "hubert_4l_384_conv256",
    "hubert_2l_384_conv128",
    "tiny",
    "w2vbert_2l_384",
    "w2vbert_4l_192",
    "w2vbert_3l_112",
    "w2vbert_tiny",
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


def _w2vbert(num_hidden_layers: int, hidden_size: int, num_attention_heads: int, intermediate_size: int,
             conv_depthwise_kernel_size: int, **extra) -> Wav2Vec2BertConfig:
    return Wav2Vec2BertConfig(
        num_hidden_layers=num_hidden_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,  # each Conformer layer has two FFNs (macaron) of this width
        conv_depthwise_kernel_size=conv_depthwise_kernel_size,
        feature_projection_input_dim=160,  # 80 mel bands x 2 stacked frames (students/logmel.py)
        position_embeddings_type="rotary",
        layerdrop=0.0,
        apply_spec_augment=False,
        mask_time_prob=0.0,
        **extra,
    )


def w2vbert_2l_384() -> Wav2Vec2BertConfig:
    """Log-mel Conformer, 2 layers, hidden 384, 6 heads, FFN 768 (x2), depthwise kernel 15.

    4.5M params, the size class of `hubert_2l_384_conv128`; 60 ms per 10 s on CPU, filterbank
    included, against 127 ms for that HuBERT (one run of benchmarks/cost.py, 2 threads).
    """
    return _w2vbert(2, 384, 6, 768, 15)


def w2vbert_4l_192() -> Wav2Vec2BertConfig:
    """Log-mel Conformer, 4 layers, hidden 192, 4 heads, FFN 384 (x2), depthwise kernel 15.

    About 2.3M params: twice the depth of `w2vbert_2l_384` at half its size, for the per-layer
    targets (a deeper student has more layers to map onto the teacher's); 48 ms per 10 s.
    """
    return _w2vbert(4, 192, 4, 384, 15)


def w2vbert_3l_112() -> Wav2Vec2BertConfig:
    """Log-mel Conformer, 3 layers, hidden 112, 2 heads, FFN 128 (x2), depthwise kernel 15.

    0.47M params, the size of the mini benchmark's 3 x 112 HuBERT student (conv48), for quality
    comparisons at equal parameters (FFN 128: a Conformer layer has two FFNs and a conv module).
    38 ms per 10 s (80x faster than the 3-upstream teacher), 23 ms under ONNX Runtime (133x).
    """
    return _w2vbert(3, 112, 2, 128, 15)


def w2vbert_tiny() -> Wav2Vec2BertConfig:
    """For tests: 2 layers, hidden 32, 2 heads, FFN 32, depthwise kernel 3; not meant to learn."""
    return _w2vbert(2, 32, 2, 32, 3)


PRESETS: dict[str, Callable[[], PretrainedConfig]] = {
    "distilhubert": distilhubert,
    "hubert_2l_768_conv256": hubert_2l_768_conv256,
    "hubert_4l_384_conv256": hubert_4l_384_conv256,
    "hubert_2l_384_conv128": hubert_2l_384_conv128,
    "tiny": tiny,
    "w2vbert_2l_384": w2vbert_2l_384,
    "w2vbert_4l_192": w2vbert_4l_192,
    "w2vbert_3l_112": w2vbert_3l_112,
    "w2vbert_tiny": w2vbert_tiny,
}
