"""Data sources: a hub dataset, an audio folder or a manifest -> rows `{"id", "audio", text?, label?, ...}`.

`DataConfig.dataset_name` is a hub dataset id (or a local folder of parquet/arrow shards laid out
like a hub repo), a folder of audio files (with an optional metadata.csv/.jsonl), or a CSV/JSONL
manifest. Audio stays `{"path", "bytes"}` (`datasets.Audio(decode=False)`) and is decoded with
soundfile + soxr later, in the loader workers (distill/data/audio.py), never with torchcodec.
distill/data/loader.py turns the rows into batches and re-exports `load_audio_dataset` and `DataError`.

Ids: folders and manifests use the audio path relative to the source, without suffix; map-style
hub rows without an `id` column are numbered in dataset order (`train-00000012`); streamed hub
rows without one get an id from the row itself (see `_stream_id`), so it is the same on every
rank, worker, shard and shuffle.

Extra columns: `load_audio_dataset(cfg, split, columns=("speaker", "phonemes"))` also keeps each
named column the source has under its own name (probe tasks read any column); a requested column
the source lacks is logged and left out, so the probe that wanted it reports it skipped.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, Union

import datasets
import numpy as np

from .audio import SkipCounter, header_durations
from ..config import DataConfig, RecipeError
from ..shipped import shipped_dataset

__all__ = ["AnyDataset", "DataError", "load_audio_dataset"]

logger = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
AUDIO_FALLBACKS = ("file_name", "path")  # manifest columns tried after audio_column_name

AnyDataset = Union[datasets.Dataset, datasets.IterableDataset]
# Names the rows or the eval batches already use (distill/data/loader.py's batch keys); an extra column
# under one of them would overwrite what the loader or the trainer reads.
RESERVED_COLUMNS = frozenset({"id", "audio", "text", "label", "duration", "waveforms", "lengths", "ids", "skipped",
                              "texts", "labels", "starts"})


class DataError(RecipeError):
    """A data source that cannot be used as configured; the message is one line."""


# --------------------------------------------------------------------------- loading


def load_audio_dataset(data_cfg: DataConfig, split: str, columns: Sequence[str] = ()) -> AnyDataset:
    """Load one split with canonical columns `id`, `audio` ({"path", "bytes"}), `text`, `label`.

    `text`/`label` are kept when the configured columns exist. `columns`: further columns kept
    under their own names (a configured text/label column too, beside its canonical copy); one
    the source lacks is logged, not an error. Map-style datasets also get a `duration` column
    (seconds, from file headers) and lose utterances that are unreadable or outside
    [min, max]_duration_in_seconds; what was dropped is counted and logged.
    """
    extras = _extra_columns(columns)
    # absolute: workers may chdir; `data/demo` outside a checkout is the corpus shipped in the package
    source = (shipped_dataset(data_cfg.dataset_name) or Path(data_cfg.dataset_name)).expanduser().resolve()
    if source.is_file():
        ds = _from_manifest(source, split, data_cfg, extras)
    elif source.is_dir() and _folder_has_audio(source):
        ds = _from_folder(source, split, data_cfg, extras)
    else:
        return _from_hub(data_cfg, split, extras)
    if data_cfg.streaming:
        # One shard per loader worker, so each worker streams its own part.
        stream = ds.to_iterable_dataset(num_shards=max(1, min(len(ds), data_cfg.dataloader_num_workers)))
        return _undecoded_audio(stream, "audio")
    return _filter_by_duration(ds, data_cfg, f"{data_cfg.dataset_name}[{split}]")


def _extra_columns(columns: Sequence[str]) -> list[str]:
    if isinstance(columns, str):  # "speaker" would otherwise ask for columns s, p, e, ...
        raise DataError(f"load_audio_dataset: columns={columns!r}, expected a list of column names")
    clash = sorted({c for c in columns if c in RESERVED_COLUMNS} - {"text", "label"})
    if clash:
        raise DataError(f"load_audio_dataset: column(s) {', '.join(clash)} clash with names the batches use; "
                        f"reserved: {', '.join(sorted(RESERVED_COLUMNS))}")
    # "text"/"label" asked for by name are the canonical columns, which are kept anyway.
    return [c for c in dict.fromkeys(columns) if c not in ("text", "label")]


def _folder_has_audio(folder: Path) -> bool:
    return any((folder / name).is_file() for name in METADATA_NAMES) or bool(_audio_files(folder))


def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())


def _from_folder(folder: Path, split: str, cfg: DataConfig, extras: list[str]) -> datasets.Dataset:
    for name in METADATA_NAMES:
        if (folder / name).is_file():
            return _from_manifest(folder / name, split, cfg, extras)
    _check_split(split, ["train"], folder)  # a bare folder of audio is one "train" split
    if extras:
        logger.warning("%s: a folder without metadata has no column %s", folder, ", ".join(map(repr, extras)))
    files = _audio_files(folder)
    rows = {"id": [_utterance_id(p.relative_to(folder)) for p in files], "audio": [str(p) for p in files]}
    return datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio(decode=False))


def _from_manifest(manifest: Path, split: str, cfg: DataConfig, extras: list[str]) -> datasets.Dataset:
    rows = _read_rows(manifest)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    audio_col = _audio_column(columns, cfg.audio_column_name, manifest)
    if "split" in columns:
        _check_split(split, sorted({str(row.get("split")) for row in rows}), manifest)
        rows = [row for row in rows if str(row.get("split")) == split]
    else:
        _check_split(split, ["train"], manifest)
    for index, row in enumerate(rows):
        rel = str(row.get(audio_col) or "")
        if row.get("id") in (None, ""):
            row["id"] = _utterance_id(Path(rel)) if rel else f"row{index:06d}"
        row["id"] = str(row["id"])
        row[audio_col] = str(manifest.parent / rel) if rel else ""  # absolute paths stay absolute
    ds = datasets.Dataset.from_list(rows)
    return _canonical(ds, cfg, audio_col, ds.column_names, str(manifest), extras)


def _read_rows(manifest: Path) -> list[dict]:
    suffix = manifest.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise DataError(f"{manifest}: expected a .csv or .jsonl manifest, an audio folder or a hub dataset id")
    with open(manifest, encoding="utf-8", newline="") as fh:
        if suffix == ".csv":
            return [dict(row) for row in csv.DictReader(fh)]
        rows = []
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{manifest}:{lineno}: not JSON lines ({err.msg})") from None
        return rows


def _from_hub(cfg: DataConfig, split: str, extras: list[str]) -> AnyDataset:
    name = cfg.dataset_name
    try:
        ds = datasets.load_dataset(name, cfg.dataset_config_name, split=split, streaming=cfg.streaming)
    except ValueError as err:
        match = re.search(r"Unknown split \"(.*)\"\. Should be one of (\[.*\])", str(err))
        if not match:
            raise
        raise DataError(f"{name}: unknown split {split!r}; available: {', '.join(ast.literal_eval(match[2]))}") from None
    except (FileNotFoundError, ConnectionError) as err:  # DatasetNotFoundError is a FileNotFoundError
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"{name}: not an audio folder or manifest, and load_dataset failed: {reason}") from None
    columns = ds.column_names
    if columns is None:  # streaming with unknown features: the first raw row names them
        columns = list(next(iter(ds)).keys())
    if cfg.audio_column_name not in columns:
        raise DataError(f"{name}: no audio column {cfg.audio_column_name!r}; columns: {', '.join(columns)}")
    ds = _canonical(ds, cfg, cfg.audio_column_name, columns, name, extras)
    if "id" not in columns and cfg.streaming:  # not map's index: it restarts in every shard
        ds = ds.map(_stream_id, input_columns=["audio"])
    elif "id" not in columns:  # add_column, not map: map would rewrite every audio byte
        ds = ds.add_column("id", [f"{split}-{i:08d}" for i in range(len(ds))])
    return ds if cfg.streaming else _filter_by_duration(ds, cfg, f"{name}[{split}]")


def _stream_id(audio: Any) -> dict:
    """An id for a streamed row from its audio: the same on every rank, worker, shard and shuffle.

    A path alone (a file on disk) gives its path without suffix, like folder sources. Embedded
    bytes add a short sha1 of the bytes: hub datasets store only the file's basename as the
    path, so spk1/001.wav and spk2/001.wav both arrive as 001.wav ("001-1f0c9a2b"); bytes without
    a path give "sha1-<16 hex>". Rows that hold the same bytes under the same name share an id.
    """
    data, path = (audio.get("bytes"), audio.get("path")) if isinstance(audio, Mapping) else (None, audio)
    stem = ""
    if path:
        name = PurePosixPath(str(path))
        stem = _utterance_id(name) if name.name else str(path)
    if data is None:
        return {"id": stem or "no-audio"}  # no audio at all: the loader skips it as missing
    digest = hashlib.sha1(data).hexdigest()
    return {"id": f"{stem}-{digest[:8]}" if stem else f"sha1-{digest[:16]}"}


def _canonical(ds: AnyDataset, cfg: DataConfig, audio_col: str, columns: list[str], source: str,
               extras: Sequence[str] = ()) -> AnyDataset:
    """Keep id/audio/text/label under canonical names and `extras` under their own; drop the rest
    (it would ride every batch)."""
    keep = {"id": "id"} if "id" in columns else {}
    keep[audio_col] = "audio"
    for name, canon in ((cfg.text_column_name, "text"), (cfg.label_column_name, "label")):
        if name and name in columns:
            keep[name] = canon
        elif name:
            logger.info("%s: no %r column, continuing without %s", source, name, canon)
    copies = {}  # an extra that is also renamed to text/label: copied back under its own name
    for name in extras:
        if name not in columns:
            logger.warning("%s: no %r column; probes of it are skipped (columns: %s)", source, name, ", ".join(columns))
        elif keep.get(name) in ("text", "label"):
            copies[name] = keep[name]
        elif name == audio_col:
            logger.warning("%s: %r is the audio column, not a label; not kept as one", source, name)
        else:
            keep[name] = name
    ds = _undecoded_audio(ds, audio_col)
    ds = ds.select_columns(list(keep))
    ds = ds.rename_columns({old: new for old, new in keep.items() if old != new})
    for name, canon in copies.items():
        if isinstance(ds, datasets.Dataset):  # add_column, not map: map would rewrite every audio byte
            ds = ds.add_column(name, list(ds[canon]))
        else:
            ds = ds.map(lambda value, _name=name: {_name: value}, input_columns=[canon])
    return ds


def _undecoded_audio(ds: AnyDataset, column: str) -> AnyDataset:
    """Make the audio column yield {"path", "bytes"} without ever touching torchcodec.

    Done first, because a streamed dataset replays every later step through its features. Map-style:
    Audio(decode=False). Streamed: even Audio(decode=False) fails, since python-level steps (shuffle
    buffer, map) re-encode rows with Audio.encode_example, which imports torchcodec; so an Audio
    column becomes the plain struct it is stored as. A string column stays a path; unknown
    features mean raw rows.
    """
    if isinstance(ds, datasets.Dataset):
        return ds.cast_column(column, datasets.Audio(decode=False))
    if ds.features is not None and isinstance(ds.features.get(column), datasets.Audio):
        return ds.cast_column(column, {"bytes": datasets.Value("binary"), "path": datasets.Value("string")})
    return ds


def _audio_column(columns: list[str], wanted: str, source: Path) -> str:
    for name in (wanted, *AUDIO_FALLBACKS):
        if name in columns:
            return name
    tried = "/".join(AUDIO_FALLBACKS)
    raise DataError(f"{source}: no audio column {wanted!r} (nor {tried}); columns: {', '.join(columns) or 'none'}")


def _check_split(split: str, available: list[str], source: Union[str, Path]) -> None:
    if split not in available:
        raise DataError(f"{source}: unknown split {split!r}; available: {', '.join(available)}")


def _utterance_id(relative: PurePath) -> str:
    # The relative path without suffix: unique where bare stems (spk1/001, spk2/001) are not.
    return relative.with_suffix("").as_posix()


def _filter_by_duration(ds: datasets.Dataset, cfg: DataConfig, source: str) -> datasets.Dataset:
    # Map to a two-column side table and join it: mapping in place would copy every audio byte.
    info = ds.map(
        header_durations, batched=True, input_columns=["audio"], remove_columns=ds.column_names, desc="audio headers"
    )
    reasons = list(info["unreadable"])
    for i, seconds in enumerate(info["duration"]):
        if not reasons[i] and seconds == 0:
            reasons[i] = "empty"
        elif not reasons[i] and seconds < cfg.min_duration_in_seconds:
            reasons[i] = "too_short"
        elif not reasons[i] and seconds > cfg.max_duration_in_seconds:
            reasons[i] = "too_long"
    ds = datasets.concatenate_datasets([ds, info.select_columns(["duration"])], axis=1)
    skipped = SkipCounter()
    for reason in filter(None, reasons):
        skipped.add(reason)
    if skipped.total:
        ds = ds.select([i for i, reason in enumerate(reasons) if not reason])
        logger.warning("%s: %s; %d left", source, skipped.summary(), len(ds))
    hours = float(np.sum(ds["duration"])) / 3600 if len(ds) else 0.0
    logger.info("%s: %d utterances, %.2f h", source, len(ds), hours)
    return ds

