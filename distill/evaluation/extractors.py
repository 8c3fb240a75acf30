"""Feature extractors for probes: (waveforms (B, S) zero-padded, sample lengths (B,)) ->
(features (L, B, T, D), frame lengths (B,)), for a stock HF encoder, an exported ONNX graph and
the fused teacher. The encoders run item by item, unpadded: group-norm front-ends change under
zero padding even with an attention mask. Log-mel students (Wav2Vec2BertModel) get their
filterbanks from `students.log_mel_features`, as in training.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from students import is_log_mel, log_mel_features, normalize_waveforms
from teachers import FusedTeacher
from teachers.upstream import _wants_normalised

__all__ = ["Extractor", "hf_encoder_extractor", "onnx_extractor", "teacher_extractor", "wants_normalised"]

# (waveforms (B, S) zero-padded, sample lengths (B,)) -> (features (L, B, T, D), frame lengths (B,))
Extractor = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def hf_encoder_extractor(model: nn.Module, normalize: Optional[bool] = None) -> Extractor:
    """All hidden states (L + 1, B, T, D) of a stock HF wav2vec-family encoder (AutoModel).

    Items run one by one, unpadded: group-norm front-ends change under zero padding even with an
    attention mask. normalize: zero-mean/unit-variance per utterance as
    Wav2Vec2FeatureExtractor does; None follows `do_normalize` of the preprocessor_config.json in
    the folder the model was loaded from, else `feat_extract_norm == "layer"` (`wants_normalised`,
    the teachers' rule); log-mel models (`normalize` does not apply) get their filterbanks. The
    model runs in eval mode; its mode is restored afterwards.
    """
    log_mel = is_log_mel(model)
    wants_norm = not log_mel and (wants_normalised(model) if normalize is None else bool(normalize))

    def extract(waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if wants_norm:
            waveforms = normalize_waveforms(waveforms, lengths)[0]
        items = [waveforms[b, : int(n)] for b, n in enumerate(lengths.tolist())]
        states = _run_unpadded(model, [_log_mel(w) for w in items] if log_mel else items)
        return _stack_padded(states)

    return extract


def onnx_extractor(model: Union[str, "os.PathLike[str]", Any], normalize: bool = True, threads: int = 1) -> Extractor:
    """All hidden states (L + 1, B, T, D) of an exported student's ONNX graph (students.onnx:
    `model.onnx` or `model_int8.onnx`, a path or an onnxruntime InferenceSession), so a probe
    scores exactly what ships under ONNX Runtime.

    As `hf_encoder_extractor`: items run one by one, unpadded, normalised per utterance when
    `normalize` (the folder's preprocessor_config.json `do_normalize`; True for every export), or
    turned into log-mel features when the graph takes `input_features` (a log-mel student).
    Features come back as float32 CPU tensors.
    """
    from students.onnx import onnx_session, run_onnx

    session = model if hasattr(model, "run") else onnx_session(model, threads)
    names = [o.name for o in session.get_outputs() if o.name.startswith("hidden_state_")]
    if not names:
        raise ValueError("onnx_extractor: the graph has no hidden_state_* outputs; export it with students.onnx")
    names.sort(key=lambda name: int(name.rsplit("_", 1)[1]))  # hidden_state_10 after hidden_state_9

    log_mel = session.get_inputs()[0].name == "input_features"

    def extract(waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if normalize and not log_mel:
            waveforms = normalize_waveforms(waveforms, lengths)[0]
        states = []
        for b, n in enumerate(lengths.tolist()):
            item = waveforms[b: b + 1, : int(n)].float().cpu()
            outputs = run_onnx(session, _log_mel(item[0])[None] if log_mel else item)
            states.append(torch.stack([torch.from_numpy(outputs[name][0]) for name in names]))  # (L + 1, T, D)
        return _stack_padded(states)

    return extract


def _stack_padded(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item hidden states (L + 1, T_b, D) -> zero-padded (L + 1, B, T, D) and frame lengths (B,)."""
    frames = torch.tensor([s.shape[1] for s in states], dtype=torch.long)
    out = states[0].new_zeros(states[0].shape[0], len(states), int(frames.max()), states[0].shape[-1])
    for b, s in enumerate(states):
        out[:, b, : s.shape[1]] = s
    return out, frames


def teacher_extractor(teacher: FusedTeacher, project: bool = True) -> Extractor:
    """The fused teacher's per-layer features: Z = `teacher.project(features)` (L, B, T, D_f) (the
    fitted projection, or the concatenation / average by target mode), or with `project=False` the
    aligned, normalised concatenation (L, B, T, sum D_i), to fit the projection as a `transform`."""
    if project and not teacher.fitted:
        raise ValueError("teacher_extractor: the teacher's projection is not fitted; fit it or use project=False")

    def extract(waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            features, frames = teacher.features(waveforms, lengths=lengths)
            return (teacher.project(features) if project else features), frames

    return extract


def _log_mel(wave: torch.Tensor) -> torch.Tensor:
    # One unpadded item -> (T, 160): every frame valid, so no mask is needed.
    return log_mel_features(wave[None].float(), torch.tensor([wave.numel()]))[0][0]


def _run_unpadded(model: nn.Module, items: list[torch.Tensor]) -> list[torch.Tensor]:
    # items: unpadded waveforms (S,) or log-mel features (T, 160), the model's first input.
    param, was_training = next(model.parameters()), model.training
    model.eval()  # dropout, layerdrop and SpecAugment would make the features random
    try:
        with torch.no_grad():
            outputs = (model(x[None].to(param.device, param.dtype), output_hidden_states=True) for x in items)
            return [torch.stack(out.hidden_states)[:, 0].float() for out in outputs]
    finally:
        model.train(was_training)


def wants_normalised(model: nn.Module) -> bool:
    """Whether a loaded HF encoder expects zero-mean unit-variance audio: the rule the teachers'
    upstreams use (the preprocessor config of the folder / hub id it was loaded from, else
    `feat_extract_norm == "layer"`)."""
    config = getattr(model, "config", None)
    source = str(getattr(config, "_name_or_path", "") or "") or None
    return _wants_normalised(config, source)
