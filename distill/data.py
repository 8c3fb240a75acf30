"""Speech data for distillation: any source -> `{"id", "audio", text?, label?}` -> padding-free batches.

Sources (`DataConfig.dataset_name`): a hub dataset id (or a local folder of parquet/arrow shards
laid out like a hub repo), a folder of audio files (with an optional metadata.csv/.jsonl), or a
CSV/JSONL manifest. Audio stays `{"path", "bytes"}` (`datasets.Audio(decode=False)`) and is
decoded with soundfile + soxr in the loader workers (distill/audio.py), never with torchcodec.

Training batches hold no padding (group-norm teachers change under zero padding even with an
attention mask): utterances are length-bucketed and every batch is cropped to one common length
of 320 n + 80 samples, i.e. exactly n wav2vec frames, starting on multiples of 320 samples.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import datasets
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

from .audio import RECEPTIVE_FIELD, BadAudio, SkipCounter, audio_duration, crop_batch, crop_length, decode_audio
from .config import DataConfig, RecipeError

__all__ = [
    "DataError",
    "BadAudio",
    "SkipCounter",
    "decode_audio",
    "crop_length",
    "load_audio_dataset",
    "LengthBucketSampler",
    "make_train_dataloader",
    "make_eval_batches",
]

logger = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
AUDIO_FALLBACKS = ("file_name", "path")  # manifest columns tried after audio_column_name

AnyDataset = Union[datasets.Dataset, datasets.IterableDataset]


class DataError(RecipeError):
    """A data source that cannot be used as configured; the message is one line."""


# --------------------------------------------------------------------------- loading


def load_audio_dataset(data_cfg: DataConfig, split: str) -> AnyDataset:
    """Load one split with canonical columns `id`, `audio` ({"path", "bytes"}), `text`, `label`.

    `text`/`label` are kept when the configured columns exist. Map-style datasets also get a
    `duration` column (seconds, from file headers) and lose utterances that are unreadable or
    outside [min, max]_duration_in_seconds; what was dropped is counted and logged.
    """
    source = Path(data_cfg.dataset_name).expanduser().resolve()  # absolute: workers may chdir
    if source.is_file():
        ds = _from_manifest(source, split, data_cfg)
    elif source.is_dir() and _folder_has_audio(source):
        ds = _from_folder(source, split, data_cfg)
    else:
        return _from_hub(data_cfg, split)
    if data_cfg.streaming:
        # One shard per loader worker, so each worker streams its own part.
        stream = ds.to_iterable_dataset(num_shards=max(1, min(len(ds), data_cfg.dataloader_num_workers)))
        return _undecoded_audio(stream, "audio")
    return _filter_by_duration(ds, data_cfg, f"{data_cfg.dataset_name}[{split}]")


def _folder_has_audio(folder: Path) -> bool:
    return any((folder / name).is_file() for name in METADATA_NAMES) or bool(_audio_files(folder))


def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())


def _from_folder(folder: Path, split: str, cfg: DataConfig) -> datasets.Dataset:
    for name in METADATA_NAMES:
        if (folder / name).is_file():
            return _from_manifest(folder / name, split, cfg)
    _check_split(split, ["train"], folder)  # a bare folder of audio is one "train" split
    files = _audio_files(folder)
    rows = {"id": [_utterance_id(p.relative_to(folder)) for p in files], "audio": [str(p) for p in files]}
    return datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio(decode=False))


def _from_manifest(manifest: Path, split: str, cfg: DataConfig) -> datasets.Dataset:
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
    return _canonical(ds, cfg, audio_col, ds.column_names, str(manifest))


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


def _from_hub(cfg: DataConfig, split: str) -> AnyDataset:
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
    ds = _canonical(ds, cfg, cfg.audio_column_name, columns, name)
    if "id" not in columns and cfg.streaming:
        ds = ds.map(_index_id, with_indices=True, fn_kwargs={"prefix": split})
    elif "id" not in columns:  # add_column, not map: map would rewrite every audio byte
        ds = ds.add_column("id", [f"{split}-{i:08d}" for i in range(len(ds))])
    return ds if cfg.streaming else _filter_by_duration(ds, cfg, f"{name}[{split}]")


def _index_id(row: dict, index: int, prefix: str) -> dict:
    return {"id": f"{prefix}-{index:08d}"}


def _canonical(ds: AnyDataset, cfg: DataConfig, audio_col: str, columns: list[str], source: str) -> AnyDataset:
    """Keep id/audio/text/label under canonical names; drop the rest (it would ride every batch)."""
    keep = {"id": "id"} if "id" in columns else {}
    keep[audio_col] = "audio"
    for name, canon in ((cfg.text_column_name, "text"), (cfg.label_column_name, "label")):
        if name and name in columns:
            keep[name] = canon
        elif name:
            logger.info("%s: no %r column, continuing without %s", source, name, canon)
    ds = _undecoded_audio(ds, audio_col)
    ds = ds.select_columns(list(keep))
    return ds.rename_columns({old: new for old, new in keep.items() if old != new})


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


def _utterance_id(relative: Path) -> str:
    # The relative path without suffix: unique where bare stems (spk1/001, spk2/001) are not.
    return relative.with_suffix("").as_posix()


def _filter_by_duration(ds: datasets.Dataset, cfg: DataConfig, source: str) -> datasets.Dataset:
    # Map to a two-column side table and join it: mapping in place would copy every audio byte.
    info = ds.map(
        _header_durations, batched=True, input_columns=["audio"], remove_columns=ds.column_names, desc="audio headers"
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


def _header_durations(audios: list[dict]) -> dict[str, list]:
    durations, unreadable = [], []
    for audio in audios:
        try:
            durations.append(audio_duration(audio))
            unreadable.append("")
        except BadAudio as err:
            durations.append(0.0)
            unreadable.append(err.reason)
    return {"duration": durations, "unreadable": unreadable}


# --------------------------------------------------------------------------- decoding rows


def _screen(
    item: Mapping[str, Any], sampling_rate: int, min_samples: int, max_samples: Optional[int] = None
) -> tuple[Optional[np.ndarray], Optional[str]]:
    """(wave, None) for a usable row, else (None, reason): missing/empty/corrupt/non_finite/too_*."""
    try:
        wave = decode_audio(item["audio"], sampling_rate)
    except BadAudio as err:
        logger.warning("skipping %s: %s", item.get("id", "?"), err)
        return None, err.reason
    if len(wave) < min_samples:
        return None, "too_short"
    if max_samples is not None and len(wave) > max_samples:
        return None, "too_long"
    return wave, None


def _max_crop(cfg: DataConfig) -> int:
    return int(cfg.max_crop_seconds * cfg.sampling_rate)


def _max_samples(cfg: DataConfig) -> int:
    return int(cfg.max_duration_in_seconds * cfg.sampling_rate)


# --------------------------------------------------------------------------- training batches


class LengthBucketSampler(Sampler[int]):
    """Row order for one epoch: shuffled buckets, sorted by duration inside, cut into batches.

    Buckets hold whole batches, so only the epoch's last batch can be short; the batch order is
    shuffled too. Everything follows from (seed, epoch), so workers and processes cannot change it.
    """

    def __init__(self, durations, batch_size: int, bucket_size: int, seed: int, epoch: int = 0) -> None:
        self.durations = np.asarray(durations, dtype=np.float64)
        self.batch_size = batch_size
        self.bucket_size = max(batch_size, bucket_size // batch_size * batch_size)
        self.seed = seed
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        """Accelerate's DataLoaderShard.set_epoch reaches this through BatchSampler.sampler."""
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed % 2**32, self.epoch])
        order = rng.permutation(len(self.durations))
        full, short = [], []
        for start in range(0, len(order), self.bucket_size):
            bucket = order[start : start + self.bucket_size]
            bucket = bucket[np.argsort(self.durations[bucket], kind="stable")]
            for i in range(0, len(bucket), self.batch_size):
                batch = bucket[i : i + self.batch_size].tolist()
                (full if len(batch) == self.batch_size else short).append(batch)
        return [full[i] for i in rng.permutation(len(full))] + short

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch

    def __len__(self) -> int:
        return len(self.durations)


class _TaggedBatches(BatchSampler):
    """Batches of (row, epoch, batch index). The collate seeds each batch's crops from the tags,
    so crops depend on neither worker count, process count nor batches skipped on resume."""

    sampler: LengthBucketSampler

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch = self.sampler.epoch
        for index, batch in enumerate(self.sampler.batches()):
            yield [(row, epoch, index) for row in batch]


class _DecodedRows(torch.utils.data.Dataset):
    def __init__(self, dataset: datasets.Dataset, sampling_rate: int, min_samples: int) -> None:
        self.dataset = dataset.select_columns(["id", "audio"])
        self.sampling_rate, self.min_samples = sampling_rate, min_samples

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        row, epoch, batch_index = key
        item = self.dataset[row]
        wave, reason = _screen(item, self.sampling_rate, self.min_samples)
        return {"id": str(item["id"]), "wave": wave, "reason": reason, "tag": (epoch, batch_index)}


class _CropCollate:
    def __init__(self, seed: int, max_crop: int) -> None:
        self.seed, self.max_crop = seed, max_crop

    def __call__(self, items: list[dict]) -> dict:
        kept = [item for item in items if item["reason"] is None]
        skipped = dict(Counter(item["reason"] for item in items if item["reason"] is not None))
        rng = np.random.default_rng([self.seed % 2**32, *items[0]["tag"]])
        return crop_batch([item["id"] for item in kept], [item["wave"] for item in kept], rng, self.max_crop, skipped)


class _StreamingBuckets(torch.utils.data.IterableDataset):
    """Streaming: decode `bucket_size` utterances, sort them by length, emit cropped batches."""

    def __init__(
        self, dataset: datasets.IterableDataset, cfg: DataConfig, batch_size: int, seed: int, min_samples: int, epoch: int
    ) -> None:
        self.dataset = dataset.shuffle(seed=seed, buffer_size=cfg.bucket_size)
        self.cfg, self.batch_size, self.seed, self.epoch = cfg, batch_size, seed, epoch
        # No header pass when streaming: min/max duration are applied after decoding.
        self.min_samples = max(min_samples, int(cfg.min_duration_in_seconds * cfg.sampling_rate))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        self.dataset.set_epoch(self.epoch)
        buffer, skipped, bucket_index = [], Counter(), 0
        for item in self.dataset:
            wave, reason = _screen(item, self.cfg.sampling_rate, self.min_samples, _max_samples(self.cfg))
            if reason:
                skipped[reason] += 1
                continue
            buffer.append((str(item["id"]), wave))
            if len(buffer) >= self.cfg.bucket_size:
                yield from self._emit(buffer, skipped, (worker, bucket_index))
                buffer, skipped, bucket_index = [], Counter(), bucket_index + 1
        if buffer or skipped:
            yield from self._emit(buffer, skipped, (worker, bucket_index))

    def _emit(self, buffer: list, skipped: Counter, tag: tuple[int, int]) -> Iterator[dict]:
        rng = np.random.default_rng([self.seed % 2**32, self.epoch, *tag])
        buffer.sort(key=lambda pair: len(pair[1]))
        chunks = [buffer[i : i + self.batch_size] for i in range(0, len(buffer), self.batch_size)] or [[]]
        for k, chunk_index in enumerate(rng.permutation(len(chunks))):
            ids, waves = zip(*chunks[chunk_index]) if chunks[chunk_index] else ((), ())
            # The bucket's skip counts ride on its first batch, so the trainer counts them once.
            yield crop_batch(list(ids), list(waves), rng, _max_crop(self.cfg), dict(skipped) if k == 0 else {})


def make_train_dataloader(
    dataset: AnyDataset,
    data_cfg: DataConfig,
    batch_size: int,
    seed: int,
    min_samples: int = RECEPTIVE_FIELD,
    epoch: int = 0,
) -> DataLoader:
    """Length-bucketed, padding-free training batches.

    Yields {"waveforms" float32 (B, S), "lengths" long (B,) all == S, "ids" list[str],
    "starts" long (B,) crop start sample, "skipped" {reason: count}} with S = 320 n + 80 <=
    min(max_crop_seconds * sr, shortest item). Unreadable items and items shorter than
    `min_samples` are dropped and counted; a batch may be empty (B = 0).

    Map-style datasets use a batch sampler, so accelerate.prepare and skip_first_batches work;
    call `loader.set_epoch(epoch)` (on the prepared loader too) before iterating an epoch.
    Streaming datasets get an iterable loader: one process, or split the dataset per rank
    first (datasets.distributed.split_dataset_by_node) and prepare with dispatch_batches=False.
    """
    if _max_crop(data_cfg) < RECEPTIVE_FIELD:  # fail here, not inside a loader worker
        seconds = data_cfg.max_crop_seconds
        raise DataError(f"data.max_crop_seconds={seconds} is shorter than one {RECEPTIVE_FIELD}-sample frame")
    min_samples = max(min_samples, RECEPTIVE_FIELD)
    workers = data_cfg.dataloader_num_workers
    if isinstance(dataset, datasets.IterableDataset):
        stream = _StreamingBuckets(dataset, data_cfg, batch_size, seed, min_samples, epoch)
        return DataLoader(stream, batch_size=None, num_workers=workers)
    if len(dataset) == 0:
        raise DataError(f"{data_cfg.dataset_name}: no utterances left to train on (see the filtering log)")
    if "duration" in dataset.column_names:
        durations = dataset["duration"]
    else:  # a dataset built elsewhere: unreadable rows sort first and are counted when decoded
        durations = _header_durations(list(dataset["audio"]))["duration"]
    sampler = LengthBucketSampler(durations, batch_size, data_cfg.bucket_size, seed, epoch)
    return DataLoader(
        _DecodedRows(dataset, data_cfg.sampling_rate, min_samples),
        batch_sampler=_TaggedBatches(sampler, batch_size, drop_last=False),
        collate_fn=_CropCollate(seed, _max_crop(data_cfg)),
        num_workers=workers,
        # Each new iterator draws a base seed; from a private generator that draw cannot shift
        # the global RNG, so dropout after a resume (a fresh iterator mid-epoch) matches.
        generator=torch.Generator().manual_seed(seed),
    )


# --------------------------------------------------------------------------- evaluation


def make_eval_batches(
    dataset: AnyDataset,
    data_cfg: DataConfig,
    batch_size: int,
    max_items: Optional[int] = None,
    min_samples: int = RECEPTIVE_FIELD,
) -> Iterator[dict]:
    """Whole utterances in dataset order, zero-padded: {"waveforms" float32 (B, S_max),
    "lengths" long (B,) true lengths, "ids", "skipped", and "texts"/"labels" lists when the
    dataset has those columns}. The caller handles padding (the teacher runs items unpadded).

    Reads at most `max_items` rows; unreadable, too short and too long ones go to "skipped".
    """
    rows: Any = dataset
    if max_items is not None and isinstance(dataset, datasets.IterableDataset):
        rows = dataset.take(max_items)
    elif max_items is not None:
        rows = dataset.select(range(min(max_items, len(dataset))))
    pending, skipped = [], Counter()
    for item in rows:
        wave, reason = _screen(item, data_cfg.sampling_rate, min_samples, _max_samples(data_cfg))
        if reason:
            skipped[reason] += 1
            continue
        pending.append((item, wave))
        if len(pending) == batch_size:
            yield _pad_batch(pending, dict(skipped))
            pending, skipped = [], Counter()
    if pending or skipped:
        yield _pad_batch(pending, dict(skipped))


def _pad_batch(pending: list[tuple[Mapping, np.ndarray]], skipped: dict) -> dict:
    lengths = [len(wave) for _, wave in pending]
    waveforms = torch.zeros(len(pending), max(lengths, default=0))
    for row, (_, wave) in enumerate(pending):
        waveforms[row, : len(wave)] = torch.from_numpy(wave)
    ids = [str(item["id"]) for item, _ in pending]
    batch = {"waveforms": waveforms, "lengths": torch.tensor(lengths, dtype=torch.long), "ids": ids, "skipped": skipped}
    for column, key in (("text", "texts"), ("label", "labels")):
        if pending and column in pending[0][0]:
            batch[key] = [item[column] for item, _ in pending]
    return batch

