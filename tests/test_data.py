"""Data layer: decoding, sources, filtering, padding-free crops, determinism, accelerate seams.

Every audio fixture is written here with soundfile; only the committed demo corpus is read
from the repository.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from datasets.distributed import split_dataset_by_node

from distill.config import DataConfig
from distill.data.loader import (
    BadAudio,
    DataError,
    SkipCounter,
    crop_length,
    decode_audio,
    load_audio_dataset,
    make_eval_batches,
    make_train_dataloader,
    rank_share,
)

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
SR = 16000


def _tone(seconds: float, sr: int = SR, freq: float = 220.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


def _stereo_44k(path: Path) -> None:
    """Two different channels at 44.1 kHz: exercises both the mono mix and the resampler."""
    left, right = _tone(1.3, 44100, 220.0, seed=1), _tone(1.3, 44100, 330.0, seed=2)
    sf.write(path, np.stack([left, right], axis=1), 44100, subtype="PCM_24")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Good clips of varied length plus one of each kind of bad file."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "clips").mkdir()
    for i, seconds in enumerate([0.8, 1.0, 1.25, 1.5, 1.7, 2.0, 2.3, 2.6]):
        sf.write(root / "clips" / f"good{i}.wav", _tone(seconds, freq=150 + 20 * i, seed=i), SR, subtype="PCM_16")
    _stereo_44k(root / "clips" / "stereo44k.flac")
    (root / "corrupt.wav").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (root / "empty.wav").write_bytes(b"")
    sf.write(root / "nan.wav", np.full(SR, np.nan, dtype=np.float32), SR, subtype="FLOAT")
    sf.write(root / "short.wav", _tone(0.0125), SR)  # 200 samples: under one 400-sample frame
    return root


def _cfg(source, **overrides) -> DataConfig:
    return DataConfig(dataset_name=str(source), **overrides)


def _good_and_bad(corpus: Path) -> list[str]:
    good = sorted(str(p) for p in (corpus / "clips").glob("good*.wav"))
    bad = [str(corpus / n) for n in ("corrupt.wav", "empty.wav", "nan.wav", "short.wav", "missing.wav")]
    return good + bad


def _raw_dataset(paths: list[str]) -> datasets.Dataset:
    """Unfiltered rows, so bad files reach the loader and must be counted there."""
    ids = [Path(p).stem for p in paths]
    return datasets.Dataset.from_dict({"id": ids, "audio": paths}).cast_column("audio", datasets.Audio(decode=False))


# --------------------------------------------------------------------------- decoding


def test_decode_resamples_and_mixes_to_mono(corpus):
    path = corpus / "clips" / "stereo44k.flac"
    stereo, rate = sf.read(path, dtype="float32", always_2d=True)
    expected = soxr.resample(stereo.mean(axis=1), rate, SR, quality="HQ")
    wave = decode_audio(str(path))
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - round(len(stereo) * SR / rate)) <= 1
    np.testing.assert_allclose(wave, expected, atol=1e-6)
    # The same file as embedded bytes (how hub parquet datasets arrive) decodes identically.
    from_bytes = decode_audio({"bytes": path.read_bytes(), "path": "anything.flac"})
    np.testing.assert_array_equal(from_bytes, wave)


def test_decode_native_rate_is_untouched(corpus):
    path = corpus / "clips" / "good0.wav"
    raw, _ = sf.read(path, dtype="float32")
    np.testing.assert_array_equal(decode_audio({"path": str(path), "bytes": None}), raw)


@pytest.mark.parametrize(
    "name, reason",
    [("corrupt.wav", "corrupt"), ("empty.wav", "empty"), ("nan.wav", "non_finite"), ("missing.wav", "missing")],
)
def test_decode_bad_audio_reasons(corpus, name, reason):
    with pytest.raises(BadAudio) as err:
        decode_audio(corpus / name)
    assert err.value.reason == reason
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_crop_length_is_whole_frames():
    assert crop_length(400) == 400
    assert crop_length(719) == 400
    assert crop_length(720) == 720
    assert crop_length(64000) == 63760  # 4 s: 199 frames
    with pytest.raises(ValueError):
        crop_length(399)


def test_skip_counter_summary():
    counter = SkipCounter({"too_short": 1})
    counter.add({"corrupt": 1, "too_short": 1, "empty": 0})
    assert counter.summary() == "skipped 3 utterances: corrupt=1 too_short=2"
    assert counter.counts == {"corrupt": 1, "too_short": 2} and counter.total == 3
    assert SkipCounter().summary() == "skipped 0 utterances"


# --------------------------------------------------------------------------- sources


def _write_manifest(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".csv":
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_manifest_resolves_relative_paths_and_filters(corpus, suffix, caplog):
    names = ["clips/good1.wav", "clips/good5.wav", "corrupt.wav", "empty.wav", "short.wav", "nowhere/missing.wav"]
    rows = [{"path": n, "text": f"utterance {i}", "label": "a" if i % 2 else "b"} for i, n in enumerate(names)]
    manifest = corpus / f"manifest{suffix}"
    _write_manifest(manifest, rows)
    with caplog.at_level(logging.INFO, logger="distill.data.sources"):
        ds = load_audio_dataset(_cfg(manifest), "train")
    assert ds.column_names == ["id", "audio", "text", "label", "duration"]
    assert list(ds["id"]) == ["clips/good1", "clips/good5"]
    assert list(ds["text"]) == ["utterance 0", "utterance 1"]
    assert ds[0]["audio"] == {"bytes": None, "path": str(corpus / "clips" / "good1.wav")}
    assert list(ds["duration"]) == pytest.approx([1.0, 2.0])
    assert "skipped 4 utterances: corrupt=1 empty=1 missing=1 too_short=1" in caplog.text


def test_folder_with_metadata_selects_split(corpus, tmp_path):
    folder = tmp_path / "ds"
    (folder / "wav").mkdir(parents=True)
    rows = []
    for i, split in enumerate(["train", "train", "dev"]):
        sf.write(folder / "wav" / f"u{i}.flac", _tone(1.0 + i / 4, seed=i), SR)
        rows.append({"file_name": f"wav/u{i}.flac", "text": f"t{i}", "label": str(i), "split": split})
    _write_manifest(folder / "metadata.csv", rows)
    train, dev = load_audio_dataset(_cfg(folder), "train"), load_audio_dataset(_cfg(folder), "dev")
    assert list(train["id"]) == ["wav/u0", "wav/u1"] and list(dev["id"]) == ["wav/u2"]
    assert list(dev["label"]) == ["2"] and list(dev["text"]) == ["t2"]
    with pytest.raises(DataError, match=r"unknown split 'test'; available: dev, train$"):
        load_audio_dataset(_cfg(folder), "test")


def test_bare_folder_globs_audio_recursively(corpus):
    ds = load_audio_dataset(_cfg(corpus / "clips"), "train")
    assert set(ds["id"]) == {f"good{i}" for i in range(8)} | {"stereo44k"}
    assert "text" not in ds.column_names
    with pytest.raises(DataError, match=r"unknown split 'dev'; available: train$"):
        load_audio_dataset(_cfg(corpus / "clips"), "dev")


def test_missing_audio_column_is_one_line(corpus, tmp_path):
    manifest = tmp_path / "m.csv"
    _write_manifest(manifest, [{"wav": "a.wav", "sentence": "hi"}])
    with pytest.raises(DataError) as err:
        load_audio_dataset(_cfg(manifest, audio_column_name="speech"), "train")
    message = str(err.value)
    assert "\n" not in message
    assert "'speech'" in message and "columns: wav, sentence" in message


def test_hub_style_parquet_folder(tmp_path, monkeypatch):
    """The load_dataset path, offline: a local folder laid out like a hub repo, audio as bytes."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    payloads = []
    for i in range(3):
        path = tmp_path / f"clip{i}.wav"
        sf.write(path, _tone(0.75 + i / 2, seed=i), SR)
        payloads.append({"bytes": path.read_bytes(), "path": f"clip{i}.wav"})
    table = datasets.Dataset.from_dict({"speech": payloads, "sentence": ["a", "b", "c"]})
    shard = tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"
    table.cast_column("speech", datasets.Audio()).to_parquet(str(shard))
    cfg = _cfg(tmp_path / "repo", audio_column_name="speech", text_column_name="sentence")
    ds = load_audio_dataset(cfg, "train")
    assert list(ds["id"]) == ["train-00000000", "train-00000001", "train-00000002"]
    assert list(ds["text"]) == ["a", "b", "c"] and list(ds["duration"]) == pytest.approx([0.75, 1.25, 1.75])
    assert ds[0]["audio"]["bytes"] == payloads[0]["bytes"]
    with pytest.raises(DataError, match=r"unknown split 'dev'; available: train$"):
        load_audio_dataset(cfg, "dev")
    with pytest.raises(DataError, match=r"no audio column 'audio'; columns: speech, sentence$"):
        load_audio_dataset(_cfg(tmp_path / "repo"), "train")
    # Streaming replays rows through python steps (shuffle buffer, id map) that would re-encode
    # an Audio feature with torchcodec; the loader must still get plain {"path", "bytes"}.
    # datasets sleeps 5 s after a shuffled parquet stream ends (an arrow thread-shutdown workaround).
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    stream_cfg = _cfg(tmp_path / "repo", audio_column_name="speech", text_column_name="sentence", streaming=True)
    stream = load_audio_dataset(stream_cfg, "train")
    batches = list(make_train_dataloader(stream, stream_cfg, batch_size=2, seed=0))
    # Streamed rows without an id column are named by their audio (basename + sha1 of the bytes).
    expected = [f"clip{i}-{hashlib.sha1(p['bytes']).hexdigest()[:8]}" for i, p in enumerate(payloads)]
    assert sorted(uid for b in batches for uid in b["ids"]) == expected
    evaluated = list(make_eval_batches(stream, stream_cfg, batch_size=2))
    assert [b["texts"] for b in evaluated] == [["a", "b"], ["c"]]


def _hub_repo(root: Path, payloads: list[dict], shards: int) -> Path:
    """A local folder laid out like a hub dataset repo: `shards` parquet files, audio embedded."""
    table = datasets.Dataset.from_dict({"audio": payloads}).cast_column("audio", datasets.Audio())
    per = -(-len(payloads) // shards)
    for k in range(shards):
        shard = root / "data" / f"train-{k:05d}-of-{shards:05d}.parquet"
        table.select(range(k * per, min(len(payloads), (k + 1) * per))).to_parquet(str(shard))
    return root


def test_streamed_hub_ids_are_unique_and_stable(tmp_path, monkeypatch):
    """No id column, streamed: ids come from the rows, not from per-shard row numbers, so two
    ranks of a split and every shuffle see each utterance under one id, and only once."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    payloads = []
    for i in range(8):
        sf.write(tmp_path / "clip.wav", _tone(0.5 + i / 8, seed=i), SR)
        # Two speakers' "001.wav" (hub parquet keeps basenames only) and one clip with no path.
        path = None if i == 7 else ("001.wav" if i in (2, 5) else f"clip{i}.wav")
        payloads.append({"bytes": (tmp_path / "clip.wav").read_bytes(), "path": path})
    cfg = _cfg(_hub_repo(tmp_path / "repo", payloads, shards=2), streaming=True)
    stream = load_audio_dataset(cfg, "train")
    assert stream.n_shards == 2
    ids = [row["id"] for row in stream]
    digests = [hashlib.sha1(p["bytes"]).hexdigest() for p in payloads]
    assert ids[:2] == [f"clip0-{digests[0][:8]}", f"clip1-{digests[1][:8]}"]
    assert ids[2] == f"001-{digests[2][:8]}" != ids[5] and ids[7] == f"sha1-{digests[7][:16]}"
    assert len(set(ids)) == 8
    ranks = [[row["id"] for row in split_dataset_by_node(stream, rank=r, world_size=2)] for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == sorted(ids)
    for epoch in range(2):
        shuffled = stream.shuffle(seed=0, buffer_size=3)
        shuffled.set_epoch(epoch)
        assert sorted(row["id"] for row in shuffled) == sorted(ids)
    assert [row["id"] for row in load_audio_dataset(cfg, "train")] == ids  # stable across loads
    batches = list(make_train_dataloader(stream, cfg, batch_size=3, seed=0))
    assert sorted(uid for b in batches for uid in b["ids"]) == sorted(ids)


@pytest.mark.parametrize("shards, utterances", [(2, 8), (1, 7)])
def test_streaming_ranks_read_disjoint_parts_that_cover_the_corpus(tmp_path, monkeypatch, shards, utterances):
    """data.streaming with 2 processes: every rank trains on different utterances, all of them
    together. 2 shards: whole shards per rank; 1 shard of an odd count: every 2nd example (and 3
    ranks over 2 shards likewise, 2 not dividing by 3)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    payloads = []
    for i in range(utterances):
        sf.write(tmp_path / "clip.wav", _tone(1.0 + i / 8, seed=i), SR)
        payloads.append({"bytes": (tmp_path / "clip.wav").read_bytes(), "path": f"clip{i}.wav"})
    cfg = _cfg(_hub_repo(tmp_path / "repo", payloads, shards=shards), streaming=True, bucket_size=3)
    stream = load_audio_dataset(cfg, "train")
    assert stream.n_shards == shards
    ids = [row["id"] for row in stream]
    assert len(set(ids)) == utterances
    parts = [[row["id"] for row in rank_share(stream, rank, 2)] for rank in range(2)]
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(ids)
    if shards == 2:  # shard k (the k-th half of the files) is rank k's
        assert parts == [ids[:4], ids[4:]]
    else:  # one shard cannot be split: rank r keeps examples r, r + 2, ...
        assert parts == [ids[0::2], ids[1::2]]
        assert len(parts[0]) == len(parts[1]) + 1
    three = [[row["id"] for row in rank_share(stream, rank, 3)] for rank in range(3)]
    assert three == [ids[0::3], ids[1::3], ids[2::3]]
    # What train.py feeds each rank: its part, shuffled with the shared seed, epoch after epoch.
    for epoch in range(2):
        seen = []
        for rank in range(2):
            loader = make_train_dataloader(rank_share(stream, rank, 2), cfg, batch_size=2, seed=0, epoch=epoch)
            batches = list(loader)
            assert all(not b["skipped"] for b in batches)
            seen.append([uid for b in batches for uid in b["ids"]])
        # (with one shard the buffer shuffles before the every-2nd pick, so the parts change per epoch)
        assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(ids), epoch
        if shards == 2:
            assert sorted(seen[0]) == sorted(parts[0]), epoch
    with pytest.raises(TypeError, match="rank_share splits streamed datasets"):
        rank_share(datasets.Dataset.from_dict({"id": ["a"]}), 0, 2)
    with pytest.raises(ValueError, match=r"rank 2 is not in 0\.\.1"):
        rank_share(stream, 2, 2)


def test_unknown_hub_dataset_is_one_line():
    with pytest.raises(DataError) as err:
        load_audio_dataset(_cfg("no-such-owner/no-such-set"), "train")
    assert str(err.value).startswith("no-such-owner/no-such-set: not an audio folder or manifest, and load_dataset failed:")
    assert "\n" not in str(err.value)


def test_demo_corpus_loads():
    cfg = _cfg(DEMO)
    train, dev = load_audio_dataset(cfg, "train"), load_audio_dataset(cfg, "dev")
    assert (len(train), len(dev)) == (32, 8)
    labels = sorted(set(train["label"]))
    assert len(labels) == 4
    assert all(list(train["label"]).count(lab) == 8 and list(dev["label"]).count(lab) == 2 for lab in labels)
    assert all(text and text == text.lower() for text in [*train["text"], *dev["text"]])
    durations = [*train["duration"], *dev["duration"]]
    assert 1.5 <= min(durations) and max(durations) <= 4.0
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) < 2_000_000
    with open(DEMO / "metadata.csv", newline="") as fh:
        assert all(row["phonemes"] for row in csv.DictReader(fh))


# --------------------------------------------------------------------------- training batches


def _check_crops(batches: list[dict], dataset: datasets.Dataset, max_crop: int) -> None:
    waves = {row["id"]: decode_audio(row["audio"]) for row in dataset}
    for batch in batches:
        size = batch["waveforms"].shape[1]
        assert batch["waveforms"].dtype == torch.float32
        assert (size - 80) % 320 == 0 and 400 <= size <= max_crop
        assert batch["lengths"].tolist() == [size] * len(batch["ids"])
        for uid, start, crop in zip(batch["ids"], batch["starts"].tolist(), batch["waveforms"]):
            assert start % 320 == 0 and start + size <= len(waves[uid])
            np.testing.assert_array_equal(crop.numpy(), waves[uid][start : start + size])


def test_train_batches_are_frame_aligned_crops(corpus):
    cfg = _cfg(corpus / "clips", bucket_size=4, max_crop_seconds=1.5)
    ds = load_audio_dataset(cfg, "train")
    batches = list(make_train_dataloader(ds, cfg, batch_size=2, seed=0))
    assert sorted(uid for b in batches for uid in b["ids"]) == sorted(ds["id"])
    _check_crops(batches, ds, max_crop=24000)
    # Sorted buckets: each batch's crop is set by its shortest member, so it is never wasted.
    assert any(b["waveforms"].shape[1] == crop_length(24000) for b in batches)


def test_bad_items_are_counted_never_raised(corpus):
    ds = _raw_dataset(_good_and_bad(corpus))
    cfg = _cfg(corpus, bucket_size=16)
    [batch] = list(make_train_dataloader(ds, cfg, batch_size=16, seed=0))
    assert len(batch["ids"]) == 8
    assert batch["skipped"] == {"corrupt": 1, "empty": 1, "missing": 1, "non_finite": 1, "too_short": 1}
    _check_crops([batch], ds.select(range(8)), max_crop=64000)
    # One item per batch: each bad one becomes a B=0 batch that still reports its reason.
    counter, empty = SkipCounter(), 0
    for batch in make_train_dataloader(ds, cfg, batch_size=1, seed=0):
        counter.add(batch["skipped"])
        empty += batch["waveforms"].shape[0] == 0
        assert batch["waveforms"].shape[0] == len(batch["ids"]) == len(batch["starts"]) == len(batch["lengths"])
    assert empty == 5
    assert counter.summary() == "skipped 5 utterances: corrupt=1 empty=1 missing=1 non_finite=1 too_short=1"


def test_min_samples_from_the_teacher(corpus):
    ds = _raw_dataset(sorted(str(p) for p in (corpus / "clips").glob("good*.wav")))
    [batch] = list(make_train_dataloader(ds, _cfg(corpus), batch_size=8, seed=0, min_samples=int(1.1 * SR)))
    assert batch["skipped"] == {"too_short": 2}  # the 0.8 s and 1.0 s clips
    assert batch["waveforms"].shape[1] == crop_length(int(1.25 * SR))


def _signature(batches: list[dict]) -> list:
    return [(tuple(b["ids"]), tuple(b["starts"].tolist()), b["waveforms"].sum().item()) for b in batches]


def test_batches_are_deterministic(corpus):
    cfg = _cfg(corpus / "clips", bucket_size=4, max_crop_seconds=1.0)
    ds = load_audio_dataset(cfg, "train")
    first = _signature(make_train_dataloader(ds, cfg, 2, seed=3, epoch=0))
    assert _signature(make_train_dataloader(ds, cfg, 2, seed=3, epoch=0)) == first
    assert _signature(make_train_dataloader(ds, cfg, 2, seed=4, epoch=0)) != first
    loader = make_train_dataloader(ds, cfg, 2, seed=3, epoch=0)
    loader.batch_sampler.sampler.set_epoch(1)
    second = _signature(loader)
    assert [s[0] for s in second] != [s[0] for s in first]
    assert second == _signature(make_train_dataloader(ds, cfg, 2, seed=3, epoch=1))
    two_workers = _cfg(corpus / "clips", bucket_size=4, max_crop_seconds=1.0, dataloader_num_workers=2)
    assert _signature(make_train_dataloader(ds, two_workers, 2, seed=3)) == first


def test_accelerate_sharding_set_epoch_and_skip(corpus):
    """Two simulated processes: set_epoch reaches the sampler, shards partition the epoch's
    batches, crops match the single-process ones, and skip_first_batches resumes mid-epoch."""
    cfg = _cfg(corpus / "clips", bucket_size=4)
    ds = load_audio_dataset(cfg, "train")
    reference = _signature(make_train_dataloader(ds, cfg, 2, seed=0, epoch=2))  # 9 items: 5 batches
    shards = []
    for rank in range(2):
        loader = prepare_data_loader(
            make_train_dataloader(ds, cfg, 2, seed=0), num_processes=2, process_index=rank, put_on_device=False
        )
        loader.set_epoch(2)
        shards.append(_signature(loader))
        loader.set_epoch(2)  # as the trainer does before skip_first_batches on resume
        assert _signature(skip_first_batches(loader, 1)) == shards[rank][1:]
    single = prepare_data_loader(make_train_dataloader(ds, cfg, 2, seed=0), num_processes=1, put_on_device=False)
    single.set_epoch(2)
    assert _signature(single) == reference
    interleaved = [batch for pair in zip(*shards) for batch in pair]
    assert interleaved[:4] == reference[:4]  # accelerate pads the short last batch (even_batches)
    assert set(reference[4][0]) <= set(interleaved[4][0])


# --------------------------------------------------------------------------- streaming and eval


def test_streaming_buckets(corpus):
    cfg = _cfg(corpus / "clips", streaming=True, bucket_size=4, min_duration_in_seconds=0.9)
    stream = load_audio_dataset(cfg, "train")
    assert isinstance(stream, datasets.IterableDataset)
    batches = list(make_train_dataloader(stream, cfg, batch_size=2, seed=0))
    skipped = SkipCounter()
    for batch in batches:
        skipped.add(batch["skipped"])
    assert skipped.counts == {"too_short": 1}  # the 0.8 s clip
    assert sorted(uid for b in batches for uid in b["ids"]) == sorted(f"good{i}" for i in range(1, 8)) + ["stereo44k"]
    _check_crops(batches, load_audio_dataset(_cfg(corpus / "clips"), "train"), max_crop=64000)
    assert _signature(batches) == _signature(make_train_dataloader(stream, cfg, batch_size=2, seed=0))


def _stream_of(paths: list[str], shards: int = 1) -> datasets.IterableDataset:
    return _raw_dataset(paths).to_iterable_dataset(num_shards=shards)


@pytest.mark.parametrize("seed", range(4))
def test_streaming_skips_after_the_last_bucket_ride_on_a_real_batch(corpus, seed):
    """Bad files after the last full bucket used to come out as a B=0 batch of their own."""
    good = sorted(str(p) for p in (corpus / "clips").glob("good*.wav"))[:4]  # two full buckets, none left
    bad = _good_and_bad(corpus)[-5:]
    cfg = _cfg(corpus, streaming=True, bucket_size=2, min_duration_in_seconds=0.0)
    batches = list(make_train_dataloader(_stream_of(good + bad), cfg, batch_size=2, seed=seed))
    assert all(len(b["ids"]) for b in batches)
    assert sorted(uid for b in batches for uid in b["ids"]) == sorted(Path(p).stem for p in good)
    counter = SkipCounter()
    for batch in batches:
        counter.add(batch["skipped"])
    assert counter.counts == {"corrupt": 1, "empty": 1, "missing": 1, "non_finite": 1, "too_short": 1}


def test_streaming_worker_that_keeps_nothing_reports_its_skips(corpus):
    good = sorted(str(p) for p in (corpus / "clips").glob("good*.wav"))[:4]
    bad = _good_and_bad(corpus)[-5:-1]  # corrupt, empty, nan, short: the second worker's whole shard
    cfg = _cfg(corpus, streaming=True, bucket_size=2, min_duration_in_seconds=0.0, dataloader_num_workers=2)
    batches = list(make_train_dataloader(_stream_of(good + bad, shards=2), cfg, batch_size=2, seed=0))
    assert [len(b["ids"]) for b in batches].count(0) == 1 and len(batches) == 3
    [empty] = [b for b in batches if not b["ids"]]
    assert empty["skipped"] == {"corrupt": 1, "empty": 1, "non_finite": 1, "too_short": 1}
    assert empty["waveforms"].shape == (0, 0) and empty["starts"].shape == (0,)
    assert sorted(uid for b in batches for uid in b["ids"]) == sorted(Path(p).stem for p in good)


def test_eval_batches_pad_whole_utterances():
    cfg = _cfg(DEMO)
    dev = load_audio_dataset(cfg, "dev")
    dev_ids = list(dev["id"])
    batches = list(make_eval_batches(dev, cfg, batch_size=3, max_items=5))
    assert [len(b["ids"]) for b in batches] == [3, 2]
    for batch in batches:
        assert batch["waveforms"].shape == (len(batch["ids"]), int(batch["lengths"].max()))
        for row, (uid, length) in enumerate(zip(batch["ids"], batch["lengths"].tolist())):
            full = decode_audio(dev[dev_ids.index(uid)]["audio"])
            assert length == len(full)
            np.testing.assert_array_equal(batch["waveforms"][row, :length].numpy(), full)
            assert not batch["waveforms"][row, length:].any()
        assert len(batch["texts"]) == len(batch["labels"]) == len(batch["ids"])
    assert [uid for b in batches for uid in b["ids"]] == dev_ids[:5]
