"""Reading a target cache written by `cache-targets` (distill/cache/writer.py), and the format both sides share.

Storage dtypes (the manifest's "dtype", `cache-targets --dtype` / `data.targets_cache_dtype`):
- float16: per utterance a float16 (K, T, D) tensor keyed `utt00000`.. (index inside the shard);
- int8: `utt00000` holds int8 (K, T, D) codes and `utt00000.scale` float16 (K, T) scales; frame t
  of layer k is codes[k, t] * scale[k, t] with scale = absmax / 127 of that frame's vector. A frame
  takes D + 2 bytes instead of 2 D: at D = 768 about 0.50x the float16 size.
Caches written before int8 existed are float16 caches of the same format version and read as before.

Verification scales with the corpus: `TargetCache.open` checks the manifest, the teacher files
(sha256; they are small) and every shard's size, at once; a shard's sha256 is checked the first
time this process reads from it (`verify=True`, the default), so each rank hashes only the shards
it reads, when it reads them. `TargetCache.verify()` (`fusion-distill verify-cache DIR`) hashes all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from teachers import CONFIG_NAME, read_saved_config, wav2vec_num_frames

from ..data.audio import HOP
from ..build import teacher_config_diffs
from ..checksums import sha256_file
from ..config import DataConfig, TeacherConfig

__all__ = ["CacheError", "TargetCache", "DTYPES", "MANIFEST_NAME", "TEACHER_DIR", "encode_targets"]

FORMAT, VERSION = "fusion-distill/target-cache", 1
MANIFEST_NAME = "manifest.json"
TEACHER_DIR = "teacher"
DTYPES = ("float16", "int8")
_SCALE = ".scale"  # suffix of an int8 utterance's per-frame scales
_INT8_MAX = 127  # symmetric codes: -128 is never used, so negation is exact


class CacheError(ValueError):
    """A target cache that cannot be written or used as asked; the message is one line."""


# --------------------------------------------------------------------------- format


def encode_targets(key: str, targets: torch.Tensor, dtype: str, what: str) -> dict[str, torch.Tensor]:
    """Tensors to store for one utterance's (K, T, D) targets; `what` names it in errors."""
    if dtype == "float16":
        half = targets.to("cpu", torch.float16).contiguous()
        if not torch.isfinite(half).all():  # a float16 overflow must not become a training target
            raise CacheError(f"{what}: targets overflow float16 (max |x| {targets.abs().max():.3g})")
        return {key: half}
    if dtype != "int8":
        raise CacheError(f"{what}: dtype {dtype!r}, expected one of {', '.join(DTYPES)}")
    x = targets.to("cpu", torch.float32)
    scale = (x.abs().amax(dim=-1) / _INT8_MAX).to(torch.float16)
    if not torch.isfinite(scale).all():
        raise CacheError(f"{what}: int8 scales overflow float16 (max |x| {x.abs().max():.3g})")
    # Codes use the float16-rounded scale that is stored, so decoding inverts what was written;
    # a frame of zeros (scale 0) stays zeros instead of dividing by zero.
    s = scale.float().unsqueeze(-1)
    codes = torch.where(s > 0, x / s.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    codes = codes.round_().clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return {key: codes.contiguous(), key + _SCALE: scale.contiguous()}


def _key(i: int) -> str:
    return f"utt{i:05d}"


# --------------------------------------------------------------------------- reading


class TargetCache:
    """Read side of a cache written by `cache_targets`; shards are opened lazily (memory-mapped)."""

    def __init__(self, folder: Path, manifest: dict, verify: bool = True) -> None:
        self.folder = folder
        self.manifest = manifest
        self._verify = verify
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
        """Check the manifest, the teacher files and every shard's size; hash nothing large.

        `teacher_hash` / `layer_ids`, when given, must equal what the cache was made with.
        `verify`: check a shard's sha256 the first time it is read (each shard once per instance);
        `verify()` hashes every shard now.
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
            _check_size(folder, entry)
        return cls(folder, manifest, verify=verify)

    def verify(self, progress: bool = False) -> int:
        """Hash every shard against the manifest (one-line CacheError on the first mismatch); returns bytes read."""
        entries = self.manifest["shards"]
        total = sum((self.folder / e["file"]).stat().st_size for e in entries)
        with tqdm(total=total, unit="B", unit_scale=True, desc="verify-cache", disable=not progress) as bar:
            for entry in entries:
                _check_file(self.folder, Path(entry["file"]), entry["sha256"], bar)
        return total

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
    def dtype(self) -> str:
        """Storage dtype: float16 or int8 (reads always give float32)."""
        return self.manifest["dtype"]

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

        A staticmethod: call `TargetCache.check_data(cfg.data)` before `open`.
        """
        refuse_streaming(data_cfg, f"cache {data_cfg.targets_cache}: data.targets_cache")

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

    def _handle(self, shard: int) -> Any:
        if shard not in self._handles:
            entry = self.manifest["shards"][shard]
            if self._verify:  # first read of this shard here: its bytes must be the ones the manifest hashed
                _check_file(self.folder, Path(entry["file"]), entry["sha256"])
            self._handles[shard] = safe_open(str(self.folder / entry["file"]), framework="pt")
        return self._handles[shard]

    def _read(self, uid: str, first: int, count: int) -> torch.Tensor:
        shard, key, frames = self._lookup(uid)
        if first + count > frames or count < 0:
            raise CacheError(f"cache {self.folder}: {uid!r} has {frames} cached frames, asked for [{first}, {first + count}); "
                             "the audio differs from what was cached")
        handle = self._handle(shard)
        # get_slice reads only the asked frames from the memory-mapped shard.
        values = handle.get_slice(key)[:, first : first + count, :].float()
        if self.manifest["dtype"] == "int8":
            values *= handle.get_slice(key + _SCALE)[:, first : first + count].float().unsqueeze(-1)
        return values


def refuse_streaming(data_cfg: DataConfig, what: str) -> None:
    """One-line CacheError for a streamed dataset: cached targets are keyed by map-style row ids."""
    # A hub dataset without an id column numbers its map-style rows, while a stream (no row
    # numbers across shards) derives ids from the audio instead.
    if data_cfg.streaming:
        raise CacheError(f"{what} needs a map-style dataset (data.streaming=false): cached targets are keyed "
                         "by map-style row ids, which streamed rows need not have")


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
    if manifest.get("dtype") not in DTYPES or manifest.get("hop_length") != HOP:
        raise CacheError(f"cache {folder}: {MANIFEST_NAME} has dtype {manifest.get('dtype')} hop {manifest.get('hop_length')}, "
                         f"expected dtype {' or '.join(DTYPES)} hop {HOP}")
    return manifest


def _check_size(folder: Path, entry: dict) -> None:
    path = folder / entry["file"]
    if not path.is_file():
        raise CacheError(f"cache {folder}: {entry['file']} is missing; rerun cache-targets")
    # Manifests written before sizes were recorded have no "bytes": their shards get the hash check only.
    if "bytes" in entry and path.stat().st_size != entry["bytes"]:
        raise CacheError(f"cache {folder}: {entry['file']} has {path.stat().st_size} bytes, the manifest says "
                         f"{entry['bytes']} (truncated or rewritten); rerun cache-targets")


def _check_file(folder: Path, relative: Path, expected: str, bar: Optional[tqdm] = None) -> None:
    path = folder / relative
    if not path.is_file():
        raise CacheError(f"cache {folder}: {relative} is missing; rerun cache-targets")
    got = sha256_file(path, bar)
    if got != expected:
        raise CacheError(f"cache {folder}: {relative} checksum mismatch (expected {expected[:12]}, got {got[:12]}); "
                         "rerun cache-targets")
