"""Speech data for distillation: rows `{"id", "audio", text?, label?}` -> padding-free batches.

`load_audio_dataset` (distill/data/sources.py, re-exported here) loads a hub dataset, an audio folder
or a manifest; audio is decoded with soundfile + soxr in the loader workers (distill/data/audio.py).

Training batches hold no padding (group-norm teachers change under zero padding even with an
attention mask): utterances are length-bucketed and every batch is cropped to one common length
of 320 n + 80 samples, i.e. exactly n wav2vec frames, starting on multiples of 320 samples.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import BatchSampler, DataLoader, Sampler

from .audio import RECEPTIVE_FIELD, BadAudio, SkipCounter, crop_batch, crop_length, decode_audio, header_durations
from ..config import DataConfig
from .sources import AnyDataset, DataError, load_audio_dataset

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
    "rank_share",
]

logger = logging.getLogger(__name__)

_ROW_COLUMNS = ("id", "audio", "text", "label", "duration")  # what a batch holds as ids/waveforms/texts/labels


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
    """Streaming: decode `bucket_size` utterances, sort them by length, emit cropped batches.

    A bucket's skip counts ride on its first batch. Skips after the last bucket join the worker's
    last batch, so only a worker that kept nothing at all yields an empty batch (B = 0, with its
    skip counts).
    """

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
        held = None  # each batch waits for the next, so a trailing B = 0 batch can fold into it
        for batch in self._bucket_batches():
            if held is not None and not batch["ids"]:
                held["skipped"] = dict(Counter(held["skipped"]) + Counter(batch["skipped"]))
                continue
            if held is not None:
                yield held
            held = batch
        if held is not None:
            yield held

    def _bucket_batches(self) -> Iterator[dict]:
        """Every batch holds items, but the last one may be B = 0: skips after the last bucket."""
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
        if buffer:
            yield from self._emit(buffer, skipped, (worker, bucket_index))
        elif skipped:
            yield crop_batch([], [], np.random.default_rng(0), _max_crop(self.cfg), dict(skipped))

    def _emit(self, buffer: list, skipped: Counter, tag: tuple[int, int]) -> Iterator[dict]:
        rng = np.random.default_rng([self.seed % 2**32, self.epoch, *tag])
        buffer.sort(key=lambda pair: len(pair[1]))
        chunks = [buffer[i : i + self.batch_size] for i in range(0, len(buffer), self.batch_size)]
        for k, chunk_index in enumerate(rng.permutation(len(chunks))):
            ids, waves = zip(*chunks[chunk_index])
            # The skip counts ride on the bucket's first batch, so the trainer counts them once.
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
    `min_samples` are dropped and counted; a batch may be empty (B = 0): map-style when all its
    items were dropped, streamed only when a loader worker kept nothing at all.

    Map-style datasets use a batch sampler, so accelerate.prepare and skip_first_batches work;
    call `loader.set_epoch(epoch)` (on the prepared loader too) before iterating an epoch.
    Streaming datasets get an iterable loader: one process, or give each rank its own part
    first (`rank_share`) and do not pass the loader to accelerate.prepare.
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
        durations = header_durations(list(dataset["audio"]))["duration"]
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


def rank_share(dataset: datasets.IterableDataset, rank: int, world_size: int) -> datasets.IterableDataset:
    """The part of a streamed training set that process `rank` of `world_size` reads.

    Why: Accelerate cannot split this stream for us. A prepared iterable loader either has rank 0
    read and broadcast every batch (dispatch_batches), and a batch's string ids cannot be
    broadcast, or has every rank read the whole stream and keep a slice of it. So each rank streams its own part
    (datasets.distributed.split_dataset_by_node): whole shards (parquet files) go to ranks when
    `n_shards` is divisible by `world_size`; else every rank reads the full stream and keeps every
    `world_size`-th example (offset `rank`). The parts are disjoint and together hold every
    utterance; shuffling them afterwards with one seed on all ranks (make_train_dataloader does)
    keeps that (with every n-th example, the shuffle buffer runs before the pick, so a rank's
    utterances change from epoch to epoch, still disjoint from the others'). Parts may differ in size by up to a shard; train.py ends each epoch when the first
    rank runs out. Map-style datasets are not split here: Accelerate's prepared sampler does it.
    """
    if not isinstance(dataset, datasets.IterableDataset):
        raise TypeError(f"rank_share splits streamed datasets; got {type(dataset).__name__} "
                        f"(map-style data is split by the sampler accelerate.prepare shards)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank_share: rank {rank} is not in 0..{world_size - 1}")
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


# --------------------------------------------------------------------------- evaluation


def make_eval_batches(
    dataset: AnyDataset,
    data_cfg: DataConfig,
    batch_size: int,
    max_items: Optional[int] = None,
    min_samples: int = RECEPTIVE_FIELD,
) -> Iterator[dict]:
    """Whole utterances in dataset order, zero-padded: {"waveforms" float32 (B, S_max),
    "lengths" long (B,) true lengths, "ids", "skipped", "texts"/"labels" lists when the dataset
    has those columns, and one list per extra column (load_audio_dataset's `columns`) under its
    own name, one value per utterance, None or empty where a row has none}. The caller handles
    padding (the teacher runs items unpadded).

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
    # Every other column is an extra the caller asked load_audio_dataset to keep (it drops the rest).
    for column in (pending[0][0] if pending else ()):
        if column not in _ROW_COLUMNS:
            batch[column] = [item[column] for item, _ in pending]
    return batch

