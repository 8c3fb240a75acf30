"""Build the student encoder: a stock transformers config and model, optionally initialised
from an upstream of the same family (DistilHuBERT copies the CNN, projection, positional conv
and the first transformer layers from its teacher).

Architectures: `hubert`, `wavlm`, `wav2vec2` read raw audio through a conv front-end and share
the HuBERT presets; `wav2vec2_bert` (Wav2Vec2BertModel, a Conformer) reads log-mel features and
takes the `w2vbert_*` presets.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from transformers import (AutoModel, HubertConfig, PretrainedConfig, PreTrainedModel, Wav2Vec2BertConfig, Wav2Vec2Config,
                          WavLMConfig)

from .presets import PRESETS

__all__ = ["ARCHS", "build_student_config", "build_student", "init_from_upstream"]

ARCHS: dict[str, type[PretrainedConfig]] = {
    "hubert": HubertConfig, "wavlm": WavLMConfig, "wav2vec2": Wav2Vec2Config, "wav2vec2_bert": Wav2Vec2BertConfig,
}
LOG_MEL_ARCHS = ("wav2vec2_bert",)

# What a (Hubert-shaped) preset carries over to any of the three architectures.
_SHARED_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout",
    "activation_dropout",
    "attention_dropout",
    "feat_proj_dropout",
    "final_dropout",
    "layerdrop",
    "layer_norm_eps",
    "initializer_range",
    "feat_extract_norm",
    "feat_extract_activation",
    "conv_dim",
    "conv_stride",
    "conv_kernel",
    "conv_bias",
    "num_conv_pos_embeddings",
    "num_conv_pos_embedding_groups",
    "do_stable_layer_norm",
    "apply_spec_augment",
    "mask_time_prob",
    "mask_time_length",
    "mask_feature_prob",
    "mask_feature_length",
)
# Hubert-only switches: WavLM and Wav2Vec2 always layer-norm the feature projection and have no
# batch-norm positional conv, so these are dropped when a preset is mapped onto them.
_HUBERT_ONLY_FIELDS = ("feat_proj_layer_norm", "conv_pos_batch_norm")

# Without a preset the stock (base-size) config is used, with the same two distillation
# defaults as the presets: no layerdrop, no SpecAugment masking of the inputs to be matched
# (and so no masked_spec_embed parameter).
_DISTILL_DEFAULTS = {"layerdrop": 0.0, "apply_spec_augment": False, "mask_time_prob": 0.0}
# The stock Wav2Vec2BertConfig is the 600M w2v-BERT 2.0 with relative_key positions; a student
# without a preset keeps its shape but takes rotary positions (relative_key is slow on long inputs).
_LOG_MEL_DEFAULTS = {**_DISTILL_DEFAULTS, "position_embeddings_type": "rotary"}

# Modules copied by init_from_upstream, before the first `num_layers` encoder layers.
_FRONT_END_MODULES = ("feature_extractor", "feature_projection", "encoder.pos_conv_embed", "encoder.layer_norm")


def build_student_config(arch: str = "hubert", preset: str | None = None, **overrides: Any) -> PretrainedConfig:
    """A stock HubertConfig / WavLMConfig / Wav2Vec2Config / Wav2Vec2BertConfig for the student.

    Args:
        arch: "hubert", "wavlm", "wav2vec2" (raw audio) or "wav2vec2_bert" (log-mel features).
        preset: a name from `students.presets.PRESETS` of the arch's family; None starts from
            the stock config.
        overrides: config fields (the recipe's `student:` keys); None values are ignored so a
            recipe's unset optional fields can be passed straight through.
    """
    if arch not in ARCHS:
        raise ValueError(f"student.arch={arch!r}: expected one of {', '.join(ARCHS)}")
    config_class = ARCHS[arch]
    if preset is None:
        values = dict(_LOG_MEL_DEFAULTS if arch in LOG_MEL_ARCHS else _DISTILL_DEFAULTS)
    else:
        values = _preset_values(preset, arch)
    overrides = {key: _plain(value) for key, value in overrides.items() if value is not None}
    known = {f.name for f in fields(config_class)}
    for key in overrides:
        # Configs accept unknown kwargs silently; a typo would build the wrong model.
        if key not in known:
            raise ValueError(f"student.{key}: not a {config_class.__name__} field")
    values.update(overrides)
    _check_conv_dim(values, config_class)
    config = config_class(**values)
    _check_config(config)
    return config


def build_student(config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised stock encoder (HubertModel, WavLMModel, Wav2Vec2Model or Wav2Vec2BertModel)."""
    return AutoModel.from_config(config)


def init_from_upstream(student: PreTrainedModel, upstream: PreTrainedModel, num_layers: int | None = None) -> list[str]:
    """Copy the front-end and the first `num_layers` transformer layers from `upstream`.

    Copied: feature_extractor, feature_projection, encoder.pos_conv_embed, encoder.layer_norm and
    encoder.layers[:num_layers] (default: all student layers), by module, not by renamed keys.
    Every state-dict key and shape must match (the same family and widths); nothing is copied
    unless all match. Task models (e.g. HubertForCTC) are accepted through their base model.

    Returns:
        The copied state-dict names, as they appear in `student.state_dict()`.
    """
    for role, model in (("student", student), ("upstream", upstream)):
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"init_from_upstream: {role} must be a transformers PreTrainedModel, got {type(model).__name__}")
    dst_model, src_model = student.base_model, upstream.base_model
    num_layers = dst_model.config.num_hidden_layers if num_layers is None else num_layers
    pairs = _module_pairs(dst_model, src_model, num_layers)
    for name, dst, src in pairs:
        _check_same_state(name, dst, src)
    prefix = "" if dst_model is student else f"{student.base_model_prefix}."
    copied = []
    with torch.no_grad():
        for name, dst, src in pairs:
            src_state = src.state_dict()
            # state_dict() tensors share storage with the parameters, so copy_ writes into them.
            for key, tensor in dst.state_dict().items():
                tensor.copy_(src_state[key])
                copied.append(f"{prefix}{name}.{key}")
    return copied


def _preset_values(preset: str, arch: str) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"student.preset={preset!r}: expected one of {', '.join(PRESETS)}")
    config = PRESETS[preset]()
    log_mel_preset = isinstance(config, Wav2Vec2BertConfig)
    if log_mel_preset != (arch in LOG_MEL_ARCHS):
        family = "wav2vec2_bert" if log_mel_preset else "hubert, wavlm or wav2vec2"
        raise ValueError(f"student.preset={preset!r} is a {family} preset; student.arch={arch!r} does not take it")
    if log_mel_preset:
        # Only the overridden fields differ from the stock config, so to_diff_dict carries the preset.
        return {key: _plain(value) for key, value in config.to_diff_dict().items() if key in config.to_dict()
                and key not in ("model_type", "transformers_version")}
    names = _SHARED_FIELDS + (_HUBERT_ONLY_FIELDS if arch == "hubert" else ())
    return {name: _plain(getattr(config, name)) for name in names}


def _plain(value: Any) -> Any:
    # Configs serialise sequences as lists; normalising here keeps tuples and lists comparable.
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_conv_dim(values: dict[str, Any], config_class: type[PretrainedConfig]) -> None:
    # Checked before the config is built: its own check raises a multi-line message.
    conv_dim = values.get("conv_dim")
    if conv_dim is None:
        return
    expected = len(values.get("conv_kernel", config_class.conv_kernel))
    if len(conv_dim) != expected:
        raise ValueError(
            f"student.conv_dim has {len(conv_dim)} entries, expected {expected} (one per conv layer; "
            "the kernels/strides fix the frame grid)"
        )


def _check_config(config: PretrainedConfig) -> None:
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"student.hidden_size={config.hidden_size} is not divisible by "
            f"student.num_attention_heads={config.num_attention_heads}"
        )
    if getattr(config, "feat_extract_norm", "layer") not in ("group", "layer"):
        raise ValueError(f"student.feat_extract_norm={config.feat_extract_norm!r}: expected group or layer")


def _module_pairs(dst: PreTrainedModel, src: PreTrainedModel, num_layers: int) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
    # Front-end lookups come first: a model outside the wav2vec family fails with the clearest message.
    pairs = [(name, _submodule(dst, name, "student"), _submodule(src, name, "upstream")) for name in _FRONT_END_MODULES]
    src_layers = src.config.num_hidden_layers
    if not 0 <= num_layers <= min(dst.config.num_hidden_layers, src_layers):
        raise ValueError(
            f"init_from_upstream: num_layers={num_layers}, but the student has {dst.config.num_hidden_layers} "
            f"and the upstream {src_layers} transformer layers"
        )
    # Stable (pre-) layer norm puts the same keys in different places in the computation.
    if dst.config.do_stable_layer_norm != src.config.do_stable_layer_norm:
        raise ValueError("init_from_upstream: do_stable_layer_norm differs between student and upstream")
    layers = [f"encoder.layers.{i}" for i in range(num_layers)]
    return pairs + [(name, _submodule(dst, name, "student"), _submodule(src, name, "upstream")) for name in layers]


def _submodule(model: PreTrainedModel, name: str, role: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"init_from_upstream: {role} {type(model).__name__} has no module {name!r} (needs a wav2vec-family model)"
        ) from None


def _check_same_state(name: str, dst: torch.nn.Module, src: torch.nn.Module) -> None:
    dst_state, src_state = dst.state_dict(), src.state_dict()
    for key in list(dst_state) + [k for k in src_state if k not in dst_state]:
        a, b = dst_state.get(key), src_state.get(key)
        if a is None or b is None or a.shape != b.shape:
            shape_a = "missing" if a is None else tuple(a.shape)
            shape_b = "missing" if b is None else tuple(b.shape)
            raise ValueError(f"init_from_upstream: {name}.{key}: student {shape_a} vs upstream {shape_b}")
