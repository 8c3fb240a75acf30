"""Target cache: run the fused teacher once over the training split, then train from its targets.

    fusion-distill cache-targets RECIPE --out CACHE
    fusion-distill train RECIPE data.targets_cache=CACHE
    # and for evaluation while training (training.eval_steps), the eval split with the same teacher:
    fusion-distill cache-targets RECIPE --split dev --teacher CACHE/teacher --out CACHE_DEV
    fusion-distill train RECIPE data.targets_cache=CACHE data.eval_targets_cache=CACHE_DEV

`cache_targets` writes, under CACHE:
- `teacher/`: the exact fused teacher the targets came from (save_pretrained), so a cache is
  never separated from its teacher;
- `shard-00000.safetensors`, ...: one shard per `shard_size` dataset rows in dataset order;
  per utterance a float16 tensor (K, T_i, D) keyed `utt00000`.. (index inside the shard) holding
  the targets of the whole utterance on the wav2vec frame grid (hop 320, 400-sample receptive
  field, 49 frames for 1.0 s), plus `num_frames` (n,) int64; the metadata repeats the ids;
- `manifest.json`: format, teacher hash, layer ids, target_dim, dtype, frame grid, per shard
  its sha256, ids, frame and sample counts, and what was skipped and why.

Training crops are frame-aligned (start on multiples of 320 samples, 320 n + 80 samples long),
so frame j of a crop is frame start // 320 + j of the utterance: `TargetCache.crops` slices
the cached whole-utterance targets there. The teacher saw the whole utterance, not the crop:
targets carry the utterance's full context (the online teacher sees only the crop).

Resuming: a shard whose file exists with the manifest's checksum is not recomputed; each shard is
written to a temporary name and renamed, and the manifest is rewritten after every shard.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from teachers import CONFIG_NAME, FusedTeacher, read_saved_config, wav2vec_num_frames
from teachers.fused import WEIGHTS_NAME

from .audio import HOP, RECEPTIVE_FIELD, BadAudio, decode_audio
from .build import build_teacher, teacher_config_diffs
from .config import DataConfig, RecipeConfig, TeacherConfig
from .data import load_audio_dataset

__all__ = ["CacheError", "TargetCache", "cache_targets", "MANIFEST_NAME", "TEACHER_DIR"]

logger = logging.getLogger(__name__)

FORMAT, VERSION = "fusion-distill/target-cache", 1
MANIFEST_NAME = "manifest.json"
TEACHER_DIR = "teacher"
_DTYPE = "float16"
# Recipe teacher keys that decide what the targets are; compared by TargetCache.check_recipe.
class CacheError(ValueError):
    """A target cache that cannot be written or used as asked; the message is one line."""


# --------------------------------------------------------------------------- writing


def cache_targets(
    cfg: RecipeConfig,
    out_dir: Union[str, Path],
    shard_size: int = 256,
    teacher: Optional[FusedTeacher] = None,
    *,
    batch_size: int = 8,
    device: Optional[Union[str, torch.device]] = None,
    split: Optional[str] = None,
) -> Path:
    """Run the recipe's teacher once over every utterance of a split; return `out_dir`.

    `split`: default data.train_split_name; another split (the eval split) gets the same teacher,
    whose PCA is still fitted on the train split. `teacher`: a fitted teacher to use instead of
    `build_teacher(cfg, ...)`; it is saved to out_dir/teacher either way. `batch_size`
    utterances go through the teacher together (it runs them unpadded). `device` (also where the PCA is fitted) defaults to CUDA when available.
    Streamed datasets are refused: shards follow dataset rows, and training looks targets up by id.
    """
    if shard_size < 1:
        raise CacheError(f"cache {out_dir}: shard_size={shard_size}, expected >= 1")
    _refuse_streaming(cfg.data, f"cache {out_dir}: cache-targets")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = cfg.data
    split = split or data.train_split_name
    dataset = load_audio_dataset(data, split)
    if teacher is None:
        fit_on = dataset if split == data.train_split_name else load_audio_dataset(data, data.train_split_name)
        teacher = build_teacher(cfg, fit_on, save_dir=out / TEACHER_DIR, device=device)
    manifest = _start_manifest(out, teacher, cfg, shard_size, split)
    teacher.save_pretrained(out / TEACHER_DIR)  # also when reused: keeps the files the manifest hashes
    manifest["teacher_files"] = _teacher_checksums(out / TEACHER_DIR)
    teacher.to(device).eval()

    old = {entry["index"]: entry for entry in manifest["shards"]}
    manifest["shards"], seen_ids = [], set()
    with tqdm(total=len(dataset), unit="utt", desc="cache-targets", disable=None) as bar:
        for index, rows in enumerate(_chunks(dataset, shard_size)):
            row_ids = [str(row["id"]) for row in rows]
            _check_unique(out, row_ids, seen_ids, index)
            entry = old.get(index)
            if not _shard_done(out, entry, row_ids):
                entry = _write_shard(out, index, rows, teacher, manifest, batch_size, bar)
            else:
                bar.update(len(rows))
            manifest["shards"].append(entry)
            _save_manifest(out, manifest)
    manifest.update(totals=_totals(manifest["shards"]), complete=True)
    _save_manifest(out, manifest)
    skipped = manifest["totals"]["skipped"]
    logger.info("cache %s: %d utterances, %d frames in %d shards%s", out, manifest["totals"]["utterances"],
                manifest["totals"]["frames"], len(manifest["shards"]), f"; skipped {skipped}" if skipped else "")
    return out


def _start_manifest(out: Path, teacher: FusedTeacher, cfg: RecipeConfig, shard_size: int, split: str) -> dict:
    """The existing manifest when it was made for the same teacher, data and sharding, else a new one."""
    header = {
        "format": FORMAT, "version": VERSION, "teacher_hash": teacher.config_hash(), "teacher_dir": TEACHER_DIR,
        "layer_ids": list(teacher.target_layer_ids), "target_dim": teacher.target_dim, "dtype": _DTYPE,
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
    clashes = [k for k in ("teacher_hash", "layer_ids", "target_dim", "sampling_rate", "dataset", "shard_size")
               if existing.get(k) != header[k]]
    if clashes:
        diff = ", ".join(f"{k}: {_short(existing.get(k))} vs {_short(header[k])}" for k in clashes)
        raise CacheError(f"cache {out}: made for another run ({diff}); use a new folder or delete this one")
    return {**existing, **header, "complete": False}


def _refuse_streaming(data_cfg: DataConfig, what: str) -> None:
    # Training looks targets up by id. A hub dataset without an id column numbers its map-style
    # rows, while a stream (no row numbers across shards) derives ids from the audio instead.
    if data_cfg.streaming:
        raise CacheError(f"{what} needs a map-style dataset (data.streaming=false): cached targets are keyed "
                         "by map-style row ids, which streamed rows need not have")


def _chunks(dataset: Iterable[Mapping[str, Any]], size: int) -> Iterator[list[Mapping[str, Any]]]:
    # Shards follow dataset rows, not kept utterances, so their boundaries survive a resume.
    rows = iter(dataset)
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def _check_unique(out: Path, row_ids: list[str], seen: set[str], index: int) -> None:
    # Crops are looked up by id: two utterances with one id would silently share targets.
    for uid in row_ids:
        if uid in seen:
            raise CacheError(f"cache {out}: utterance id {uid!r} occurs twice (again in shard {index}); ids must be unique")
        seen.add(uid)


def _shard_done(out: Path, entry: Optional[dict], row_ids: list[str]) -> bool:
    if entry is None or not (out / entry["file"]).is_file():
        return False
    if set(row_ids) != set(entry["ids"]) | set(entry["skipped_ids"]):
        raise CacheError(f"cache {out}: {entry['file']} holds other utterances than the dataset now has; use a new folder")
    return _sha256(out / entry["file"]) == entry["sha256"]


def _write_shard(
    out: Path, index: int, rows: list[Mapping[str, Any]], teacher: FusedTeacher, manifest: dict, batch_size: int, bar: tqdm
) -> dict:
    kept, skipped_ids = _decode_rows(rows, manifest["sampling_rate"], manifest["min_samples"], bar)
    tensors: dict[str, torch.Tensor] = {}
    for start in range(0, len(kept), batch_size):
        group = kept[start : start + batch_size]
        for offset, targets in enumerate(_teacher_targets(teacher, group)):
            tensors[_key(start + offset)] = targets
    ids = [uid for uid, _ in kept]
    frames = [int(tensors[_key(i)].shape[1]) for i in range(len(kept))]
    tensors["num_frames"] = torch.tensor(frames, dtype=torch.long)
    name = f"shard-{index:05d}.safetensors"
    tmp = out / f".{name}.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "ids": json.dumps(ids), "teacher_hash": manifest["teacher_hash"]})
    os.replace(tmp, out / name)  # a crash never leaves a half-written shard under the real name
    return {
        "index": index, "file": name, "sha256": _sha256(out / name), "rows": len(rows), "utterances": len(ids),
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
    """Per utterance (K, T_i, D) float16 on the CPU, T_i on the wav2vec grid of the whole utterance."""
    out = teacher.targets([wave for _, wave in group])  # a list: the teacher runs items unpadded
    result = []
    for b, (uid, wave) in enumerate(group):
        n = int(out.lengths[b])
        if n != wav2vec_num_frames(len(wave)):
            raise CacheError(f"cache-targets: {uid}: teacher gave {n} frames, expected {wav2vec_num_frames(len(wave))}")
        targets = out.layers[:, b, :n].to("cpu", torch.float16).contiguous()
        if not torch.isfinite(targets).all():  # a float16 overflow must not become a training target
            raise CacheError(f"cache-targets: {uid}: targets overflow float16 (max |x| {out.layers[:, b].abs().max():.3g})")
        result.append(targets)
    return result


def _totals(shards: list[dict]) -> dict:
    skipped = Counter()
    for entry in shards:
        skipped.update(entry["skipped"])
    return {"rows": sum(e["rows"] for e in shards), "utterances": sum(e["utterances"] for e in shards),
            "frames": sum(e["frames"] for e in shards), "skipped": dict(sorted(skipped.items()))}


def _save_manifest(out: Path, manifest: dict) -> None:
    tmp = out / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST_NAME)


def _teacher_checksums(folder: Path) -> dict[str, str]:
    return {name: _sha256(folder / name) for name in (CONFIG_NAME, WEIGHTS_NAME)}


def _key(i: int) -> str:
    return f"utt{i:05d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:12] if len(text) == 64 else text  # hashes read best abbreviated


# --------------------------------------------------------------------------- reading


class TargetCache:
    """Read side of a cache written by `cache_targets`; shards are opened lazily (memory-mapped)."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.folder = folder
        self.manifest = manifest
        self._index: dict[str, tuple[int, str, int]] = {}  # id -> (shard, tensor key, frames)
        for shard, entry in enumerate(manifest["shards"]):
            for i, (uid, frames) in enumerate(zip(entry["ids"], entry["num_frames"])):
                self._index[uid] = (shard, _key(i), frames)
        self._handles: dict[int, Any] = {}

    @classmethod
    def open(
        cls,
        folder: Union[str, Path],
        teacher_hash: Optional[str] = None,
        layer_ids: Optional[Sequence[int]] = None,
        verify: bool = True,
    ) -> "TargetCache":
        """Validate the manifest, the teacher files and (with `verify`) every shard's sha256.

        `teacher_hash` / `layer_ids`, when given, must equal what the cache was made with.
        `verify` reads every byte once; a rank that opens after a verified open may skip it.
        """
        folder = Path(folder)
        manifest = _read_manifest(folder)
        if teacher_hash is not None and teacher_hash != manifest["teacher_hash"]:
            raise CacheError(f"cache {folder}: made with teacher {manifest['teacher_hash'][:12]}, expected "
                             f"{teacher_hash[:12]}; rerun cache-targets with this teacher")
        if layer_ids is not None and [int(i) for i in layer_ids] != manifest["layer_ids"]:
            raise CacheError(f"cache {folder}: holds target layers {manifest['layer_ids']}, expected {list(layer_ids)}; "
                             "rerun cache-targets with these target_layers")
        for name, expected in manifest.get("teacher_files", {}).items():
            _check_file(folder, Path(manifest["teacher_dir"]) / name, expected)
        for entry in manifest["shards"]:
            if verify:
                _check_file(folder, Path(entry["file"]), entry["sha256"])
            elif not (folder / entry["file"]).is_file():
                raise CacheError(f"cache {folder}: {entry['file']} is missing; rerun cache-targets")
        return cls(folder, manifest)

    # ----------------------------------------------------------------- describing
    @property
    def teacher_hash(self) -> str:
        return self.manifest["teacher_hash"]

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return tuple(self.manifest["layer_ids"])

    @property
    def target_dim(self) -> int:
        return int(self.manifest["target_dim"])

    @property
    def min_samples(self) -> int:
        """Shortest utterance the teacher could take (pass to make_train_dataloader)."""
        return int(self.manifest["min_samples"])

    @property
    def ids(self) -> list[str]:
        return list(self._index)

    @property
    def teacher_dir(self) -> Path:
        return self.folder / self.manifest["teacher_dir"]

    @property
    def teacher_config(self) -> dict:
        """The saved teacher's config (upstream specs, fusion, ...), read without loading any model."""
        return read_saved_config(self.teacher_dir)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, uid: object) -> bool:
        return uid in self._index

    def num_frames(self, uid: str) -> int:
        return self._lookup(uid)[2]

    @staticmethod
    def check_data(data_cfg: DataConfig) -> None:
        """One-line CacheError when the recipe's data section cannot train from a target cache.

        A staticmethod: call `TargetCache.check_data(cfg.data)` before `open`, which hashes every shard.
        """
        _refuse_streaming(data_cfg, f"cache {data_cfg.targets_cache}: data.targets_cache")

    def check_recipe(self, teacher_cfg: TeacherConfig) -> None:
        """One-line CacheError when the recipe's teacher section describes another teacher."""
        diffs = teacher_config_diffs(self.teacher_config, teacher_cfg)
        if diffs:
            raise CacheError(f"cache {self.folder}: its teacher differs from the recipe's in {', '.join(diffs)} "
                             f"(see {self.teacher_dir / CONFIG_NAME}); rerun cache-targets with this recipe")

    # ----------------------------------------------------------------- reading targets
    def targets(self, uid: str) -> torch.Tensor:
        """(K, T, D) float32 targets of the whole utterance."""
        return self._read(uid, 0, self.num_frames(uid))

    def crops(self, ids: Sequence[str], starts: Union[Sequence[int], torch.Tensor], num_frames: int) -> torch.Tensor:
        """(K, B, num_frames, D) float32: frames [start // 320, start // 320 + num_frames) of each utterance.

        `starts` are crop start samples (multiples of 320), as make_train_dataloader yields them.
        """
        starts = [int(s) for s in (starts.tolist() if torch.is_tensor(starts) else starts)]
        if len(starts) != len(ids):
            raise CacheError(f"cache {self.folder}: {len(ids)} ids but {len(starts)} crop starts")
        out = torch.empty(len(self.layer_ids), len(ids), num_frames, self.target_dim)
        for b, (uid, start) in enumerate(zip(ids, starts)):
            if start % HOP:
                raise CacheError(f"cache {self.folder}: crop of {uid!r} starts at sample {start}, not on the {HOP}-sample frame grid")
            out[:, b] = self._read(uid, start // HOP, num_frames)
        return out

    def add_targets(self, batch: dict) -> dict:
        """Put the crops' targets into a make_train_dataloader batch as batch["targets"]; returns it.

        Batches are padding-free (S = 320 n + 80 samples), so every item has n = wav2vec frames of S.
        """
        lengths = batch["lengths"]
        samples = batch["waveforms"].shape[1]
        if len(lengths) and bool((lengths != samples).any()):
            raise CacheError(f"cache {self.folder}: cached targets need padding-free crops, got lengths "
                             f"{lengths.tolist()} in a batch of {samples} samples")
        batch["targets"] = self.crops(batch["ids"], batch["starts"], wav2vec_num_frames(samples))
        return batch

    def _lookup(self, uid: str) -> tuple[int, str, int]:
        try:
            return self._index[uid]
        except KeyError:
            raise CacheError(f"cache {self.folder}: no targets for utterance {uid!r} "
                             "(cached from another dataset or split?); rerun cache-targets") from None

    def _read(self, uid: str, first: int, count: int) -> torch.Tensor:
        shard, key, frames = self._lookup(uid)
        if first + count > frames or count < 0:
            raise CacheError(f"cache {self.folder}: {uid!r} has {frames} cached frames, asked for [{first}, {first + count}); "
                             "the audio differs from what was cached")
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / self.manifest["shards"][shard]["file"]), framework="pt")
        # get_slice reads only the asked frames from the memory-mapped shard.
        return self._handles[shard].get_slice(key)[:, first : first + count, :].float()


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise CacheError(f"cache {folder}: no {MANIFEST_NAME}; run cache-targets first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CacheError(f"cache {folder}: {MANIFEST_NAME} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheError(f"cache {folder}: {MANIFEST_NAME} is {manifest.get('format')} v{manifest.get('version')}, "
                         f"expected {FORMAT} v{VERSION}")
    if not manifest.get("complete"):
        raise CacheError(f"cache {folder}: incomplete ({len(manifest.get('shards', []))} shards so far); "
                         "rerun cache-targets to finish it")
    if manifest.get("dtype") != _DTYPE or manifest.get("hop_length") != HOP:
        raise CacheError(f"cache {folder}: dtype {manifest.get('dtype')} hop {manifest.get('hop_length')}, "
                         f"expected {_DTYPE} hop {HOP}")
    return manifest


def _check_file(folder: Path, relative: Path, expected: str) -> None:
    path = folder / relative
    if not path.is_file():
        raise CacheError(f"cache {folder}: {relative} is missing; rerun cache-targets")
    got = _sha256(path)
    if got != expected:
        raise CacheError(f"cache {folder}: {relative} checksum mismatch (expected {expected[:12]}, got {got[:12]}); "
                         "rerun cache-targets")

