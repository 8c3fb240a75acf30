"""Supervised teacher fitting on the demo corpus with tiny upstreams: table, saved teacher, reuse."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch
from conftest import make_wave

from distill.build import build_teacher
from distill.config import load_recipe
from distill.cli import build_parser
from distill.data.loader import load_audio_dataset, make_eval_batches
from distill.fit_teacher import DEFAULT_MAX_DEV_ITEMS, DEFAULT_MAX_ITEMS, REPORT_NAME, fit_teacher
from teachers import FusedTeacher

STEPS = 8
DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def _recipe(dirs, *extra):
    upstreams = f"teacher.upstreams=[{dirs['wavlm']},{dirs['hubert']}]"
    overrides = [upstreams, "teacher.projection_dim=16", "teacher.target_layers=[1,2]", f"data.dataset_name={DEMO}"]
    return load_recipe("demo", [*overrides, *extra])




@pytest.fixture(scope="module")
def fitted(tiny_upstream_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "teacher"
    cfg = _recipe(tiny_upstream_dirs)
    report = fit_teacher(cfg, out, "ctc", column="phonemes", steps=STEPS, max_items=4, max_dev_items=4, batch_size=4)
    return cfg, out, report


def test_fit_reports_fused_and_each_upstream(fitted):
    _, out, report = fitted
    lines = report["table"].splitlines()
    assert lines[0].split() == ["model", "dev", "cer", "train", "loss"]
    assert [line.split()[0] for line in lines[1:4]] == ["fused", "wavlm", "hubert"]
    assert lines[1].startswith("fused (2 upstreams)") and "4 train / 4 dev" in lines[-1]
    saved = json.loads((out / REPORT_NAME).read_text())
    assert [r["name"] for r in saved["results"]] == ["fused (2 upstreams)", "wavlm", "hubert"]
    assert all(r["metric"] == "cer" and r["lower_is_better"] and r["steps"] == STEPS for r in saved["results"])
    assert all(0.0 <= r["score"] and r["num_train"] == 4 for r in saved["results"])
    assert saved["task"]["column"] == "phonemes" and {" ", "ˈ", "ð"} <= set(saved["task"]["vocab"])
    assert saved["config_hash"] == FusedTeacher.from_pretrained(out).config_hash()


def test_saved_teacher_is_fitted_and_trained(fitted):
    cfg, out, _ = fitted
    loaded = FusedTeacher.from_pretrained(out)
    fresh = FusedTeacher.from_config(dataclasses.asdict(cfg.teacher))
    assert loaded.fitted and loaded.projection_fit == "supervised" and not fresh.fitted
    assert not torch.allclose(loaded.projection.weight, fresh.projection.weight)
    assert any(not torch.equal(a, b) for a, b in zip(loaded.interface.parameters(), fresh.interface.parameters()))


def test_recipe_with_supervised_projection_uses_the_fit(fitted, tiny_upstream_dirs, monkeypatch):
    _, out, _ = fitted
    cfg = _recipe(tiny_upstream_dirs, "teacher.projection_fit=supervised", f"teacher.pretrained={out}")

    def no_refit(*args, **kwargs):
        raise AssertionError("a supervised teacher must not be refitted")

    monkeypatch.setattr(FusedTeacher, "fit_pca", no_refit)
    teacher = build_teacher(cfg)
    torch.testing.assert_close(teacher.projection.weight, FusedTeacher.from_pretrained(out).projection.weight)
    targets = teacher.targets([make_wave(1.0, 0)])
    assert targets.layers.shape == (2, 1, 49, 16) and torch.isfinite(targets.layers).all()


def test_classification_fit_without_comparison(tiny_upstream_dirs, tmp_path):
    cfg = _recipe(tiny_upstream_dirs)
    report = fit_teacher(cfg, tmp_path, "classification", steps=2, compare_single=False, max_items=2, batch_size=2)
    assert [r["name"] for r in report["results"]] == ["fused (2 upstreams)"]
    assert report["results"][0]["metric"] == "accuracy" and report["task"]["column"] == "label"
    assert FusedTeacher.from_pretrained(tmp_path).fitted


def test_fit_errors(tiny_upstream_dirs, tmp_path):
    cfg = _recipe(tiny_upstream_dirs)
    with pytest.raises(ValueError, match="has no column 'speaker'"):
        fit_teacher(cfg, tmp_path, "classification", column="speaker", steps=1, max_items=2)
    with pytest.raises(ValueError, match="task_kind='asr'"):
        fit_teacher(cfg, tmp_path, "asr")
    no_dev = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_split_name=None))
    with pytest.raises(ValueError, match="eval_split_name"):
        fit_teacher(no_dev, tmp_path)


def test_caps_and_vocabulary_from_the_read_batches_only(tiny_upstream_dirs, tmp_path):
    # The recipe's own text column is the default (read under the canonical name "text").
    cfg = _recipe(tiny_upstream_dirs, "data.text_column_name=phonemes")
    report = fit_teacher(cfg, tmp_path, "ctc", steps=1, compare_single=False, max_items=2, max_dev_items=3,
                         batch_size=2, device="cpu")
    assert report["task"]["column"] == "phonemes" and report["device"] == "cpu"
    assert (report["num_train"], report["num_dev"]) == (2, 3)
    assert (report["max_items"], report["max_dev_items"]) == (2, 3)
    first_two = next(make_eval_batches(load_audio_dataset(cfg.data, "train"), cfg.data, 2, max_items=2))["texts"]
    assert report["task"]["vocab"] == sorted(set("".join(first_two)))  # nothing beyond the capped rows was read


def test_cli_defaults_are_capped():
    args = build_parser().parse_args(["fit-teacher", "demo", "--out", "x"])
    assert (args.max_items, args.max_dev_items, args.device) == (DEFAULT_MAX_ITEMS, DEFAULT_MAX_DEV_ITEMS, None)
    assert inspect.signature(fit_teacher).parameters["max_items"].default == DEFAULT_MAX_ITEMS  # through the lock's wrapper
    args = build_parser().parse_args(["fit-teacher", "demo", "--out", "x", "--max-items", "0", "--device", "cpu"])
    assert args.max_items == 0 and args.device == "cpu"  # 0: all (passed on as None)
