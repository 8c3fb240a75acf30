"""Target cache: run the fused teacher once over the training split, then train from its targets.

    fusion-distill cache-targets RECIPE --out CACHE [--dtype float16|int8]
    accelerate launch --num_processes N -m distill cache-targets RECIPE --out CACHE   # N devices share the rows
    fusion-distill train RECIPE data.targets_cache=CACHE
    # and for evaluation while training (training.eval_steps), the eval split with the same teacher:
    fusion-distill cache-targets RECIPE --split dev --teacher CACHE/teacher --out CACHE_DEV
    fusion-distill train RECIPE data.targets_cache=CACHE data.eval_targets_cache=CACHE_DEV
    fusion-distill verify-cache CACHE   # hash every shard (training hashes each shard at its first read)

`cache_targets` writes, under CACHE:
- `teacher/`: the exact fused teacher the targets came from (save_pretrained), so a cache is
  never separated from its teacher;
- `shard-00000.safetensors`, ...: one shard per `shard_size` dataset rows in dataset order;
  per utterance its targets (float16, or int8 codes + float16 per-frame scales: see
  distill/cache/reader.py) for the whole utterance on the wav2vec frame grid (hop 320,
  400-sample receptive field, 49 frames for 1.0 s), plus `num_frames` (n,) int64;
- `manifest.json`: format, teacher hash, layer ids, target_dim, dtype, frame grid, per shard
  its sha256, size, ids, frame and sample counts, and what was skipped and why.

Training crops are frame-aligned (start on multiples of 320 samples, 320 n + 80 samples long),
so frame j of a crop is frame start // 320 + j of the utterance: `TargetCache.crops` slices
the cached whole-utterance targets there. The teacher saw the whole utterance, not the crop:
targets carry the utterance's full context (the online teacher sees only the crop).

Processes: under `accelerate launch`, rank r computes shards r, r + N, r + 2N, ... Rank 0 fits
the teacher (PCA) and saves it first; the others load that file. Shard contents depend only on
the dataset rows and the shard size, never on N, so an N-process cache holds the same bytes as a
1-process one. Each rank records its finished shards in `progress-rankR.json`; when all ranks
are done, rank 0 writes the complete manifest and removes those files.

Resuming (any N): a shard whose file exists with the checksum recorded in the manifest or a
progress file is not recomputed; shards are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from safetensors.torch import save_file
from tqdm.auto import tqdm

from teachers import CONFIG_NAME, FusedTeacher, wav2vec_num_frames
from teachers.fused import WEIGHTS_NAME

from ..data.audio import HOP, RECEPTIVE_FIELD, BadAudio, decode_audio
from ..build import build_teacher
from ..checksums import sha256_file
from ..config import RecipeConfig
from ..data.loader import load_audio_dataset
from .reader import (
    DTYPES, FORMAT, MANIFEST_NAME, TEACHER_DIR, VERSION, CacheError, TargetCache, _key, encode_targets,
    refuse_streaming,
)
from ..runs.lock import locked

__all__ = ["CacheError", "TargetCache", "cache_targets", "MANIFEST_NAME", "TEACHER_DIR", "DTYPES"]

logger = logging.getLogger(__name__)

_PROGRESS = "progress-rank{}.json"
# Manifest keys that decide what a shard holds: a folder made with other values is not resumed.
_IDENTITY = ("teacher_hash", "layer_ids", "target_dim", "dtype", "sampling_rate", "dataset", "shard_size")


# --------------------------------------------------------------------------- writing


@locked("cache-targets", lambda cfg, out_dir, *args, **kwargs: out_dir, kind="cache folder")  # one writer per cache
def cache_targets(
    cfg: RecipeConfig,
    out_dir: Union[str, Path],
    shard_size: int = 256,
    teacher: Optional[FusedTeacher] = None,
    *,
    batch_size: int = 8,
    device: Optional[Union[str, torch.device]] = None,
    split: Optional[str] = None,
    dtype: Optional[str] = None,
) -> Path:
    """Run the recipe's teacher once over every utterance of a split; return `out_dir`.

    `split`: default data.train_split_name; another split (the eval split) gets the same teacher,
    whose PCA is still fitted on the train split. `teacher`: a fitted teacher to use instead of
    `build_teacher(cfg, ...)`; it is saved to out_dir/teacher either way. `batch_size`
    utterances of similar length go through the teacher together. `dtype`: float16 or int8
    (default data.targets_cache_dtype). `device` (also where the PCA is fitted) defaults to this
    process's Accelerate device (CUDA when available). Under `accelerate launch` every rank calls
    this and computes its own shards; all return once the manifest is complete.
    Streamed datasets are refused: shards follow dataset rows, and training looks targets up by id.
    """
    if shard_size < 1:
        raise CacheError(f"cache {out_dir}: shard_size={shard_size}, expected >= 1")
    dtype = dtype or cfg.data.targets_cache_dtype
    if dtype not in DTYPES:
        raise CacheError(f"cache {out_dir}: data.targets_cache_dtype={dtype!r}, expected one of {', '.join(DTYPES)}")
    refuse_streaming(cfg.data, f"cache {out_dir}: cache-targets")
    # AcceleratorState reads ACCELERATE_USE_CPU, PartialState does not: without it two CPU ranks
    # would each believe they are the only process.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    rank, world = state.process_index, state.num_processes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else state.device
    data = cfg.data
    split = split or data.train_split_name
    with state.main_process_first():  # one rank downloads and reads headers; the rest reuse its files
        dataset = load_audio_dataset(data, split)
    ids = [str(uid) for uid in dataset["id"]]
    _check_unique(out, ids, shard_size)
    with state.main_process_first():  # rank 0 fits the teacher and writes the manifest header; the others read both
        if teacher is None:
            fit_on = dataset if split == data.train_split_name else load_audio_dataset(data, data.train_split_name)
            teacher = build_teacher(cfg, fit_on, save_dir=out / TEACHER_DIR, device=device)
        manifest = _start_manifest(out, teacher, cfg, shard_size, split, dtype)
        if state.is_main_process:
            teacher.save_pretrained(out / TEACHER_DIR)  # also when reused: keeps the files the manifest hashes
            manifest["teacher_files"] = _teacher_checksums(out / TEACHER_DIR)
            _save_json(out / MANIFEST_NAME, manifest)
    teacher.to(device).eval()
    known = _known_shards(out, manifest)
    state.wait_for_everyone()  # every rank has read the old progress files before any rank rewrites its own

    num_shards = -(-len(ids) // shard_size)
    mine = list(range(rank, num_shards, world))
    my_rows = sum(min(shard_size, len(ids) - i * shard_size) for i in mine)
    done: list[dict] = []
    with tqdm(total=my_rows, unit="utt", desc=f"cache-targets rank {rank}", disable=None if rank == 0 else True) as bar:
        for index in mine:
            lo, hi = index * shard_size, min((index + 1) * shard_size, len(ids))
            entry = known.get(index)
            if _shard_done(out, entry, ids[lo:hi]):
                entry = {**entry, "bytes": (out / entry["file"]).stat().st_size}  # older manifests lack sizes
                bar.update(hi - lo)
            else:
                rows = list(dataset.select(range(lo, hi)))
                entry = _write_shard(out, index, rows, teacher, manifest, batch_size, bar)
            done.append(entry)
            _save_json(out / _PROGRESS.format(rank), {**_identity(manifest), "shards": done})
            if rank == 0:  # the manifest shows progress (and resumes) even before all ranks finish
                _save_json(out / MANIFEST_NAME, {**manifest, "shards": _merged(known, _progress_entries(out, manifest))})
    state.wait_for_everyone()
    if state.is_main_process:
        _finish_manifest(out, manifest, num_shards, world)
    state.wait_for_everyone()  # no rank returns (and trains) before the manifest is complete
    return out


def _identity(manifest: dict) -> dict:
    return {k: manifest[k] for k in _IDENTITY}


def _start_manifest(out: Path, teacher: FusedTeacher, cfg: RecipeConfig, shard_size: int, split: str, dtype: str) -> dict:
    """The existing manifest when it was made for the same teacher, data, dtype and sharding, else a new one."""
    header = {
        "format": FORMAT, "version": VERSION, "teacher_hash": teacher.config_hash(), "teacher_dir": TEACHER_DIR,
        "layer_ids": list(teacher.target_layer_ids), "target_dim": teacher.target_dim, "dtype": dtype,
        "sampling_rate": cfg.data.sampling_rate, "hop_length": HOP, "receptive_field": RECEPTIVE_FIELD,
        "frame_rate": cfg.data.sampling_rate / HOP,
        # Shorter audio gives the teacher no frame; the train loader drops it too.
        "min_samples": teacher.min_samples,
        "dataset": {"name": cfg.data.dataset_name, "config": cfg.data.dataset_config_name,
                    "split": split},
        "shard_size": shard_size,
    }
    path = out / MANIFEST_NAME
    if not path.is_file():
        return {**header, "complete": False, "shards": []}
    existing = json.loads(path.read_text())
    clashes = [k for k in _IDENTITY if existing.get(k) != header[k]]
    if clashes:
        diff = ", ".join(f"{k}: {_short(existing.get(k))} vs {_short(header[k])}" for k in clashes)
        raise CacheError(f"cache {out}: made for another run ({diff}); use a new folder or delete this one")
    return {**existing, **header, "complete": False}


def _progress_entries(out: Path, manifest: dict, ranks: Optional[range] = None) -> list[dict]:
    """Shard entries of the ranks' progress files that belong to this cache (all files when `ranks` is None)."""
    paths = sorted(out.glob(_PROGRESS.format("*"))) if ranks is None else [out / _PROGRESS.format(r) for r in ranks]
    entries = []
    for path in paths:
        try:
            progress = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # a rank that wrote nothing yet, or a torn old file
            continue
        if {k: progress.get(k) for k in _IDENTITY} == _identity(manifest):  # stale files of another run are ignored
            entries += progress["shards"]
    return entries


def _known_shards(out: Path, manifest: dict) -> dict[int, dict]:
    """index -> entry of every shard a previous run (of any number of ranks) recorded as finished."""
    return {entry["index"]: entry for entry in manifest["shards"] + _progress_entries(out, manifest)}


def _merged(known: dict[int, dict], newer: list[dict]) -> list[dict]:
    merged = dict(known)
    merged.update((entry["index"], entry) for entry in newer)
    return [merged[i] for i in sorted(merged)]


def _finish_manifest(out: Path, manifest: dict, num_shards: int, world: int) -> None:
    # Only this run's ranks: each recorded every shard it owns, finished now or before.
    shards = _merged({}, _progress_entries(out, manifest, range(world)))
    missing = sorted(set(range(num_shards)) - {e["index"] for e in shards})
    if missing or len(shards) != num_shards:
        raise CacheError(f"cache {out}: shards {missing[:5]} have no progress record after all ranks finished; rerun cache-targets")
    manifest.update(shards=shards, totals=_totals(shards), complete=True)
    _save_json(out / MANIFEST_NAME, manifest)
    for path in out.glob(_PROGRESS.format("*")):
        path.unlink()
    skipped = manifest["totals"]["skipped"]
    logger.info("cache %s: %d utterances, %d frames in %d shards (%s)%s", out, manifest["totals"]["utterances"],
                manifest["totals"]["frames"], len(shards), manifest["dtype"], f"; skipped {skipped}" if skipped else "")


def _check_unique(out: Path, ids: list[str], shard_size: int) -> None:
    # Crops are looked up by id: two utterances with one id would silently share targets.
    seen: set[str] = set()
    for row, uid in enumerate(ids):
        if uid in seen:
            raise CacheError(f"cache {out}: utterance id {uid!r} occurs twice (again in shard {row // shard_size}); ids must be unique")
        seen.add(uid)


def _shard_done(out: Path, entry: Optional[dict], row_ids: list[str]) -> bool:
    if entry is None or not (out / entry["file"]).is_file():
        return False
    if set(row_ids) != set(entry["ids"]) | set(entry["skipped_ids"]):
        raise CacheError(f"cache {out}: {entry['file']} holds other utterances than the dataset now has; use a new folder")
    return sha256_file(out / entry["file"]) == entry["sha256"]


def _write_shard(
    out: Path, index: int, rows: list[Mapping[str, Any]], teacher: FusedTeacher, manifest: dict, batch_size: int, bar: tqdm
) -> dict:
    """Run the teacher over one shard's rows and write it; returns its manifest entry.

    Teacher batches hold rows of similar length (kept rows sorted longest first, stable, then cut
    into `batch_size` runs), so a padding-invariant upstream pads little; each utterance is still
    stored under its position among the kept rows, so the shard's layout does not depend on the
    batching.
    """
    kept, skipped_ids = _decode_rows(rows, manifest["sampling_rate"], manifest["min_samples"], bar)
    tensors: dict[str, torch.Tensor] = {}
    frames = [0] * len(kept)
    order = sorted(range(len(kept)), key=lambda i: -len(kept[i][1]))
    for start in range(0, len(order), batch_size):
        positions = order[start : start + batch_size]
        for i, targets in zip(positions, _teacher_targets(teacher, [kept[i] for i in positions])):
            tensors.update(encode_targets(_key(i), targets, manifest["dtype"], f"cache-targets: {kept[i][0]}"))
            frames[i] = int(targets.shape[1])
    ids = [uid for uid, _ in kept]
    tensors["num_frames"] = torch.tensor(frames, dtype=torch.long)
    name = f"shard-{index:05d}.safetensors"
    tmp = out / f".{name}.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "ids": json.dumps(ids), "teacher_hash": manifest["teacher_hash"],
                                           "dtype": manifest["dtype"]})
    os.replace(tmp, out / name)  # a crash never leaves a half-written shard under the real name
    return {
        "index": index, "file": name, "sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size,
        "rows": len(rows), "utterances": len(ids),
        "frames": sum(frames), "ids": ids, "num_frames": frames, "num_samples": [len(w) for _, w in kept],
        "skipped": dict(Counter(skipped_ids.values())), "skipped_ids": skipped_ids,
    }


def _decode_rows(rows: list[Mapping[str, Any]], sampling_rate: int, min_samples: int, bar: tqdm):
    kept, skipped = [], {}
    for row in rows:
        uid = str(row["id"])
        bar.update(1)
        try:
            wave = decode_audio(row["audio"], sampling_rate)
        except BadAudio as err:
            logger.warning("cache-targets: skipping %s: %s", uid, err)
            skipped[uid] = err.reason
            continue
        if len(wave) < min_samples:
            logger.warning("cache-targets: skipping %s: %d samples, fewer than %d", uid, len(wave), min_samples)
            skipped[uid] = "too_short"
            continue
        kept.append((uid, torch.from_numpy(wave)))
    return kept, skipped


def _teacher_targets(teacher: FusedTeacher, group: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Per utterance (K, T_i, D) float32 on the CPU, T_i on the wav2vec grid of the whole utterance."""
    out = teacher.targets([wave for _, wave in group])  # a list: each upstream batches the items its own way
    result = []
    for b, (uid, wave) in enumerate(group):
        n = int(out.lengths[b])
        if n != wav2vec_num_frames(len(wave)):
            raise CacheError(f"cache-targets: {uid}: teacher gave {n} frames, expected {wav2vec_num_frames(len(wave))}")
        result.append(out.layers[:, b, :n].to("cpu", torch.float32))
    return result


def _totals(shards: list[dict]) -> dict:
    skipped = Counter()
    for entry in shards:
        skipped.update(entry["skipped"])
    return {"rows": sum(e["rows"] for e in shards), "utterances": sum(e["utterances"] for e in shards),
            "frames": sum(e["frames"] for e in shards), "skipped": dict(sorted(skipped.items()))}


def _save_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # readers (other ranks, a resume) never see half a file
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def _teacher_checksums(folder: Path) -> dict[str, str]:
    return {name: sha256_file(folder / name) for name in (CONFIG_NAME, WEIGHTS_NAME)}


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:12] if len(text) == 64 else text  # hashes read best abbreviated
