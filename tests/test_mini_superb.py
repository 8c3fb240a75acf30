"""The mini SUPERB benchmark: corpus builder, criteria, and the whole --quick path in a real process."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import soundfile as sf

from benchmarks.mini_superb import corpus as corpus_mod
from benchmarks.mini_superb.config import BenchmarkConfigError, load_config
from benchmarks.mini_superb.report import FUSED, criteria

REPO = Path(__file__).resolve().parent.parent
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (.ci/run installs it)")


def _small(**sizes):
    cfg = load_config(overrides=[f"corpus.{k}={v}" for k, v in {"train": 96, "dev": 12, "test": 24, **sizes}.items()])
    return cfg.corpus


def test_plan_holds_out_sentences_and_balances_labels():
    rows = corpus_mod.plan(_small())
    texts = {split: {(r["language"], r["text"]) for r in rows if r["split"] == split} for split in ("train", "dev", "test")}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["dev"]
    train = [r for r in rows if r["split"] == "train"]
    cfg = _small()
    # 96 = 8 speakers x 4 languages x 3 styles: one full pass of the balanced cycle.
    assert Counter(r["speaker"] for r in train) == {f"{s.variant}-p{s.pitch}": 12 for s in cfg.speakers}
    assert Counter(r["language"] for r in train) == {lang: 24 for lang in cfg.languages}
    assert Counter(r["style"] for r in train) == {style: 32 for style in cfg.styles}
    assert rows == corpus_mod.plan(_small())  # seeded: the same config gives the same plan
    assert rows != corpus_mod.plan(load_config(overrides=["corpus.seed=1", "corpus.train=96", "corpus.dev=12", "corpus.test=24"]).corpus)


def test_alt_config_uses_other_languages_and_voices():
    default, alt = load_config(), load_config(REPO / "benchmarks" / "mini_superb" / "alt.yaml")
    assert not set(default.corpus.languages) & set(alt.corpus.languages)
    assert {s.variant for s in default.corpus.speakers} != {s.variant for s in alt.corpus.speakers}
    assert default.corpus.seed != alt.corpus.seed


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(BenchmarkConfigError, match=r"corpus\.trian"):
        load_config(overrides=["corpus.trian=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: {content: {arch: hubert, task: ctc:phonemes}}\n")
    with pytest.raises(BenchmarkConfigError, match="expected at least two to fuse"):
        load_config(bad)
    bad.write_text("upstreams: {content: {arch: hubert, task: ctc:phonemes}, speaker: {arch: wavlm}}\n")
    with pytest.raises(BenchmarkConfigError, match=r"upstreams\.speaker: expected `pretrained: NAME` or both"):
        load_config(bad)


def test_student_arch_key_gives_a_log_mel_recipe_of_equal_size(tmp_path):
    import torch

    from benchmarks.mini_superb.recipes import recipe
    from benchmarks.mini_superb.sweep import points
    from distill.build import student_config
    from distill.config import RecipeConfig
    from omegaconf import OmegaConf
    from students import build_student

    def params(cfg) -> int:
        body = recipe(cfg, tmp_path, [tmp_path / "a", tmp_path / "b"], tmp_path / "run")
        recipe_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RecipeConfig), body))
        with torch.device("meta"):
            model = build_student(student_config(recipe_cfg))
        return type(model).__name__, sum(p.numel() for p in model.parameters())

    hubert = load_config()
    log_mel = load_config(overrides=["student.arch=wav2vec2_bert", "student.intermediate_size=128",
                                     "sweep.sizes={xs: {hidden_size: 32, num_hidden_layers: 1}}"])
    assert params(hubert)[0] == "HubertModel" and params(log_mel)[0] == "Wav2Vec2BertModel"
    assert abs(params(log_mel)[1] - params(hubert)[1]) / params(hubert)[1] < 0.02  # 0.47M both
    [(tag, size)] = [p for p in points(log_mel) if p[0].startswith("size-")]
    assert size.student.arch == "wav2vec2_bert" and params(size)[0] == "Wav2Vec2BertModel"
    with pytest.raises(BenchmarkConfigError, match=r"student\.arch='conformer': expected one of hubert, wav2vec2_bert"):
        load_config(overrides=["student.arch=conformer"])


def test_real_config_fuses_pretrained_whisper_with_the_default_speaker_upstream(tmp_path):
    from benchmarks.mini_superb.upstreams import upstream_folder

    default, real = load_config(), load_config(REPO / "benchmarks" / "mini_superb" / "real.yaml")
    assert list(real.upstreams) == ["whisper", "speaker"] and real.upstreams["whisper"].pretrained == "whisper-tiny.en"
    assert real.corpus == default.corpus and real.upstreams["speaker"] == default.upstreams["speaker"]
    # The same corpus and speaker config give the same cached folder: the trained upstream is reused.
    assert upstream_folder(tmp_path, "speaker", real.upstreams["speaker"], "h") == \
        upstream_folder(tmp_path, "speaker", default.upstreams["speaker"], "h")
    assert upstream_folder(tmp_path, "whisper", real.upstreams["whisper"], "h") == tmp_path / "whisper-tiny.en"
    quick = load_config(REPO / "benchmarks" / "mini_superb" / "real.yaml", quick=True)
    assert quick.upstreams["speaker"].steps == 4 and quick.upstreams["whisper"] == real.upstreams["whisper"]  # real model kept


def test_missing_espeak_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(corpus_mod.shutil, "which", lambda name: None)
    with pytest.raises(corpus_mod.EspeakMissing, match="apt-get install espeak-ng"):
        corpus_mod.check_espeak()


def _row(name, group, values):
    tasks = {t: {"value": v, "stderr": 0.0, "score": v, "lower_is_better": False} for t, v in values.items()}
    return {"name": name, "group": group, "tasks": tasks}


def test_criteria_against_hand_computed_rows():
    t = ("ctc:phonemes", "classification:speaker")
    rows = [
        _row("upstream: content", "upstream", dict(zip(t, (0.6, 0.2)))),  # mean 0.40
        _row("upstream: speaker", "upstream", dict(zip(t, (0.1, 0.9)))),  # mean 0.50
        _row(FUSED, "fused", dict(zip(t, (0.6, 0.9)))),  # mean 0.75
        _row("student of fused teacher", "student", dict(zip(t, (0.54, 0.81)))),  # exactly 90% each
        _row("student of content upstream", "student", dict(zip(t, (0.6, 0.2)))),
    ]
    verdict, lines, retention = criteria(rows)
    assert verdict == {"a": True, "b": True, "c": True}
    assert retention == pytest.approx({t[0]: 0.9, t[1]: 0.9})
    rows[3]["tasks"][t[0]]["value"] = 0.53  # 88% on phonemes: (b) fails, (c) still holds
    verdict, lines, _ = criteria(rows)
    assert verdict == {"a": True, "b": False, "c": True}
    assert lines[1].startswith("FAIL (b)") and "PR (1-PER) 88.3%" in lines[1]
    rows[3]["tasks"][t[0]]["value"] = 0.5398  # 89.97%: fails, and must not print as 90%
    verdict, lines, _ = criteria(rows)
    assert not verdict["b"] and "PR (1-PER) 89.9%" in lines[1] and "SID 90.0%" in lines[1]


@needs_espeak
def test_corpus_is_readable_by_the_data_layer(tmp_path):
    from distill.config import DataConfig
    from distill.data.loader import load_audio_dataset, make_eval_batches

    cfg = _small(train=8, dev=2, test=2)
    summary = corpus_mod.build_corpus(cfg, tmp_path / "c")
    assert summary["utterances"] == {"train": 8, "dev": 2, "test": 2}
    with open(tmp_path / "c" / "metadata.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert all(r["phonemes"] and r["speaker"] and r["language"] and r["style"] for r in rows)
    audio, rate = sf.read(tmp_path / "c" / rows[0]["file_name"])
    assert rate == 16000 and audio.ndim == 1 and len(audio) > 8000
    data = DataConfig(dataset_name=str(tmp_path / "c"), text_column_name=None, label_column_name=None, min_duration_in_seconds=0.3)
    ds = load_audio_dataset(data, "train", columns=["speaker", "phonemes"])
    batch = next(make_eval_batches(ds, data, 8))
    assert len(batch["speaker"]) == len(batch["phonemes"]) == 8
    # A rerun with the same config does nothing (and keeps the files).
    mtime = (tmp_path / "c" / "metadata.csv").stat().st_mtime_ns
    corpus_mod.build_corpus(cfg, tmp_path / "c")
    assert (tmp_path / "c" / "metadata.csv").stat().st_mtime_ns == mtime


@needs_espeak
@pytest.mark.slow
def test_quick_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.mini_superb", "--quick", "--sweep", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert set(result["criteria"]) == {"a", "b", "c"} and all(isinstance(v, bool) for v in result["criteria"].values())
    names = [r["name"] for r in result["rows"]]
    assert {"upstream: content", "upstream: speaker", FUSED, "student of fused teacher", "student of content upstream",
            "student of speaker upstream"} <= set(names)
    for row in result["rows"]:
        assert set(row["tasks"]) == {"ctc:phonemes", "classification:speaker", "classification:language", "classification:style"}
        assert all(0.0 <= t["value"] <= 1.0 and t["num_dev"] > 0 for t in row["tasks"].values())
        assert row["params"] > 0 and row["latency_ms"] > 0
    printed = [line for line in done.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert [line.split()[1] for line in printed] == ["(a)", "(b)", "(c)"]
    assert len(result["finetune"]) == 3 and all(0 <= f["per"] for f in result["finetune"].values())
    assert (out / "results.md").read_text().count("\n|") >= len(names) + 1
    assert (out / "results.png").stat().st_size > 1000
    # Upstreams were used only as saved folders; the recipes are plain YAML files a user can rerun.
    assert "fusion-distill train" in (out / "recipes" / "fused.yaml").read_text()
    card = (out / "runs" / "fused" / "student" / "README.md").read_text()
    assert "model-index" in card and "mini SUPERB" in card
    fused_student = next(r for r in result["rows"] if r["name"] == "student of fused teacher")
    assert fused_student["training"]["eval_steps"] == [2, 4]  # quick: distill.eval_steps=2 of 4 steps
    # The sweep: the default point plus one smaller student and one other step count, same probes.
    sweep = json.loads((out / "sweep.json").read_text())
    assert sorted(e["point"] for e in sweep["entries"]) == ["default", "size-xs", "steps-2"]
    small = next(e for e in sweep["entries"] if e["point"] == "size-xs")
    assert small["params"] < fused_student["params"] and set(small["retention"]) == set(fused_student["tasks"])
    assert (out / "sweep_size.png").exists() and (out / "sweep_steps.png").exists()
    # Attempts on top: the no-override baseline equals the sweep's steps-2 run and is not trained again.
    done = subprocess.run([sys.executable, "-m", "benchmarks.mini_superb", "--quick", "--attempts", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    attempts = json.loads((out / "attempts.json").read_text())
    assert [e["name"] for e in attempts["entries"]] == ["no-override", "lr", "split"]
    assert "reusing the equal run" in done.stderr and not (out / "attempts" / "no-override").exists()
    lr = attempts["entries"][1]
    assert lr["overrides"] == {"training.learning_rate": 0.002} and (out / "attempts" / "lr" / "student" / "config.json").exists()
    assert set(lr["retention"]) == set(fused_student["tasks"]) and "| lr |" in (out / "attempts.md").read_text()
    # An attempt with another teacher gets its own target cache, and its teacher is probed too.
    split = attempts["entries"][2]
    assert "retention_of_own_teacher" not in lr and set(split["retention_of_own_teacher"]) == set(fused_student["tasks"])
    for task, kept in split["retention_of_own_teacher"].items():
        own = split["teacher_tasks"][task]["value"]
        assert kept is None if own < 0.01 else kept == pytest.approx(split["tasks"][task]["value"] / own)
    assert any(p.name.startswith("attempt-") for p in (out / "targets").iterdir())
    assert "against their own" in (out / "attempts.md").read_text()
    # Teacher probes are kept by teacher hash: a rerun reuses them instead of running the teacher again.
    assert (out / "probes" / "attempt_split_teacher.json").exists() and (out / "probes" / "fused_teacher_CHConv_PCA_weighted_sum.json").exists()


def test_attempt_with_an_unknown_recipe_key_fails_before_training(tmp_path):
    from benchmarks.mini_superb.attempts import attempt_recipes
    from distill.config import RecipeError

    cfg = load_config(overrides=["attempts.variants={typo: {training.learning_rat: 0.002}}"])
    with pytest.raises(RecipeError, match="learning_rat") as err:
        attempt_recipes(cfg, tmp_path, tmp_path / "corpus", [tmp_path / "content", tmp_path / "speaker"])
    assert "\n" not in str(err.value) and "typo.yaml" in str(err.value)
    assert not (tmp_path / "attempts" / "typo").exists()  # nothing trained


def test_a_run_from_another_recipe_is_not_reused(tmp_path):
    from benchmarks.mini_superb.recipes import recipe, write_recipe
    from benchmarks.mini_superb.stages import _same_recipe

    cfg = load_config()
    ups = [tmp_path / "content", tmp_path / "speaker"]
    used = write_recipe(recipe(cfg, tmp_path / "corpus", ups, tmp_path / "a"), tmp_path / "used.yaml")
    moved = write_recipe(recipe(cfg, tmp_path / "corpus", ups, tmp_path / "b"), tmp_path / "moved.yaml")
    longer = load_config(overrides=[f"distill.steps={cfg.distill.steps * 2}"])
    changed = write_recipe(recipe(longer, tmp_path / "corpus", ups, tmp_path / "a"), tmp_path / "changed.yaml")
    assert _same_recipe(moved, used)  # only the output folder differs
    assert not _same_recipe(changed, used)
    assert not _same_recipe(used, tmp_path / "missing.yaml")


def test_probe_rows_share_one_teacher_run_and_equal_the_single_upstream_teacher():
    """The benchmark's probe rows reuse one fused run per batch; an upstream row must still be
    exactly what `single_upstream_teacher` gives (sliced when its layer count is the aligned one,
    run alone when it is interpolated)."""
    import torch
    from distill.build import single_upstream_teacher
    from distill.evaluation.extractors import teacher_extractor
    from teachers import FusedTeacher
    from tests.conftest import make_wave, tiny_config

    from benchmarks.mini_superb.stages import teacher_rows

    teacher = FusedTeacher.from_config({"upstreams": [tiny_config("wavlm"), tiny_config("whisper"),
                                                      tiny_config("hubert", num_hidden_layers=1)],
                                        "fusion": "chconv", "projection_dim": 16, "projection_fit": "pca"})
    waves = [make_wave(1.0, seed=0), make_wave(0.7, seed=1)]
    teacher.fit_pca(waves)
    batch, lengths = torch.zeros(2, 16000), torch.tensor([16000, 11200])
    for i, w in enumerate(waves):
        batch[i, : w.numel()] = w
    rows = {name: extract for name, _, _, extract, _ in teacher_rows(teacher, None, ["a", "b", "c"])}
    calls = []
    original = teacher.features
    teacher.features = lambda *a, **k: calls.append(1) or original(*a, **k)
    for i, name in enumerate(["a", "b", "c"]):
        got, frames = rows[f"upstream: {name}"](batch, lengths)
        want, want_frames = teacher_extractor(single_upstream_teacher(teacher, i), project=False)(batch, lengths)
        assert torch.equal(frames, want_frames) and torch.allclose(got, want, atol=1e-6), name
    projected, _ = rows["fused teacher: CHConv-PCA"](batch, lengths)
    concat, _ = rows["fused: concat + WS"](batch, lengths)
    assert torch.allclose(projected, teacher.project(concat), atol=1e-6)
    assert len(calls) == 1  # every view of this batch came from one teacher run
