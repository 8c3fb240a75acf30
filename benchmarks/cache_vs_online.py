"""Training step time from the target cache vs with the online teacher, 1 and 3 upstreams, side by side.

    python benchmarks/cache_vs_online.py [--steps 8] [--warmup 1] [--batch-size 4] [--crop-seconds 2]
                                         [--threads 2] [--json PATH] [--quick]

One step = what the training loop does per batch: `distill.training.loop.loss_step` (student forward and,
online, the teacher's forward on the crops; from the cache, `TargetCache.add_targets` reading the
crops' targets from the safetensors shards), backward, AdamW step. Both teachers are built from
configs with random weights at real size (weights do not change the cost): 1-up = WavLM Base+;
3-up = WavLM Base+ + HuBERT Base + the Whisper Base encoder (its 30 s window, as the teacher
runs it). CHConv projection to 768 (PCA on two utterances), three target layers, student preset
hubert_2l_384_conv128. The corpus is synthesised speech-like audio written to a temporary
folder; each teacher caches it with `cache_targets` first (not timed). All four set-ups then
step through the SAME batches in interleaved rounds, so they share the machine's load.

Prints a table and `cache 3-up / cache 1-up: <r>` (goal <= 1.1: from the cache, step cost does
not grow with the number of upstreams) and `online 3-up / cache 3-up: <r>x` (goal >= 5).
`--quick` uses tiny configs and one timed step (for tests; its ratios mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from distill.build import build_distill_student, build_teacher
from distill.cache.writer import TargetCache, cache_targets
from distill.config import DataConfig, LossConfig, RecipeConfig, StudentConfig, TeacherConfig, TrainingConfig
from distill.data.loader import load_audio_dataset, make_train_dataloader
from distill.data.signals import speech_like
from distill.training.loop import loss_step
from teachers.configs import real_config, tiny_config

SR = 16000
# Real sizes (teachers/configs.py), and tiny ones with the same frame grids for --quick.
_MEMBERS = {"WavLM Base+": "wavlm", "HuBERT Base": "hubert", "Whisper Base enc": "whisper-base"}
REAL = {name: real_config(kind) for name, kind in _MEMBERS.items()}
TINY = {name: tiny_config(kind) for name, kind in _MEMBERS.items()}
SETUPS = {"1-up": ("WavLM Base+",), "3-up": ("WavLM Base+", "HuBERT Base", "Whisper Base enc")}
GOAL_CACHE_GROWTH, GOAL_ONLINE_SPEEDUP = 1.1, 5.0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_corpus(folder: Path, count: int, seconds: tuple[float, float], seed: int = 0) -> Path:
    """`count` speech-like utterances (distill/data/signals.py) of random lengths as 16 kHz WAV."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        sf.write(folder / f"utt{i:03d}.wav", speech_like(float(rng.uniform(*seconds)), seed + i, SR).numpy(), SR)
    return folder


def recipe(members: tuple[str, ...], corpus: Path, args: argparse.Namespace) -> RecipeConfig:
    specs = TINY if args.quick else REAL
    return RecipeConfig(
        teacher=TeacherConfig(upstreams=[{"config": specs[m]} for m in members], projection_dim=32 if args.quick else 768,
                              projection_fit="pca", pca_max_utterances=2),
        student=StudentConfig(preset="tiny" if args.quick else "hubert_2l_384_conv128"),
        data=DataConfig(dataset_name=str(corpus), max_crop_seconds=args.crop_seconds, bucket_size=64,
                        min_duration_in_seconds=0.1),
        loss=LossConfig(),
        training=TrainingConfig(report_to="none"),
    )


def prepare(name: str, cfg: RecipeConfig, workdir: Path, batch_size: int):
    """(teacher, opened cache, fresh student) for one set-up; the cache is written here."""
    _log(f"[{name}] building the teacher and fitting its PCA projection ...")
    dataset = load_audio_dataset(cfg.data, "train")
    teacher = build_teacher(cfg, dataset)
    _log(f"[{name}] caching targets for {len(dataset)} utterances ...")
    # device="cpu": a CPU benchmark; the default (CUDA when present) would move this teacher away.
    folder = cache_targets(cfg, workdir / f"cache-{name}", shard_size=len(dataset), teacher=teacher,
                           batch_size=batch_size, device="cpu")
    cache = TargetCache.open(folder, teacher_hash=teacher.config_hash(), layer_ids=teacher.target_layer_ids)
    torch.manual_seed(0)
    return teacher, cache, build_distill_student(cfg, teacher)


def full_batches(cfg: RecipeConfig, batch_size: int, count: int) -> list[dict]:
    """`count` full training batches, from as many epochs (new crops each) as it takes."""
    loader = make_train_dataloader(load_audio_dataset(cfg.data, "train"), cfg.data, batch_size, seed=0)
    batches: list[dict] = []
    for epoch in range(count):
        loader.batch_sampler.sampler.set_epoch(epoch)  # what Accelerate's prepared loader calls
        batches += [b for b in loader if len(b["ids"]) == batch_size]
        if len(batches) >= count:
            return batches[:count]
    raise SystemExit(f"no full batch of {batch_size}: raise --utterances")


def train_step(student, optimizer, teacher, cache, batch: dict) -> float:
    """One timed training step; returns seconds. `cache` None = online teacher."""
    batch = {k: v for k, v in batch.items() if k != "targets"}
    start = time.perf_counter()
    if cache is not None:
        cache.add_targets(batch)  # inside the timing: reading the shards is part of the cached step
    loss, _ = loss_step(student, teacher, batch, 1.0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(args: argparse.Namespace, workdir: Path) -> dict:
    corpus = write_corpus(workdir / "corpus", args.utterances, (args.crop_seconds + 0.3, args.crop_seconds + 1.5))
    jobs, sizes = {}, {}
    for name, members in SETUPS.items():
        cfg = recipe(members, corpus, args)
        teacher, cache, student = prepare(name, cfg, workdir, args.batch_size)
        sizes[name] = sum(p.stat().st_size for p in cache.folder.glob("shard-*.safetensors"))
        for mode in ("cache", "online"):
            model = copy.deepcopy(student)  # same weights for both modes; separate optimizer state
            jobs[(name, mode)] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4), teacher,
                                  cache if mode == "cache" else None)
    batches = full_batches(cfg, args.batch_size, args.warmup + args.steps)
    _log(f"timing {len(jobs)} set-ups: {args.warmup} warm-up + {len(batches) - args.warmup} timed rounds ...")
    times = {key: [] for key in jobs}
    keys = list(jobs)
    for round_index, batch in enumerate(batches):
        # Rotate the order each round, so no set-up always follows the cache-flushing 3-up teacher.
        for key in keys[round_index % len(keys):] + keys[: round_index % len(keys)]:
            spent = train_step(*jobs[key], batch)
            if round_index >= args.warmup:
                times[key].append(spent)
    audio_seconds = batches[0]["waveforms"].numel() / SR
    return {"times": times, "audio_seconds_per_step": audio_seconds, "cache_bytes": sizes,
            "cached_audio_seconds": sum(sf.info(p).duration for p in corpus.glob("*.wav"))}


def report(result: dict, args: argparse.Namespace) -> dict:
    med = {key: statistics.median(t) for key, t in result["times"].items()}
    audio = result["audio_seconds_per_step"]
    print(f"# Training step time, {args.threads} CPU threads, fp32, batch {args.batch_size} x {audio / args.batch_size:.2f} s crops, "
          f"median of {len(next(iter(result['times'].values())))} after {args.warmup} warm-up"
          f"{' (QUICK: tiny configs)' if args.quick else ''}")
    if not args.quick:
        print("1-up = WavLM Base+; 3-up = WavLM Base+ + HuBERT Base + Whisper Base enc; random weights, "
              "CHConv -> 768, 3 target layers; student hubert_2l_384_conv128 + heads")
    print("step = loss_step (student fwd [+ teacher fwd | + cache read]) + backward + AdamW step\n")
    print("| set-up | targets | step (ms) | min (ms) | audio s / s | vs cache, same set-up |")
    print("|---|---|---:|---:|---:|---:|")
    for (name, mode), t in result["times"].items():
        print(f"| {name} | {mode} | {1000 * med[(name, mode)]:.1f} | {1000 * min(t):.1f} | "
              f"{audio / med[(name, mode)]:.1f} | {med[(name, mode)] / med[(name, 'cache')]:.2f}x |")
    growth = med[("3-up", "cache")] / med[("1-up", "cache")]
    speedup = med[("3-up", "online")] / med[("3-up", "cache")]
    hours = result["cached_audio_seconds"] / 3600
    per_1000h = {n: b / hours * 1000 / 1e9 for n, b in result["cache_bytes"].items()}
    print(f"\ncache size: {', '.join(f'{n} {b / 1e6:.1f} MB' for n, b in result['cache_bytes'].items())} for "
          f"{result['cached_audio_seconds']:.1f} s of audio (~{per_1000h['3-up']:.0f} GB per 1000 h)")
    print(f"online 1-up / cache 1-up: {med[('1-up', 'online')] / med[('1-up', 'cache')]:.2f}x")
    print(f"goals: cache 3-up / cache 1-up <= {GOAL_CACHE_GROWTH:g}: {'met' if growth <= GOAL_CACHE_GROWTH else 'NOT met'}; "
          f"online 3-up / cache 3-up >= {GOAL_ONLINE_SPEEDUP:g}x: {'met' if speedup >= GOAL_ONLINE_SPEEDUP else 'NOT met'}")
    print(f"cache 3-up / cache 1-up: {growth:.3f}")
    print(f"online 3-up / cache 3-up: {speedup:.2f}x")
    return {"step_ms_median": {f"{n} {m}": 1000 * v for (n, m), v in med.items()},
            "step_ms_all": {f"{n} {m}": [1000 * x for x in t] for (n, m), t in result["times"].items()},
            "cache_growth_3up_over_1up": growth, "online_over_cache_3up": speedup,
            "audio_seconds_per_step": audio, "cache_gb_per_1000h": per_1000h, "threads": args.threads,
            "batch_size": args.batch_size, "quick": args.quick, "torch": torch.__version__}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed rounds (each set-up steps once per round)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crop-seconds", type=float, default=2.0, help="data.max_crop_seconds")
    parser.add_argument("--utterances", type=int, default=8, help="size of the synthesised corpus")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--quick", action="store_true", help="tiny configs, one warm-up and one timed step (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch_size, args.crop_seconds, args.utterances = 1, 1, 2, 0.5, 4
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="cache_vs_online_") as tmp:
        summary = report(measure(args, Path(tmp)), args)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    from benchmarks import run_main

    sys.exit(run_main(main, "python -m benchmarks.cache_vs_online"))
