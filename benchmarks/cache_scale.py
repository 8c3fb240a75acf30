"""Target cache storage and speed, float16 vs int8, side by side in one run.

    python benchmarks/cache_scale.py [--seconds 120] [--threads 1] [--json PATH] [--quick]
    python benchmarks/cache_scale.py --compare CACHE_FP16 CACHE_INT8   # two real caches of one teacher

1. Size: shards written by the cache's own encoder (`encode_targets` + safetensors, as
   `cache-targets` writes them) for K=3, D=768 targets of mixed-length utterances (2-15 s;
   layer-normed Gaussian frames, the statistics of the teacher's normalised projected features),
   measured on disk and scaled to GB per hour of audio.
2. Error of int8 vs float16: mean and minimum per-frame cosine and relative L2 of the whole
   target tensors, (a) on the demo corpus (data/demo train split, the demo recipe's fused teacher,
   D=64), (b) on the synthetic D=768 targets of 1.
3. Speed: `cache-targets` on the demo corpus for each dtype with the same teacher (utterances and
   audio seconds per second), and reading training crops (`TargetCache.crops`, 2 s crops, batch 8)
   from each cache, in audio seconds per second.

Times depend on the machine's load; compare the two dtypes within one run, never across runs.
`--quick` uses fewer seconds (for tests; its numbers mean little).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from distill.build import build_teacher
from distill.cache.writer import TargetCache, cache_targets
from distill.config import load_recipe
from distill.data.loader import load_audio_dataset
from distill.cache.reader import DTYPES, encode_targets

FRAME_RATE = 50.0  # wav2vec grid: hop 320 at 16 kHz
K, D = 3, 768


def synthetic_targets(seconds: float, seed: int = 0) -> list[torch.Tensor]:
    """(K, T, D) float32 per utterance, 2-15 s each, frames layer-normed like the teacher's features."""
    gen = torch.Generator().manual_seed(seed)
    out, total = [], 0.0
    while total < seconds:
        length = 2.0 + 13.0 * torch.rand(1, generator=gen).item()
        frames = int(length * FRAME_RATE)
        x = torch.randn(K, frames, D, generator=gen) * (1 + torch.rand(K, 1, D, generator=gen))  # uneven dims
        out.append(F.layer_norm(x, (D,)))
        total += length
    return out


def shard_bytes(targets: list[torch.Tensor], dtype: str, folder: Path) -> int:
    tensors = {}
    for i, t in enumerate(targets):
        tensors.update(encode_targets(f"utt{i:05d}", t, dtype, "benchmark"))
    tensors["num_frames"] = torch.tensor([t.shape[1] for t in targets])
    path = folder / f"synthetic-{dtype}.safetensors"
    save_file(tensors, str(path), metadata={"ids": json.dumps([f"u{i}" for i in range(len(targets))])})
    return path.stat().st_size


def decode(stored: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key + ".scale" in stored:
        return stored[key].float() * stored[key + ".scale"].float()[..., None]
    return stored[key].float()


def errors(reference: list[torch.Tensor], approx: list[torch.Tensor]) -> dict[str, float]:
    """Per-frame cosine (mean, min) and relative L2 of the whole tensors (mean over utterances, max)."""
    cos = torch.cat([F.cosine_similarity(a, r, dim=-1).flatten() for r, a in zip(reference, approx)])
    rel = [((a - r).norm() / r.norm()).item() for r, a in zip(reference, approx)]
    return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
            "rel_l2_mean": statistics.fmean(rel), "rel_l2_max": max(rel)}


def read_speed(cache: TargetCache, repeats: int, seed: int = 0) -> float:
    """Audio seconds per second delivered by TargetCache.crops for 2 s crops in batches of 8."""
    rng = random.Random(seed)
    ids = [u for u in cache.ids if cache.num_frames(u) >= 100]
    crop = 99  # frames of a 2 s crop (320 * 99 + 80 samples)
    batches = []
    for _ in range(repeats):
        chosen = [rng.choice(ids) for _ in range(8)]
        batches.append((chosen, [320 * rng.randrange(cache.num_frames(u) - crop + 1) for u in chosen]))
    cache.crops(*batches[0], crop)  # first read of each shard: sha256 check, not the steady state
    for uid in set(ids):
        cache.targets(uid)
    start = time.perf_counter()
    for chosen, starts in batches:
        cache.crops(chosen, starts, crop)
    return repeats * 8 * 2.0 / (time.perf_counter() - start)


def compare_caches(reference: str | Path, other: str | Path) -> dict:
    """Error of one cache against another made by the same teacher over the same rows."""
    ref, alt = TargetCache.open(reference), TargetCache.open(other)
    if ref.teacher_hash != alt.teacher_hash or ref.ids != alt.ids:
        raise SystemExit(f"--compare: {reference} and {other} hold other teachers or rows; expected the same of both")
    result = errors([ref.targets(u).float() for u in ref.ids], [alt.targets(u).float() for u in ref.ids])
    frames = sum(ref.num_frames(u) for u in ref.ids)
    return {"reference": f"{reference} ({ref.dtype})", "other": f"{other} ({alt.dtype})", "utterances": len(ref.ids),
            "frames": frames, "layers": len(ref.layer_ids), "target_dim": ref.target_dim, **result}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="synthetic audio seconds for the size measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compare", nargs=2, metavar=("REFERENCE", "OTHER"),
                        help="only compare two caches of the same teacher and rows (e.g. float16 and int8 of a real run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.compare:
        result = compare_caches(*args.compare)
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return result
    seconds = 20.0 if args.quick else args.seconds
    result: dict = {"threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="cache_scale_") as tmp:
        work = Path(tmp)
        # 1 + 2b: synthetic K=3, D=768 targets.
        targets = synthetic_targets(seconds)
        audio_s = sum(t.shape[1] for t in targets) / FRAME_RATE
        size = {dt: shard_bytes(targets, dt, work) for dt in DTYPES}
        result["gb_per_hour"] = {dt: b / (audio_s / 3600) / 1e9 for dt, b in size.items()}
        stored = {}
        for i, t in enumerate(targets):
            stored.update(encode_targets(f"utt{i:05d}", t, "int8", "benchmark"))
        fp16 = [t.half().float() for t in targets]
        result["int8_vs_fp16_synthetic_d768"] = errors(fp16, [decode(stored, f"utt{i:05d}") for i in range(len(targets))])

        # 2a + 3: the demo corpus through the demo recipe's teacher, cached in each dtype.
        cfg = load_recipe("demo", ["teacher.pca_max_utterances=8"])
        train_set = load_audio_dataset(cfg.data, cfg.data.train_split_name)
        if args.quick:
            train_set = train_set.select(range(8))
        teacher = build_teacher(cfg, train_set)
        caches, speed = {}, {}
        for dtype in DTYPES:
            start = time.perf_counter()
            caches[dtype] = TargetCache.open(cache_targets(cfg, work / dtype, shard_size=16, teacher=teacher, dtype=dtype))
            elapsed = time.perf_counter() - start
            frames = caches[dtype].manifest["totals"]["frames"]
            speed[dtype] = {"utterances_per_s": len(caches[dtype]) / elapsed, "audio_s_per_s": frames / FRAME_RATE / elapsed}
        ids = caches["float16"].ids
        result["int8_vs_fp16_demo_d64"] = errors([caches["float16"].targets(u) for u in ids], [caches["int8"].targets(u) for u in ids])
        result["cache_targets_demo"] = speed
        result["demo_gb_per_hour_d64"] = {
            dt: sum(e["bytes"] for e in c.manifest["shards"]) / (c.manifest["totals"]["frames"] / FRAME_RATE / 3600) / 1e9
            for dt, c in caches.items()
        }
        repeats = 20 if args.quick else 200
        result["crop_read_audio_s_per_s"] = {}
        for _ in range(2):  # interleaved rounds: both dtypes share the machine's load
            for dtype in DTYPES:
                result["crop_read_audio_s_per_s"].setdefault(dtype, []).append(read_speed(caches[dtype], repeats))
        result["crop_read_audio_s_per_s"] = {dt: max(v) for dt, v in result["crop_read_audio_s_per_s"].items()}
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


def report(r: dict) -> None:
    g = r["gb_per_hour"]
    print(f"size at K={K}, D={D} (measured shard files): float16 {g['float16']:.3f} GB/h, int8 {g['int8']:.3f} GB/h "
          f"({g['int8'] / g['float16']:.3f}x)")
    for name in ("int8_vs_fp16_demo_d64", "int8_vs_fp16_synthetic_d768"):
        e = r[name]
        print(f"{name}: cosine mean {e['cosine_mean']:.6f} min {e['cosine_min']:.6f}; "
              f"relative L2 mean {e['rel_l2_mean']:.5f} max {e['rel_l2_max']:.5f}")
    s = r["cache_targets_demo"]
    print("cache-targets on the demo corpus (tiny teacher): " + "; ".join(
        f"{dt} {v['utterances_per_s']:.1f} utt/s, {v['audio_s_per_s']:.1f} audio s/s" for dt, v in s.items()))
    c = r["crop_read_audio_s_per_s"]
    print(f"TargetCache.crops (2 s crops, batch 8, D=64): float16 {c['float16']:.0f}, int8 {c['int8']:.0f} audio s/s")


if __name__ == "__main__":
    from benchmarks import run_main

    sys.exit(run_main(main, "python -m benchmarks.cache_scale"))
