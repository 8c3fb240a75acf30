"""The student as ONNX: export with the torch.onnx (dynamo) exporter, int8 with ONNX Runtime's
dynamic quantisation, and a parity check of every output against the PyTorch encoder.

Graph: the inputs of the HF model, computed outside the graph by the folder's feature extractor
(students.frontend: what `make_feature_extractor` writes and `encoder_inputs` reproduces):
- raw-waveform students: `input_values` (batch, samples) float32, normalised as
  Wav2Vec2FeatureExtractor does, and `attention_mask` (batch, samples) int64;
- log-mel students: `input_features` (batch, frames, 160) float32, the stacked filterbanks of
  SeamlessM4TFeatureExtractor, and `attention_mask` (batch, frames) int64. The filterbank is NOT
  in the graph: an ONNX user runs the folder's extractor (numpy), as for every HF speech model.
Outputs: `last_hidden_state` and `hidden_state_0` ... `hidden_state_L` (batch, frames, hidden),
the HF `hidden_states` tuple (0 = pre-transformer features). Batch and time are dynamic.

Why the dynamo exporter: on torch 2.13 the legacy TorchScript exporter (`dynamo=False`) traces
transformers' attention-mask code into constants and gives a graph that is off by ~3 (max abs)
on a tiny HuBERT even at the traced length (measured); the torch.export path matches to ~4e-6.
The parity check runs at every export so such a graph is refused, never shipped.

Needs the `onnx` extra (onnx, onnxscript, onnxruntime); every entry point says so in one line
when it is missing. Never imports `distill` or `teachers`.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from .frontend import encoder_inputs, input_names, is_log_mel, padding_invariant

__all__ = [
    "ONNX_FILE", "INT8_FILE", "PARITY_FILE", "INPUT_NAMES", "FP32_TOLERANCE", "INT8_MIN_COSINE", "ONNX_EXTRA_HINT",
    "OutputParity", "ParityReport", "ParityError", "require_onnx", "onnx_output_names", "export_onnx",
    "quantize_int8", "onnx_session", "run_onnx", "check_parity",
]

logger = logging.getLogger(__name__)

ONNX_FILE, INT8_FILE, PARITY_FILE = "model.onnx", "model_int8.onnx", "onnx_parity.json"
INPUT_NAMES = ("input_values", "attention_mask")  # raw-waveform students; log-mel: frontend.input_names
FP32_TOLERANCE = 1e-4  # max abs, every output: fp32 kernels differ in summation order only
INT8_MIN_COSINE = 0.99  # mean cosine, every output: below it int8 costs visible task score
ONNX_EXTRA_HINT = 'ONNX export needs the onnx extra: pip install -e ".[onnx]" (onnx, onnxscript, onnxruntime)'
_OPSET = 18
_SAMPLING_RATE = 16000


class ParityError(ValueError):
    """The exported graph does not reproduce the PyTorch encoder (a ValueError: the CLI prints one line)."""


def require_onnx() -> None:
    """Raise a one-line ImportError naming the extra when onnx, onnxscript or onnxruntime is missing."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"{ONNX_EXTRA_HINT}; missing: {', '.join(missing)}")


def onnx_output_names(num_hidden_layers: int) -> list[str]:
    """`last_hidden_state`, then one name per entry of HF's hidden_states (L + 1 of them)."""
    return ["last_hidden_state"] + [f"hidden_state_{i}" for i in range(num_hidden_layers + 1)]


class _AllOutputs(nn.Module):
    # ONNX graphs return flat tuples; this fixes the order onnx_output_names documents.
    def __init__(self, encoder: PreTrainedModel) -> None:
        super().__init__()
        self.encoder = encoder
        self.input_name = input_names(encoder)[0]

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(**{self.input_name: inputs}, attention_mask=attention_mask, output_hidden_states=True)
        return (out.last_hidden_state, *out.hidden_states)


def _reset_rotary_cache(encoder: nn.Module) -> None:
    # Wav2Vec2Bert's rotary embedding caches its table per sequence length in plain attributes:
    # traced, a cached table would become a constant of one length (and the trace would leave a
    # symbolic one behind in the eager model), so it is cleared before and after export.
    for module in encoder.modules():
        if hasattr(module, "cached_rotary_positional_embedding"):
            module.cached_sequence_length = None
            module.cached_rotary_positional_embedding = None


def export_onnx(encoder: PreTrainedModel, path: str | Path) -> Path:
    """Write `encoder` (fp32, eval mode) as an ONNX graph with dynamic batch and time axes."""
    require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training, dtype = encoder.training, next(encoder.parameters()).dtype
    encoder.eval().float()  # dropout off; a bf16 student ships an fp32 graph (CPU runtimes want fp32)
    # Batch 2 and a padded second row: torch.export specialises size-1 dims, and the mask path
    # must be traced as general code, not as "no padding".
    samples = 2 * _SAMPLING_RATE
    waves = torch.randn(2, samples, generator=torch.Generator().manual_seed(0))
    fed = encoder_inputs(encoder.config, waves, torch.tensor([samples, samples // 2]))
    names = input_names(encoder)
    example = tuple(fed.inputs[name] for name in names)
    batch = torch.export.Dim("batch", min=1, max=1024)
    if is_log_mel(encoder):  # one hour of 20 ms frames; the upper bound is only a guard
        time = torch.export.Dim("frames", min=2, max=50 * 3600)
    else:  # >= one receptive field (400 samples) gives >= 1 frame
        time = torch.export.Dim("samples", min=400, max=_SAMPLING_RATE * 3600)
    _reset_rotary_cache(encoder)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                _AllOutputs(encoder).eval(), example, dynamo=True, opset_version=_OPSET,
                input_names=list(names), output_names=onnx_output_names(encoder.config.num_hidden_layers),
                dynamic_shapes={"inputs": {0: batch, 1: time}, "attention_mask": {0: batch, 1: time}},
                verbose=False,
            )
            program.save(str(path))
    finally:
        _reset_rotary_cache(encoder)
        encoder.to(dtype).train(was_training)
    return path


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter for known-harmless cases (torchvision ops not registered,
    merged dynamic-axis names, empty attribute lists): a user of `export --onnx` should see the
    parity line, not a page of internals. Errors still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def quantize_int8(fp32_path: str | Path, int8_path: str | Path) -> Path:
    """Dynamic int8 quantisation (ONNX Runtime): int8 weights for MatMul and Gemm, activations
    quantised per call. Convolutions stay fp32: ONNX Runtime's ConvInteger kernels are slower
    on CPU than its fp32 convolutions, and the conv front-end is where the student's time goes."""
    require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    prepared = int8_path.with_name(int8_path.stem + ".pre.onnx")
    try:
        # The recommended pre-pass: shape inference and graph folding so every MatMul is found.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(prepared, int8_path, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)
    return int8_path


def onnx_session(path: str | Path, threads: int = 1) -> Any:
    """A CPU ONNX Runtime session with `threads` intra-op threads (and no inter-op pool)."""
    require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # ORT warns about every unused initialiser otherwise
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Run a session on its first input, already prepared (`input_values` (B, S) normalised, or
    `input_features` (B, T, 160)); a missing mask means no padding."""
    if attention_mask is None:
        attention_mask = torch.ones(inputs.shape[:2], dtype=torch.long)
    first, mask_name = (i.name for i in session.get_inputs())
    feeds = {first: inputs.float().cpu().numpy(), mask_name: attention_mask.long().cpu().numpy()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


@dataclass
class OutputParity:
    """One output against PyTorch over valid frames: max abs difference and mean per-frame cosine."""

    name: str
    max_abs: float
    mean_cosine: float


@dataclass
class ParityReport:
    """ONNX vs PyTorch on `lengths` (samples; one utterance per run, plus one zero-padded batch of
    all of them when the front-end is padding-invariant). `passed`: max_abs <= tolerance on every
    output (fp32) or mean cosine >= min_cosine on every output (int8)."""

    file: str
    source: str
    lengths: list[int]
    padded_batch: bool
    outputs: list[OutputParity] = field(default_factory=list)
    tolerance: float | None = None
    min_cosine: float | None = None

    @property
    def max_abs(self) -> float:
        return max(o.max_abs for o in self.outputs)

    @property
    def worst_cosine(self) -> float:
        return min(o.mean_cosine for o in self.outputs)

    @property
    def mean_cosine(self) -> float:
        return sum(o.mean_cosine for o in self.outputs) / len(self.outputs)

    @property
    def passed(self) -> bool:
        if self.tolerance is not None and self.max_abs > self.tolerance:
            return False
        return self.min_cosine is None or self.worst_cosine >= self.min_cosine

    def summary(self) -> str:
        """One line: what was compared and the worst figures."""
        return (f"{self.file}: max abs {self.max_abs:.2e}, mean cosine {self.mean_cosine:.5f} (worst output "
                f"{self.worst_cosine:.5f}) over {len(self.outputs)} outputs, {len(self.lengths)} utterances "
                f"({self.source})")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_abs": self.max_abs, "mean_cosine": self.mean_cosine,
                "worst_cosine": self.worst_cosine, "passed": self.passed}


def check_parity(
    encoder: PreTrainedModel,
    onnx_path: str | Path,
    waveforms: Sequence[torch.Tensor],
    *,
    source: str = "given waveforms",
    tolerance: float | None = None,
    min_cosine: float | None = None,
    threads: int = 1,
) -> ParityReport:
    """Compare every ONNX output with the PyTorch encoder's on raw 16 kHz `waveforms` (1-D each).

    Both get the inputs of `students.frontend.encoder_inputs`. Each waveform runs alone (no
    padding); for a layer-norm or log-mel front-end, whose output does not depend on zero padding
    under the attention mask, all of them also run as one padded batch, which exercises the mask
    path of the graph. Only valid frames are compared.
    """
    if not waveforms:
        raise ValueError("check_parity: no waveforms")
    session = onnx_session(onnx_path, threads)
    names = onnx_output_names(encoder.config.num_hidden_layers)
    graph_names = [o.name for o in session.get_outputs()]
    if graph_names != names:
        raise ParityError(f"{onnx_path}: outputs {graph_names}, expected {names}")
    param = next(encoder.parameters())
    padded = padding_invariant(encoder) and len(waveforms) > 1
    runs = [[w] for w in waveforms] + ([list(waveforms)] if padded else [])
    worst = {name: 0.0 for name in names}
    cos_sum, frames = {name: 0.0 for name in names}, 0
    was_training = encoder.training
    encoder.eval()
    try:
        for run in runs:
            lengths = torch.tensor([w.numel() for w in run])
            padded_waves = torch.zeros(len(run), int(lengths.max()))
            for b, w in enumerate(run):
                padded_waves[b, : w.numel()] = w.float()
            fed = encoder_inputs(encoder.config, padded_waves, lengths)
            inputs, mask = (fed.inputs[name] for name in input_names(encoder))
            with torch.no_grad():
                ref = _AllOutputs(encoder)(inputs.to(param.device, param.dtype), mask.to(param.device))
            got = run_onnx(session, inputs, mask)
            valid = fed.frame_lengths.tolist()
            for name, expected in zip(names, ref):
                expected = expected.float().cpu()
                actual = torch.from_numpy(got[name])
                for b, n in enumerate(valid):
                    e, a = expected[b, :n], actual[b, :n]
                    worst[name] = max(worst[name], float((e - a).abs().max()))
                    cos_sum[name] += float(torch.nn.functional.cosine_similarity(e, a, dim=-1).sum())
            frames += int(sum(valid))
    finally:
        encoder.train(was_training)
    outputs = [OutputParity(name, worst[name], cos_sum[name] / frames) for name in names]
    return ParityReport(Path(onnx_path).name, source, [int(w.numel()) for w in waveforms], padded, outputs,
                        tolerance, min_cosine)


def write_parity(folder: str | Path, reports: Sequence[ParityReport]) -> Path:
    """onnx_parity.json beside the graphs: what the model card quotes, machine-readable."""
    path = Path(folder) / PARITY_FILE
    path.write_text(json.dumps({r.file: r.to_dict() for r in reports}, indent=2) + "\n")
    return path
