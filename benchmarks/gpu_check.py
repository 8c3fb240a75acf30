"""GPU check at real sizes: teacher forward throughput, student training-step throughput and MFU.

    benchmarks/gpu_check.sh OUT_DIR            # or: python benchmarks/gpu_check.py OUT_DIR [options]

On CUDA, in bf16, with random weights built from configs (weights do not change the cost):
- teacher: WavLM Base+, HuBERT Base, the Whisper Small encoder (30 s windows) one by one, and the
  3-upstream FusedTeacher.targets end to end (CHConv projection to 768, PCA-fitted), on
  `--teacher-batch` utterances of `--seconds`: audio seconds per second, TFLOP/s, MFU;
- student: a shipped preset (default hubert_2l_768_conv256) plus prediction heads, one training
  step = distill.training.loop.loss_step under bf16 autocast (what Accelerate's mixed_precision=bf16
  does) + backward + AdamW, on `--student-batch` crops of `--crop-seconds`, targets copied from
  pinned host memory as a cache read would: audio s/s, TFLOP/s, MFU; and the same step with the
  online 3-upstream teacher, for the GPU's own online / cache ratio.

MFU = FLOPs counted by torch.utils.flop_counter (matmul/conv/attention, 2 per multiply-add;
forward + backward for the student) / median step time / the device's dense bf16 peak
(H100 SXM and H200: 989 TFLOP/s; override with PEAK_TFLOPS=...).

Without CUDA the same code runs once on tiny configs on the CPU (a smoke test of this script),
and results say "cuda: not available, GPU measurements skipped". Writes OUT_DIR/results.json and
OUT_DIR/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

try:  # the training step itself, not a copy of it: this needs the project's dependencies
    from distill.data.signals import speech_like
    from distill.evaluation.cost import count_gflops
    from distill.training.loop import loss_step
    from students import PRESETS, DistillStudent, PredictionHeads, build_student
    from teachers import FusedTeacher, wav2vec_num_frames
    from teachers.configs import real_config, tiny_config
except ImportError as err:  # a bare CUDA image: say what to install, not a traceback
    sys.exit(f"gpu_check: cannot import {err.name!r}; install the project first (pip install -e .), "
             "or on an offline machine its wheels: omegaconf antlr4-python3-runtime datasets dill multiprocess soundfile soxr")

SR = 16000
# Real sizes (teachers/configs.py), and tiny ones with the same frame grids off CUDA.
_MEMBERS = {"WavLM Base+": "wavlm", "HuBERT Base": "hubert", "Whisper Small enc": "whisper-small"}
REAL = {name: real_config(kind) for name, kind in _MEMBERS.items()}
TINY = {name: tiny_config(kind) for name, kind in _MEMBERS.items()}
# Dense bf16 tensor-core peaks (TFLOP/s), matched on substrings of torch.cuda.get_device_name, first match wins.
PEAKS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0))
SKIPPED = "cuda: not available, GPU measurements skipped"

# On CPU, SDPA runs a flash kernel FlopCounterMode has no formula for; count it like the CUDA ones.
_aten = torch.ops.aten
_CPU_SDPA = {
    _aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(grad, q, k, v),
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_tflops(device: torch.device) -> tuple[Optional[float], str]:
    """(peak dense bf16 TFLOP/s or None, where it came from)."""
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"]), "PEAK_TFLOPS"
    if device.type != "cuda":
        return None, "no peak for a CPU; set PEAK_TFLOPS for an MFU"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAKS:
        if key in name:
            return peak, f"table entry {key!r}"
    return None, f"unknown device {name!r}; set PEAK_TFLOPS"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds per call, after `warmup` untimed calls (cuDNN autotuning, allocator growth)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)  # kernels run asynchronously: wait before reading the clock
        times.append(time.perf_counter() - start)
    return times


def step_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call that may run a backward (FlopCounterMode counts both passes)."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)
    with counter:
        fn()
    return float(counter.get_total_flops())


def speech(batch: int, samples: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """(batch, samples) speech-like audio (distill/data/signals.py), one seed per row."""
    # +0.5 sample: the float seconds never round down to one sample short.
    return torch.stack([speech_like((samples + 0.5) / SR, seed + b, SR)[:samples] for b in range(batch)]).to(device)


def _row(name: str, seconds_each: list[float], audio_seconds: float, flops: float, peak: Optional[float], **extra) -> dict:
    median = statistics.median(seconds_each)
    tflops = flops / median / 1e12
    return {"name": name, "ms_median": 1000 * median, "ms_min": 1000 * min(seconds_each), "audio_s_per_s": audio_seconds / median,
            "gflops": flops / 1e9, "tflops_per_s": tflops, "mfu": tflops / peak if peak else None, **extra}


def make_teacher(specs: dict, projection_dim: int, device: torch.device, fit_wave: torch.Tensor) -> FusedTeacher:
    teacher = FusedTeacher.from_config(
        {"upstreams": [{"config": s} for s in specs.values()], "fusion": "chconv", "projection_dim": projection_dim,
         "projection_fit": "pca", "dtype": "bfloat16"}, progress=_log)
    teacher.to(device)
    teacher.fit_pca(list(fit_wave))  # random weights: any fitted projection costs the same
    return teacher


def measure_teacher(teacher: FusedTeacher, names: list[str], args, device, peak) -> list[dict]:
    waves = list(speech(args.teacher_batch, int(args.seconds * SR), device))
    audio = args.teacher_batch * args.seconds
    rows = []
    for name, upstream in zip(names, teacher.upstreams):
        _log(f"teacher: {name} ...")
        fn = lambda u=upstream: u(waves)  # noqa: E731
        rows.append(_row(name, time_call(fn, device, args.repeats, args.warmup), audio, 1e9 * count_gflops(fn), peak,
                         params_m=upstream.num_parameters() / 1e6))
    _log("teacher: fused (FusedTeacher.targets) ...")
    fn = lambda: teacher.targets(waves)  # noqa: E731
    params = sum(p.numel() for p in teacher.parameters()) / 1e6
    rows.append(_row("fused 3-up teacher", time_call(fn, device, args.repeats, args.warmup), audio, 1e9 * count_gflops(fn),
                     peak, params_m=params))
    return rows


def make_student(preset: str, teacher: FusedTeacher, device: torch.device, bf16: bool) -> DistillStudent:
    torch.manual_seed(0)
    config = PRESETS[preset]()
    heads = PredictionHeads(config.hidden_size, teacher.target_dim, len(teacher.target_layer_ids))
    student = DistillStudent(build_student(config), heads).to(device).train()
    # As Accelerate's mixed_precision=bf16 does: autocast around the prepared model's forward
    # only; the frozen teacher (never prepared) keeps its own dtype.
    student.forward = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)(student.forward)
    return student


def measure_student(teacher: FusedTeacher, args, device, peak, bf16: bool) -> list[dict]:
    student = make_student(args.student, teacher, device, bf16)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=device.type == "cuda")
    frames = int((args.crop_seconds * SR - 80) // 320)
    samples = 320 * frames + 80  # a padding-free, frame-aligned crop, as the train loader makes
    waves = speech(args.student_batch, samples, device, seed=1)
    lengths = torch.full((args.student_batch,), samples, device=device)
    assert wav2vec_num_frames(samples) == frames
    shape = (len(teacher.target_layer_ids), args.student_batch, frames, teacher.target_dim)
    cached = torch.randn(shape).half()  # a cache stores float16 ...
    cached = cached.pin_memory() if device.type == "cuda" else cached

    def step(online: bool) -> None:
        batch = {"waveforms": waves, "lengths": lengths}
        if not online:  # ... read to float32 and copied to the device inside the step
            batch["targets"] = cached.to(device, non_blocking=True).float()
        loss, _ = loss_step(student, teacher, batch, 1.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    audio = args.student_batch * samples / SR
    params = student.encoder.num_parameters() / 1e6
    rows = []
    for online, name in ((False, f"student {args.student} step (cached targets)"), (True, "student step, online 3-up teacher (FLOPs incl. teacher)")):
        _log(f"{name} ...")
        fn = lambda o=online: step(o)  # noqa: E731
        flops = step_flops(fn)
        rows.append(_row(name, time_call(fn, device, args.repeats, args.warmup), audio, flops, peak, params_m=params))
    return rows


def run(args: argparse.Namespace) -> dict:
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:  # the same code once, tiny, so the script itself is tested on any machine
        args.seconds, args.teacher_batch, args.student_batch, args.crop_seconds = 1.0, 2, 2, 0.5
        args.repeats, args.warmup, args.student = 1, 0, "tiny"
        # Tiny models gain nothing from threads, and on a busy CI machine OpenMP barriers stall.
        torch.set_num_threads(1)
    specs = REAL if cuda else TINY
    peak, peak_source = peak_tflops(device)
    _log(f"device: {device} {torch.cuda.get_device_name(device) if cuda else platform.processor() or 'cpu'}")
    teacher = make_teacher(specs, 768 if cuda else 32, device, speech(2, int(min(args.seconds, 4.0) * SR), device, seed=2))
    teacher_rows = measure_teacher(teacher, list(specs), args, device, peak)
    student_rows = measure_student(teacher, args, device, peak, bf16=True)
    cache_step, online_step = student_rows
    return {
        "cuda": "available" if cuda else SKIPPED,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (tiny-config smoke run)",
        "torch": torch.__version__, "dtype": "bfloat16", "sizes": "real" if cuda else "tiny",
        "peak_tflops": peak, "peak_source": peak_source,
        "settings": {k: getattr(args, k) for k in ("seconds", "teacher_batch", "student_batch", "crop_seconds",
                                                   "repeats", "warmup", "student")},
        "teacher": teacher_rows, "student": student_rows,
        "online_over_cache_step": online_step["ms_median"] / cache_step["ms_median"],
    }


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _num(x: float) -> str:
    # Real sizes read best as 94.4; the tiny smoke run still needs significant digits.
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# GPU check: {result['device']}", "", f"- {result['cuda']}",
             f"- torch {result['torch']}, {result['dtype']}, {result['sizes']} sizes, random weights",
             f"- peak bf16: {_fmt(result['peak_tflops'], '.0f')} TFLOP/s ({result['peak_source']})",
             f"- teacher: batch {s['teacher_batch']} x {s['seconds']:g} s; student: batch {s['student_batch']} x "
             f"{s['crop_seconds']:g} s crops; median of {s['repeats']} after {s['warmup']} warm-up", ""]
    for title, rows in (("Teacher forward", result["teacher"]), ("Student training step (fwd + bwd + AdamW)", result["student"])):
        lines += [f"## {title}", "", "| model | params (M) | ms | audio s / s | GFLOPs | TFLOP/s | MFU |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
            lines.append(f"| {r['name']} | {_num(r['params_m'])} | {_num(r['ms_median'])} | {_num(r['audio_s_per_s'])} | "
                         f"{_num(r['gflops'])} | {_num(r['tflops_per_s'])} | {mfu} |")
        lines.append("")
    lines.append(f"online 3-up step / cached step: {result['online_over_cache_step']:.2f}x")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seconds", type=float, default=10.0, help="teacher utterance length")
    parser.add_argument("--teacher-batch", type=int, default=8)
    parser.add_argument("--student-batch", type=int, default=24, help="per-device batch (the 3-upstream recipe's)")
    parser.add_argument("--crop-seconds", type=float, default=6.0, help="student crop length (the recipe's max_crop_seconds)")
    parser.add_argument("--student", default="hubert_2l_768_conv256", choices=sorted(PRESETS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="run the CPU smoke even where CUDA is available")
    args = parser.parse_args(argv)
    result = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "results.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    from benchmarks import run_main

    sys.exit(run_main(main, "python -m benchmarks.gpu_check"))
