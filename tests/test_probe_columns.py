"""Any dataset column as a probe task: extra columns through the data layer, several tasks on one
extraction, rows without a value left out of their task only, and one `evaluate` call probing a
corpus with three label columns.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import make_wave, tiny_config

from distill.config import DataConfig
from distill.data.loader import DataError, load_audio_dataset, make_eval_batches
from distill.evaluation.suite import TEACHER, evaluate, format_probes, format_report
from distill.evaluation.probe import run_probe, run_probes
from distill.evaluation.tasks import ProbeTask, is_missing
from teachers import FusedTeacher

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
SR = 16000


def _demo_rows() -> list[dict]:
    with open(DEMO / "metadata.csv", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def labelled_corpus(tmp_path_factory) -> Path:
    """The demo audio under a metadata.csv with speaker, language, style and phonemes columns;
    style is empty on every third row."""
    folder = tmp_path_factory.mktemp("labelled")
    rows = []
    for i, row in enumerate(_demo_rows()):
        rows.append({
            "file_name": str(DEMO / row["file_name"]),  # absolute: manifests keep absolute paths
            "text": row["text"], "phonemes": row["phonemes"], "speaker": row["label"],
            "language": "en-gb" if "gb" in row["label"] else "en", "style": "" if i % 3 == 0 else f"s{i % 2}",
            "split": row["split"],
        })
    with open(folder / "metadata.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


# --------------------------------------------------------------------------- data layer


def test_extra_columns_kept_under_their_own_names(labelled_corpus, caplog):
    cfg = DataConfig(dataset_name=str(labelled_corpus))
    with caplog.at_level(logging.WARNING, logger="distill.data.sources"):
        ds = load_audio_dataset(cfg, "dev", ["speaker", "style", "phonemes", "emotion", "speaker"])
    assert ds.column_names == ["id", "audio", "text", "speaker", "style", "phonemes", "duration"]
    expected = [r for r in _demo_rows() if r["split"] == "dev"]
    assert list(ds["speaker"]) == [r["label"] for r in expected]
    assert list(ds["phonemes"]) == [r["phonemes"] for r in expected]
    assert "no 'emotion' column" in caplog.text
    # Without columns nothing changes: the canonical columns only.
    assert load_audio_dataset(cfg, "dev").column_names == ["id", "audio", "text", "duration"]
    batches = list(make_eval_batches(ds, cfg, batch_size=3))
    assert [v for b in batches for v in b["speaker"]] == [r["label"] for r in expected]
    assert [v for b in batches for v in b["style"]] == list(ds["style"])
    assert all(len(b["phonemes"]) == len(b["ids"]) == len(b["texts"]) for b in batches)


def test_configured_text_column_is_also_kept_under_its_name(labelled_corpus):
    cfg = DataConfig(dataset_name=str(labelled_corpus), text_column_name="phonemes", label_column_name="speaker")
    ds = load_audio_dataset(cfg, "dev", ["phonemes", "text", "language"])
    # "text" is the canonical column (here the phonemes); "phonemes" is a copy under its own name.
    assert ds.column_names == ["id", "audio", "text", "label", "language", "phonemes", "duration"]
    assert list(ds["phonemes"]) == list(ds["text"]) == [r["phonemes"] for r in _demo_rows() if r["split"] == "dev"]
    batch = next(make_eval_batches(ds, cfg, batch_size=2))
    assert batch["phonemes"] == batch["texts"] and batch["labels"] == [r["label"] for r in _demo_rows()[32:34]]


def test_reserved_or_malformed_column_requests_are_one_line(labelled_corpus):
    cfg = DataConfig(dataset_name=str(labelled_corpus))
    with pytest.raises(DataError, match=r"column\(s\) lengths clash with names the batches use"):
        load_audio_dataset(cfg, "dev", ["speaker", "lengths"])
    with pytest.raises(DataError, match="expected a list of column names"):
        load_audio_dataset(cfg, "dev", "speaker")


def test_hub_columns_streamed_and_map_style(tmp_path, monkeypatch):
    """The load_dataset path, offline (a local parquet repo): extra columns, missing values as None."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    payloads = []
    for i in range(3):
        path = tmp_path / f"clip{i}.wav"
        sf.write(path, make_wave(0.75 + i / 4, seed=i).numpy(), SR)
        payloads.append({"bytes": path.read_bytes(), "path": f"clip{i}.wav"})
    table = datasets.Dataset.from_dict({"audio": payloads, "sentence": ["a", "b", "c"],
                                        "speaker_id": [7, None, 9], "accent": ["x", "y", "x"]})
    table.cast_column("audio", datasets.Audio()).to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    for streaming in (False, True):
        cfg = DataConfig(dataset_name=str(tmp_path / "repo"), text_column_name="sentence", streaming=streaming)
        ds = load_audio_dataset(cfg, "train", ["speaker_id", "sentence"])
        batches = list(make_eval_batches(ds, cfg, batch_size=3))
        assert [b["speaker_id"] for b in batches] == [[7, None, 9]], streaming
        assert [b["sentence"] for b in batches] == [b["texts"] for b in batches] == [["a", "b", "c"]], streaming
        assert "accent" not in batches[0]


# --------------------------------------------------------------------------- several tasks, one extraction


HOP = 320


class CountingExtractor:
    """Features (3, B, S // HOP, 8): noise, plus in layer 1 a one-hot of the waveform's value per frame."""

    def __init__(self):
        self.calls, self.items = 0, 0

    def __call__(self, waveforms, lengths):
        self.calls += 1
        self.items += len(lengths)
        frames = lengths // HOP
        values = waveforms[:, ::HOP][:, : int(frames.max())].round().long().clamp(0, 7)
        generator = torch.Generator().manual_seed(int(waveforms.sum().item() * 1000) % 2**31)
        features = 0.1 * torch.randn(3, len(lengths), int(frames.max()), 8, generator=generator)
        features[1] += 2.0 * torch.nn.functional.one_hot(values, 8).float()
        return features, frames


def _batches(count: int, seed: int) -> list[dict]:
    """Utterances of one repeated value 1..3: "label" is the class, "loud" the same class under
    another column with every fourth row missing (None, "", NaN in turn)."""
    rng, batches, blanks = torch.Generator().manual_seed(seed), [], [None, "", float("nan")]
    for k in range(count):
        classes = torch.randint(0, 3, (4,), generator=rng).tolist()
        sizes = torch.randint(5, 12, (4,), generator=rng).tolist()
        lengths = torch.tensor([n * HOP for n in sizes])
        waveforms = torch.zeros(4, int(lengths.max()))
        for b, (c, n) in enumerate(zip(classes, sizes)):
            waveforms[b, : n * HOP] = c + 1
        loud = [f"c{c}" for c in classes]
        loud[0] = blanks[k % 3]
        batches.append({"waveforms": waveforms, "lengths": lengths, "ids": [f"{k}-{b}" for b in range(4)],
                        "labels": [f"c{c}" for c in classes], "loud": loud})
    return batches


def test_is_missing():
    assert all(is_missing(v) for v in (None, "", "  ", float("nan")))
    assert not any(is_missing(v) for v in ("a", 0, 0.0, "0", False))


def test_run_probes_extracts_once_and_skips_missing_rows_per_task():
    train, dev = _batches(6, 0), _batches(3, 1)
    label = ProbeTask.from_batches(train, "classification", "label")
    loud = ProbeTask.from_batches(train, "classification", "loud")
    assert loud.vocab == label.vocab == ["c0", "c1", "c2"]  # blanks are no class
    extract = CountingExtractor()
    results = run_probes(extract, train, dev, [label, loud], steps=40, learning_rate=1e-2, batch_size=4)
    assert extract.calls == 9 and extract.items == 36  # every utterance once, for both tasks
    assert list(results) == ["classification:label", "classification:loud"]
    assert (results["classification:label"].num_train, results["classification:label"].missing_train) == (24, 0)
    assert (results["classification:loud"].num_train, results["classification:loud"].missing_train) == (18, 6)
    assert (results["classification:loud"].num_dev, results["classification:loud"].missing_dev) == (9, 3)
    assert results["classification:label"].score == 1.0 and results["classification:loud"].score == 1.0
    # The same numbers as probing each task on its own: the shared cache changes nothing.
    for task in (label, loud):
        alone = run_probe(CountingExtractor(), train, dev, task, steps=40, learning_rate=1e-2, batch_size=4)
        assert alone == results[task.name]
    assert results["classification:loud"].to_dict()["missing_dev"] == 3


def test_run_probes_refuses_shared_trainable_parts():
    train, dev = _batches(1, 0), _batches(1, 1)
    tasks = [ProbeTask("classification", "label", ["c0", "c1", "c2"]), ProbeTask("classification", "loud", ["c0"])]
    with pytest.raises(ValueError, match="trained in place; probe one task"):
        run_probes(CountingExtractor(), train, dev, tasks, interface=torch.nn.Identity())
    with pytest.raises(ValueError, match="expected distinct tasks"):
        run_probes(CountingExtractor(), train, dev, [tasks[0], tasks[0]])
    blank = [{**b, "loud": [None] * 4} for b in dev]
    with pytest.raises(ValueError, match=r"run_probe classification:loud: 3 training and 0 dev utterances with a value \(1 \+ 4 without\)"):
        run_probe(CountingExtractor(), train, blank, ProbeTask("classification", "loud", ["c0", "c1", "c2"]))


# --------------------------------------------------------------------------- evaluate, three label columns


def test_evaluate_probes_three_label_columns_in_one_call(labelled_corpus, tiny_upstream_dirs, tmp_path, monkeypatch):
    teacher = FusedTeacher.from_config({"upstreams": [tiny_config("wavlm"), tiny_config("hubert")], "projection_dim": 16})
    teacher.fit_pca([make_wave(1.0, seed=s) for s in range(3)])
    teacher.save_pretrained(tmp_path / "teacher")
    import distill.evaluation.suite as evaluate_module

    calls: dict[str, int] = {}
    real = evaluate_module._probe_extractors

    def counting(target):  # how often each model's extractor runs
        def wrap(name, extract):
            def run(waveforms, lengths):
                calls[name] = calls.get(name, 0) + 1
                return extract(waveforms, lengths)
            return run
        return {name: wrap(name, extract) for name, extract in real(target).items()}

    monkeypatch.setattr(evaluate_module, "_probe_extractors", counting)
    tasks = ["classification:speaker", "classification:style", "ctc:phonemes", "classification:emotion"]
    result = evaluate(tiny_upstream_dirs["hubert"], teacher=tmp_path / "teacher", data=str(labelled_corpus),
                      out_dir=tmp_path / "eval", probe_tasks=tasks, probe_steps=2, max_items=6, batch_size=3,
                      cost=False, overrides=["data.eval_split_name=dev"], device="cpu")
    section = result["probes"]
    names = ["student", TEACHER, "wavlm(random-init)", "hubert(random-init)"]
    # 6 train + 6 dev utterances in batches of 3: each model extracted 4 times, not 4 x 3 tasks.
    assert calls == {name: 4 for name in names}
    assert section["tasks"]["classification:emotion"] == {"skipped": "the dataset has no 'emotion' column"}
    # style is empty on rows 0 and 3 of train (0, 3) and of dev (rows 32..37: 33 and 36).
    assert section["tasks"]["classification:style"]["missing"] == {"train": 2, "dev": 2}
    assert section["tasks"]["classification:speaker"]["missing"] == {"train": 0, "dev": 0}
    for spec in tasks[:3]:
        rows = section["tasks"][spec]["rows"]
        assert [row["model"] for row in rows] == names
        assert all(row["num_dev"] + row["missing_dev"] == 6 for row in rows), spec
    assert section["tasks"]["ctc:phonemes"]["metric"] == "cer"
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["probes"] == json.loads(json.dumps(section))
    table = format_probes(section)
    header = next(line for line in table.splitlines() if line.startswith("| model |"))
    assert header.count("|") == 5 and "ctc:phonemes (cer" in header and "classification:style (accuracy" in header
    assert "classification:style: 2 train / 2 dev utterances without a value" in table
    # The teacher's projection diagnostics sit beside the probes.
    assert result["projection"] == teacher.projection_report and result["projection"]["balance"] == "none"
    assert "projection (pca, balance none, 16 dims" in format_report(result)
    plot = Path(result["files"]["probe_plot"])
    assert plot == tmp_path / "eval" / "probe_scores.png" and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
