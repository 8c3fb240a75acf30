"""Inference cost of upstreams, fused teachers and students: parameters, GFLOPs, CPU latency.

A `CostJob` is one thing to cost: a zero-argument `forward` plus the modules whose parameters
count. `measure_jobs` turns jobs into `Cost` rows: GFLOPs of ONE forward counted by
`torch.utils.flop_counter.FlopCounterMode`, and the median wall-clock latency of `repeats`
forwards after `warmup` untimed ones, under `torch.inference_mode` and, when `threads` is
given, `torch.set_num_threads(threads)`. Jobs are timed in interleaved rounds (each forward once
per round): on a shared CPU the load swings 2-3x for seconds at a time (measured here), and
timing models one after another would turn those swings into false speedups.

FLOPs: ops FlopCounterMode has formulas for (matmuls, convolutions, attention), a multiply-add
counted as 2. On CPU, SDPA runs a flash kernel torch has no formula for, so we add one (else
Whisper's 1500-frame attention counts as zero). FFTs (the Whisper log-mel), norms, activations,
softmax and interpolation are not counted.

Whisper: the encoder REQUIRES 2 * max_source_positions = 3000 mel frames (30 s padded), so its
cost at 10 s is that of a 30 s window; `include_log_mel` puts the HF log-mel extraction inside
the timed forward (off by default: it has no parameters and its FFTs are not counted; a
FusedTeacher always pays it).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from students import encoder_inputs, input_names, is_log_mel, log_mel_features, make_log_mel_extractor

__all__ = [
    "Cost", "CostJob", "count_params", "count_gflops", "time_forwards", "measure_jobs", "measure_cost", "sum_costs",
    "ratios", "cost_table", "audio_encoder_job", "whisper_encoder_job", "student_job", "fused_teacher_job",
    "onnx_student_job", "log_mel_jobs",
]

SAMPLING_RATE = 16000
ModuleOrParams = Union[nn.Module, Iterable[nn.Module], Iterable[nn.Parameter], int]


@dataclass(frozen=True)
class Cost:
    """One model's inference cost on one input: parameters of the modules that run, 1e9 FLOPs of
    one forward, the median of `latencies_ms` (one per round), and how the row was obtained."""

    name: str
    params: int
    gflops: float
    latency_ms_median: float
    latencies_ms: tuple[float, ...] = ()
    note: str = ""

    @property
    def latency_ms_min(self) -> float:
        return min(self.latencies_ms, default=self.latency_ms_median)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CostJob:
    """What to cost: `forward()` runs the model once on its input; `modules` hold its parameters."""

    name: str
    forward: Callable[[], Any]
    modules: ModuleOrParams
    note: str = ""
    # What FlopCounterMode runs instead of `forward` (None: `forward`): an ONNX Runtime call is
    # invisible to torch, so an ONNX row counts the PyTorch model it was exported from.
    flops_forward: Callable[[], Any] | None = None


def count_params(modules: ModuleOrParams) -> int:
    """Parameters of a module, several modules or parameters (shared tensors count once), or an int."""
    if isinstance(modules, int):
        return modules
    items = [modules] if isinstance(modules, (nn.Module, torch.Tensor)) else list(modules)
    unique = {}
    for item in items:
        for p in item.parameters() if isinstance(item, nn.Module) else [item]:
            unique[id(p)] = p.numel()
    return sum(unique.values())


def _cpu_flash_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Keyed by the overload packet: that is how FlopCounterMode looks formulas up.
_EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa_flops}


def count_gflops(forward: Callable[[], Any]) -> float:
    """GFLOPs of one call of `forward`.

    Under no_grad, not inference_mode: FlopCounterMode's module tracker hooks autograd and breaks
    on inference tensors when parameters require grad (the weight-norm convs of HF models).
    """
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS)
    with torch.no_grad(), counter:
        forward()
    return counter.get_total_flops() / 1e9


def time_forwards(forwards: Sequence[Callable[[], Any]], repeats: int = 3, warmup: int = 1) -> list[list[float]]:
    """Per forward, wall-clock ms of `repeats` calls, after `warmup` untimed rounds (allocator,
    oneDNN caches); calls are interleaved round by round so all forwards see the same load."""
    if repeats < 1:
        raise ValueError(f"time_forwards: repeats={repeats}, expected >= 1")
    times: list[list[float]] = [[] for _ in forwards]
    with torch.inference_mode():
        for _ in range(warmup):
            for forward in forwards:
                forward()
        for _ in range(repeats):
            for forward, spent in zip(forwards, times):
                start = time.perf_counter()
                forward()
                spent.append(1000 * (time.perf_counter() - start))
    return times


def measure_jobs(jobs: Sequence[CostJob], *, repeats: int = 3, warmup: int = 1, threads: int | None = None) -> list[Cost]:
    """One `Cost` per job, latencies from the same interleaved rounds (see the module docstring)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        gflops = [count_gflops(job.flops_forward or job.forward) for job in jobs]
        times = time_forwards([job.forward for job in jobs], repeats, warmup)
    finally:
        torch.set_num_threads(previous)
    return [Cost(job.name, count_params(job.modules), g, statistics.median(t), tuple(t), job.note)
            for job, g, t in zip(jobs, gflops, times)]


def measure_cost(name: str, forward: Callable[[], Any], modules: ModuleOrParams, *, note: str = "", **kwargs: Any) -> Cost:
    """Cost of one forward; kwargs (repeats, warmup, threads) go to measure_jobs."""
    return measure_jobs([CostJob(name, forward, modules, note)], **kwargs)[0]


def sum_costs(name: str, parts: Sequence[Cost], note: str = "") -> Cost:
    """A pipeline that runs `parts` one after another: params, GFLOPs and median latencies add."""
    note = note or "sum of " + " + ".join(p.name for p in parts)
    return Cost(name, sum(p.params for p in parts), sum(p.gflops for p in parts),
                sum(p.latency_ms_median for p in parts), (), note)


def ratios(cost: Cost, reference: Cost) -> tuple[float, float]:
    """(speedup, size ratio) of `cost` against `reference`: ref latency / latency, ref params / params."""
    return reference.latency_ms_median / cost.latency_ms_median, reference.params / max(cost.params, 1)


def cost_table(costs: Sequence[Cost], reference: Union[str, Sequence[str]]) -> str:
    """A markdown table: params (M), GFLOPs, median and min latency (ms), then speedup and size
    ratio against each named reference row (a name or a list of names present in `costs`)."""
    refs = [reference] if isinstance(reference, str) else list(reference)
    by_name = {c.name: c for c in costs}
    missing = [r for r in refs if r not in by_name]
    if missing:
        raise ValueError(f"cost_table: reference {missing} not among rows {list(by_name)}")
    header = ["model", "params (M)", "GFLOPs", "latency (ms)", "min (ms)"]
    for r in refs:
        header += [f"speedup vs {r}", f"size ratio vs {r}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for c in costs:
        row = [c.name, _num(c.params / 1e6), _num(c.gflops), _num(c.latency_ms_median),
               _num(c.latency_ms_min) if c.latencies_ms else "-"]
        for r in refs:
            speed, size = ratios(c, by_name[r])
            row += [f"{speed:.2f}x", f"{size:.2f}x"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _num(x: float) -> str:
    # Real-size rows read best as 94.4 / 1804.0; tiny test models still need significant digits.
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


# ---------------------------------------------------------------- what each kind of model is fed
def audio_encoder_job(name: str, model: nn.Module, wave: torch.Tensor, note: str = "raw audio") -> CostJob:
    """A wav2vec-family HF model (WavLM, HuBERT, Wav2Vec2, Data2VecAudio) on raw audio: model(input_values)."""
    if wave.dim() != 1:
        raise ValueError(f"audio_encoder_job {name}: expected one 1-D waveform, got shape {tuple(wave.shape)}")
    batch = wave[None].to(next(model.parameters()).dtype)
    return CostJob(name, lambda: model(batch), model, note)


def student_job(name: str, model: nn.Module, wave: torch.Tensor, note: str = "stock HF encoder") -> CostJob:
    """A shipped student (stock HubertModel/WavLMModel/Wav2Vec2Model/Wav2Vec2BertModel, heads
    dropped) on one waveform, its preprocessing (`students.encoder_inputs`: the normalisation, or
    the log-mel filterbank of a log-mel student) inside the timed forward."""
    if wave.dim() != 1:
        raise ValueError(f"student_job {name}: expected one 1-D waveform, got shape {tuple(wave.shape)}")
    dtype = next(model.parameters()).dtype
    batch, lengths = wave[None], torch.tensor([wave.numel()])

    def forward() -> Any:
        inputs = encoder_inputs(model, batch, lengths).inputs
        first = input_names(model)[0]
        return model(**{**inputs, first: inputs[first].to(dtype)})

    return CostJob(name, forward, model, note + (", log-mel filterbank included" if is_log_mel(model) else ""))


def log_mel_jobs(wave: torch.Tensor) -> list[CostJob]:
    """The log-mel front-end alone on one waveform: this package's torch filterbank (what training,
    evaluation and the cost rows of log-mel students run) and transformers' numpy
    SeamlessM4TFeatureExtractor (what an exported folder's user runs without PyTorch)."""
    batch, lengths = wave[None], torch.tensor([wave.numel()])
    extractor, audio = make_log_mel_extractor(), wave.numpy()
    return [
        CostJob("log-mel filterbank (torch)", lambda: log_mel_features(batch, lengths), 0, "students.log_mel_features"),
        CostJob("log-mel filterbank (numpy)", lambda: extractor(audio, sampling_rate=SAMPLING_RATE), 0,
                "SeamlessM4TFeatureExtractor"),
    ]


def whisper_encoder_job(name: str, model: nn.Module, wave: torch.Tensor, include_log_mel: bool = False) -> CostJob:
    """A Whisper encoder (or the encoder of a Whisper model) on one padded window of
    2 * max_source_positions mel frames (3000 = 30 s); longer audio would need several windows."""
    from transformers import WhisperFeatureExtractor

    get_encoder = getattr(model, "get_encoder", None)  # WhisperModel & co. cost only their encoder
    encoder = get_encoder() if callable(get_encoder) else model
    extractor = WhisperFeatureExtractor(feature_size=encoder.config.num_mel_bins)
    # Samples in one window: the encoder refuses any mel length but 2 * max_source_positions.
    window = 2 * encoder.config.max_source_positions * extractor.hop_length
    if wave.dim() != 1 or wave.numel() > window:
        raise ValueError(f"whisper_encoder_job: expected one 1-D waveform of <= {window} samples, got {tuple(wave.shape)}")
    dtype = next(encoder.parameters()).dtype

    def log_mel() -> torch.Tensor:
        out = extractor(wave.numpy(), sampling_rate=SAMPLING_RATE, padding="max_length", max_length=window, return_tensors="pt")
        return out.input_features.to(dtype)

    note = f"30 s padded window, {'incl.' if include_log_mel else 'excl.'} log-mel"
    if include_log_mel:
        return CostJob(name, lambda: encoder(log_mel()), encoder, note)
    mel = log_mel()
    return CostJob(name, lambda: encoder(mel), encoder, note)


def upstream_job(name: str, upstream: nn.Module, wave: torch.Tensor) -> CostJob:
    """An upstream that is not a transformers model (GE2E, a user's encoder): the whole
    `Upstream([wave])` call, its own front-end included."""
    return CostJob(name, lambda: upstream([wave]), upstream.model, "Upstream end to end, front-end incl.")


def fused_teacher_job(name: str, teacher: nn.Module, wave: torch.Tensor) -> CostJob:
    """A fitted FusedTeacher's `targets([wave])`: every upstream (Whisper with its log-mel and
    window), alignment, normalisation, projection and, when enabled, the interface output.
    Params: all upstreams plus the fusion weights."""
    if not getattr(teacher, "fitted", True):
        raise ValueError(f"fused_teacher_job {name}: the teacher is not fitted (fit_pca or from_pretrained first)")
    return CostJob(name, lambda: teacher.targets([wave]), teacher, "FusedTeacher.targets end to end")


def onnx_student_job(name: str, onnx_path: Any, wave: torch.Tensor, exported_from: nn.Module, threads: int,
                     note: str = "") -> CostJob:
    """An exported student graph (students.onnx) under ONNX Runtime on `threads` intra-op
    threads, fed what `student_job` feeds the PyTorch model; the preprocessing runs inside the
    timed call, in torch, as in `student_job` (the log-mel filterbank is not in the graph). Params
    and GFLOPs are those of `exported_from`, the PyTorch encoder the graph came from (an int8
    graph does the same multiply-adds in integers)."""
    from students.onnx import onnx_session, run_onnx

    if wave.dim() != 1:
        raise ValueError(f"onnx_student_job {name}: expected one 1-D waveform, got shape {tuple(wave.shape)}")
    batch, lengths = wave[None], torch.tensor([wave.numel()])
    first, mask = input_names(exported_from)
    session = onnx_session(onnx_path, threads)
    flops = student_job(name, exported_from, wave).forward

    def forward() -> Any:
        inputs = encoder_inputs(exported_from, batch, lengths).inputs
        return run_onnx(session, inputs[first], inputs[mask])

    return CostJob(name, forward, exported_from, note or f"ONNX Runtime, {threads} threads", flops_forward=flops)
