"""Inference cost, side by side in one run: each upstream, the fused teachers and the shipped students.

    python benchmarks/cost.py [--seconds 10] [--repeats 5] [--threads 2] [--json PATH] [--quick] [--no-onnx]

Every model is built at its real size from a config with random weights (nothing is downloaded;
weights do not change the cost). Rows, all on the same `--seconds` of audio:
- upstreams: WavLM Base+, HuBERT Base, Data2VecAudio Base on raw audio (`model(input_values)`),
  and the Whisper Small encoder on the 3000 mel frames (30 s padded window) it requires,
  log-mel extraction included;
- each teacher twice: `fused` = `FusedTeacher.targets([wave])` measured end to end (upstreams,
  log-mel, alignment, normalisation, CHConv projection and HConv interface output), and `sum` =
  the measured upstream rows plus a measured CHConv interface on the aligned features;
- the students shipped as presets, heads dropped: stock HubertModel (raw audio, conv front-end)
  and Wav2Vec2BertModel (`w2vbert_*`: log-mel Conformer), each with its preprocessing inside the
  timed forward (normalisation, or the torch log-mel filterbank), each followed by its ONNX
  export under ONNX Runtime (`<preset> onnx fp32`, and `<preset> onnx int8`: dynamic int8 MatMuls)
  on the same `--threads`, fed the same inputs (the filterbank runs in torch, outside the graph,
  inside the timed call). ONNX rows need the `onnx` extra; without it (or with `--no-onnx`) they
  are left out and the output says so. Every graph passes the fp32 parity check (students.onnx)
  before it is timed. `--quick` exports only the smallest preset of each family;
- the log-mel front-end alone: this package's torch filterbank and transformers' numpy
  SeamlessM4TFeatureExtractor (what a user of an exported folder runs without PyTorch).

The ratios are against the `fused` teachers (`sum` with --no-fused). The last stdout lines name
the best shipped student (the largest speedup among those >= 10x smaller than the 3-upstream
teacher) and the best log-mel student against the 100x goal. Progress goes to stderr. `--quick` builds tiny configs on 1 s of audio (for tests).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from distill.data.signals import speech_like
from distill.evaluation.cost import (Cost, CostJob, audio_encoder_job, cost_table, fused_teacher_job, log_mel_jobs,
                                    measure_jobs, onnx_student_job, ratios, student_job, sum_costs, whisper_encoder_job)
from students import PRESETS, build_student
from students.onnx import FP32_TOLERANCE, INT8_MIN_COSINE, check_parity, export_onnx, quantize_int8, require_onnx
from teachers import CHConv, FusedTeacher, wav2vec_num_frames
from teachers.configs import real_config, tiny_config

# Real sizes (teachers/configs.py), and tiny ones with the same frame grids for --quick.
_MEMBERS = {"WavLM Base+": "wavlm", "HuBERT Base": "hubert", "Data2VecAudio Base": "data2vec-audio",
            "Whisper Small enc": "whisper-small"}
REAL = {name: real_config(kind) for name, kind in _MEMBERS.items()}
TINY = {name: tiny_config(kind) for name, kind in _MEMBERS.items()}
TEACHERS = {
    "teacher2": ("WavLM Base+", "Whisper Small enc"),
    "teacher3": ("WavLM Base+", "HuBERT Base", "Whisper Small enc"),
}
HUBERT_SHIPPED = ("distilhubert", "hubert_2l_768_conv256", "hubert_4l_384_conv256", "hubert_2l_384_conv128")
LOG_MEL_SHIPPED = ("w2vbert_2l_384", "w2vbert_4l_192", "w2vbert_3l_112")
SHIPPED = HUBERT_SHIPPED + LOG_MEL_SHIPPED
TARGET_SPEEDUP, MIN_SIZE_RATIO = 15.0, 10.0
LOG_MEL_GOAL = 100.0  # issue 23: a log-mel student >= 100x faster than the 3-upstream teacher
NOISY = 1.5  # median/min latency above this: the machine was busy while we timed


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _wave(seconds: float) -> torch.Tensor:
    """A fixed speech-like test signal; cost does not depend on it."""
    return speech_like(seconds)


def _build(spec: dict) -> torch.nn.Module:
    kwargs = dict(spec)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    # Whisper: build the encoder alone, never the decoder with its 52k-token vocabulary.
    model = WhisperEncoder(config) if config.model_type == "whisper" else AutoModel.from_config(config)
    return model.eval()


def _width_depth(spec: dict) -> tuple[int, int]:
    if spec["model_type"] == "whisper":
        return spec["d_model"], spec["encoder_layers"] + 1
    config = AutoConfig.for_model(spec["model_type"], **{k: v for k, v in spec.items() if k != "model_type"})
    return config.hidden_size, config.num_hidden_layers + 1


def measure(args: argparse.Namespace) -> tuple[list[Cost], dict[str, str]]:
    """All rows, and the reference row name of each teacher.

    Everything is built first and then timed in ONE set of interleaved rounds, so teachers and
    students see the same machine load (see distill.evaluation.cost).
    """
    specs = TINY if args.quick else REAL
    wave = _wave(args.seconds)
    jobs: list[CostJob] = []
    for name, spec in specs.items():
        _log(f"building upstream {name} ...")
        model = _build(spec)
        whisper = spec["model_type"] == "whisper"
        jobs.append(whisper_encoder_job(name, model, wave, include_log_mel=True) if whisper else audio_encoder_job(name, model, wave))

    frames = wav2vec_num_frames(wave.numel())  # the teacher aligns to the student's frame grid
    sums: dict[str, list[str]] = {}
    for teacher, members in TEACHERS.items():
        dims, depths = zip(*(_width_depth(specs[m]) for m in members))
        proj_dim = max(dims)  # D_f = 768 at real size, as the recipes use
        chconv = CHConv(max(depths), dims, proj_dim).eval()
        features = torch.randn(max(depths), 1, frames, sum(dims))
        interface = f"CHConv {'+'.join(map(str, dims))}->{proj_dim}"
        jobs.append(CostJob(interface, partial(chconv, features), chconv, f"{max(depths)} layers x {frames} frames"))
        sums[teacher] = [*members, interface]
        if not args.no_fused:
            _log(f"building {teacher} (FusedTeacher) ...")
            jobs.append(fused_teacher_job(f"{teacher} fused", _fused_teacher([specs[m] for m in members], proj_dim), wave))

    onnx_presets = _onnx_presets(args)
    for preset in SHIPPED:
        torch.manual_seed(0)
        student = build_student(PRESETS[preset]()).eval()
        jobs.append(student_job(preset, student, wave, note=f"stock {type(student).__name__}"))
        if preset in onnx_presets:
            jobs.extend(_onnx_jobs(preset, student, wave, args))
    jobs.extend(log_mel_jobs(wave))  # the filterbank alone: included in the log-mel rows above

    _log(f"measuring {len(jobs)} models: FLOPs, then {args.warmup} warm-up + {args.repeats} timed rounds ...")
    measured = {c.name: c for c in measure_jobs(jobs, repeats=args.repeats, warmup=args.warmup, threads=args.threads)}
    rows, references = [], {}
    for name in specs:
        rows.append(measured.pop(name))
    for teacher, parts in sums.items():
        rows.append(measured.pop(parts[-1]))
        rows.append(sum_costs(f"{teacher} sum", [c for c in rows if c.name in parts]))
        references[teacher] = f"{teacher} sum"
        if not args.no_fused:
            rows.append(measured.pop(f"{teacher} fused"))
            references[teacher] = f"{teacher} fused"
    rows.extend(measured.values())  # the students in SHIPPED order, each followed by its ONNX rows
    return rows, references


def _onnx_presets(args: argparse.Namespace) -> tuple[str, ...]:
    if args.no_onnx:
        args.onnx_note = "ONNX rows: off (--no-onnx)"
        return ()
    try:
        require_onnx()
    except ImportError as err:
        args.onnx_note = f"ONNX rows: left out ({err})"
        return ()
    # --quick: one export per family keeps the smoke test short
    presets = (HUBERT_SHIPPED[-1], LOG_MEL_SHIPPED[-1]) if args.quick else SHIPPED
    args.onnx_note = (f"ONNX rows: ONNX Runtime on {args.threads} threads; int8 = dynamic int8 MatMul/Gemm "
                      "(onnxruntime.quantization), convolutions fp32; GFLOPs are the PyTorch model's")
    return presets


def _onnx_jobs(preset: str, student: torch.nn.Module, wave: torch.Tensor, args: argparse.Namespace) -> list[CostJob]:
    """fp32 and int8 graphs of `student`, each checked against PyTorch before it may be timed."""
    _log(f"exporting {preset} to ONNX (fp32, int8) ...")
    folder = Path(tempfile.mkdtemp(prefix=f"cost-onnx-{preset}-"))
    fp32 = export_onnx(student, folder / "model.onnx")
    int8 = quantize_int8(fp32, folder / "model_int8.onnx")
    probe = [wave[: min(wave.numel(), 16000)]]  # parity on 1 s: the graph is the one timed on `wave`
    checks = [check_parity(student, fp32, probe, source="benchmark signal", tolerance=FP32_TOLERANCE),
              check_parity(student, int8, probe, source="benchmark signal", min_cosine=INT8_MIN_COSINE)]
    if not checks[0].passed:
        raise RuntimeError(f"{preset}: {checks[0].summary()}; refusing to time a graph that is not the model")
    args.parity[preset] = [c.to_dict() for c in checks]
    return [onnx_student_job(f"{preset} onnx {precision}", path, wave, student, args.threads)
            for precision, path in (("fp32", fp32), ("int8", int8))]


def _fused_teacher(specs: list[dict], proj_dim: int) -> FusedTeacher:
    # The full fused model, as deployed for downstream use: CHConv projection AND the HConv
    # interface output (include_interface_output needs projection_fit=supervised). Its weights
    # would come from a supervised fit; their values do not change the cost, so the random-init
    # fusion is marked fitted instead of trained (as distill.inspect does for timing).
    teacher = FusedTeacher.from_config(
        {"upstreams": [{"config": s} for s in specs], "fusion": "chconv", "target_mode": "chconv",
         "projection_dim": proj_dim, "projection_fit": "supervised", "include_interface_output": True},
        progress=_log,
    )
    teacher.fitted = True
    return teacher


def best_student(rows: list[Cost], reference: Cost) -> tuple[Cost, bool]:
    """The shipped student with the largest speedup among those >= MIN_SIZE_RATIO smaller than
    `reference`; if none is that small, the fastest one (and False)."""
    students = [r for r in rows if r.name in SHIPPED]
    small = [s for s in students if ratios(s, reference)[1] >= MIN_SIZE_RATIO]
    pool = small or students
    return max(pool, key=lambda s: ratios(s, reference)[0]), bool(small)


def report(rows: list[Cost], references: dict[str, str], args: argparse.Namespace) -> dict:
    by_name = {r.name: r for r in rows}
    ref2, ref3 = by_name[references["teacher2"]], by_name[references["teacher3"]]
    how = "sum of measured upstreams + measured CHConv" if args.no_fused else "FusedTeacher.targets measured end to end"
    print(f"# Inference cost on {args.seconds:g} s of audio, {args.threads} CPU threads, fp32, "
          f"median of {args.repeats} after {args.warmup} warm-up{' (QUICK: tiny configs)' if args.quick else ''}")
    print("teacher2 = WavLM Base+ + Whisper Small; teacher3 = WavLM Base+ + HuBERT Base + Whisper Small")
    print("fused = FusedTeacher.targets end to end (CHConv, interface output on); "
          "sum = measured upstream rows + measured CHConv interface")
    print(f"ratios: against {ref2.name} and {ref3.name} ({how}); Whisper at its 30 s window, log-mel included")
    print(args.onnx_note)
    print("GFLOPs: matmul/conv/attention ops counted by torch FlopCounterMode (2 per multiply-add)")
    before, after = args.load
    print(f"machine: {os.cpu_count()} CPUs, 1-min load average {before:.1f} before / {after:.1f} after the run "
          f"(above ~{args.threads}, other processes shared the CPU and latencies are inflated)\n")
    print(cost_table(rows, [ref2.name, ref3.name]))
    print()
    for s in (r for r in rows if r.name in SHIPPED or r.name.rsplit(" onnx ", 1)[0] in SHIPPED):
        (speed2, size2), (speed3, size3) = ratios(s, ref2), ratios(s, ref3)
        print(f"{s.name}: {speed3:.3g}x faster and {size3:.3g}x smaller than teacher3; "
              f"{speed2:.3g}x faster and {size2:.3g}x smaller than teacher2")
    noisy = [r.name for r in rows if r.latencies_ms and r.latency_ms_median > NOISY * r.latency_ms_min]
    if noisy:
        print(f"warning: noisy timings (median > {NOISY:g}x min) for {', '.join(noisy)}; rerun on an idle machine")
    best, small_enough = best_student(rows, ref3)
    speed, size = ratios(best, ref3)
    if not small_enough:
        print(f"note: no shipped student is >= {MIN_SIZE_RATIO:g}x smaller than teacher3; naming the fastest")
    met = speed >= TARGET_SPEEDUP and size >= MIN_SIZE_RATIO
    print(f"target (>= {TARGET_SPEEDUP:g}x faster and >= {MIN_SIZE_RATIO:g}x smaller than teacher3): "
          f"{'met' if met else 'NOT met'} by {best.name} ({speed:.3g}x faster, {size:.3g}x smaller)")
    onnx_rows = [r for r in rows if r.name.startswith(f"{best.name} onnx ")]
    for row in onnx_rows:  # the same student deployed under ONNX Runtime, from the same rounds
        print(f"{row.name}: {ratios(row, ref3)[0]:.1f}x faster than teacher3, "
              f"{best.latency_ms_median / row.latency_ms_median:.2f}x the PyTorch fp32 speed")
    result_onnx = {r.name: ratios(r, ref3)[0] for r in onnx_rows}
    log_mel = max((r for r in rows if r.name in LOG_MEL_SHIPPED), key=lambda r: ratios(r, ref3)[0])
    log_mel_speed, log_mel_size = ratios(log_mel, ref3)
    filterbank = by_name.get("log-mel filterbank (torch)")
    fb_note = f"; its log-mel filterbank alone {filterbank.latency_ms_median:.1f} ms of {log_mel.latency_ms_median:.1f}" \
        if filterbank else ""
    print(f"best log-mel student: {log_mel.name}, {log_mel_speed:.1f}x faster and {log_mel_size:.1f}x smaller than "
          f"teacher3{fb_note}; goal >= {LOG_MEL_GOAL:g}x: {'met' if log_mel_speed >= LOG_MEL_GOAL else 'NOT met'}")
    for row in (r for r in rows if r.name.startswith(f"{log_mel.name} onnx ")):
        print(f"{row.name}: {ratios(row, ref3)[0]:.1f}x faster than teacher3")
    print(f"speedup vs 3-upstream teacher: {speed:.1f}x ({best.name})")
    return {
        "audio_seconds": args.seconds, "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
        "quick": args.quick, "torch": torch.__version__, "teacher_cost": how, "load_average": list(args.load),
        "references": references, "rows": [r.as_dict() for r in rows], "onnx": args.onnx_note,
        "onnx_parity": args.parity,
        "best": {"student": best.name, "speedup": speed, "size_ratio": size, "target_met": met,
                 "onnx_speedups": result_onnx},
        "best_log_mel": {"student": log_mel.name, "speedup": log_mel_speed, "size_ratio": log_mel_size,
                         "goal": LOG_MEL_GOAL, "goal_met": log_mel_speed >= LOG_MEL_GOAL,
                         "filterbank_ms": filterbank.latency_ms_median if filterbank else None},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=None, help="audio length (default 10; 1 with --quick)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds (median; 5 rides out the load swings of a shared CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every measurement")
    parser.add_argument("--no-fused", action="store_true", help="teachers as sums of parts only (no FusedTeacher run)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="tiny configs on 1 s of audio (smoke test)")
    parser.add_argument("--no-onnx", action="store_true", help="leave out the ONNX Runtime rows of the students")
    args = parser.parse_args(argv)
    args.seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 10.0)
    if args.seconds * 16000 > 2 * 1500 * 160:
        parser.error("--seconds must be <= 30: the Whisper rows cost one 30 s window")
    torch.set_num_threads(args.threads)
    args.parity = {}
    load_before = os.getloadavg()[0]
    rows, references = measure(args)
    args.load = (load_before, os.getloadavg()[0])
    result = report(rows, references, args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        _log(f"wrote {args.json}")


if __name__ == "__main__":
    from benchmarks import run_main

    sys.exit(run_main(main, "python -m benchmarks.cost"))
