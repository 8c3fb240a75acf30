"""distill.evaluation.suite on a tiny run folder built without training: similarity, probes, cost, files.

The run folder has what `fusion-distill train` leaves: recipe.yaml, teacher/ (PCA-fitted on a few
demo utterances), a checkpoint written by the real `save_checkpoint` (Accelerate save_state +
completion marker) and the exported student/. A copy with a second, newer checkpoint and the
older one marked best (the real `mark_best`: best_checkpoint.json + marker) checks which
checkpoint is scored.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import make_wave

from distill.build import build_distill_student, build_teacher
from distill.runs import BEST_FILE
from distill.training.checkpoint import mark_best, save_checkpoint
from distill.cli import main as cli_main
from distill.config import load_recipe
from distill.data.loader import load_audio_dataset, make_eval_batches
from distill.evaluation.suite import (TEACHER, evaluate, format_cost, format_probes, format_report, format_similarity,
                               load_target)
from distill.export import export_run
from teachers import FusedTeacher

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"

MAX_ITEMS = 4
PROBE_STEPS = 3




@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run folder, the student whose weights went into its checkpoint, the teacher, the recipe)."""
    out = tmp_path_factory.mktemp("eval") / "run"
    cfg = load_recipe("demo", [f"training.output_dir={out}", "teacher.pca_max_utterances=4", "training.report_to=none"])
    out.mkdir(parents=True)
    OmegaConf.save(OmegaConf.structured(cfg), out / "recipe.yaml")
    teacher = build_teacher(cfg, load_audio_dataset(cfg.data, cfg.data.train_split_name), out / "teacher")
    torch.manual_seed(0)
    student = build_distill_student(cfg, teacher)
    with torch.no_grad():  # weights a fresh build cannot reproduce: evaluate must read the checkpoint
        generator = torch.Generator().manual_seed(123)
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    # The trainer's own save path (Accelerate save_state + completion marker), on the CPU.
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(student)
    save_checkpoint(accelerator, out, 1, None, cfg, prepared)
    export_run(out, out / "student", student=accelerator.unwrap_model(prepared))
    # Accelerate's state is a process-wide singleton: drop our cpu=True so later tests start clean
    # (the reset Accelerate's own test utilities use).
    AcceleratorState._reset_state(reset_partial_state=True)
    return out, student.eval(), teacher, cfg


@pytest.fixture(scope="module")
def result(run):
    folder, *_ = run
    tasks = ("ctc:text", "classification:label", "classification:speaker")  # the demo corpus has no speaker column
    return evaluate(folder, probe_tasks=tasks, probe_steps=PROBE_STEPS, max_items=MAX_ITEMS, batch_size=2, cost_seconds=1.0,
                    cost_repeats=1, device="cpu")


def test_eval_json_structure(run, result):
    folder, _, teacher, _ = run
    saved = json.loads((folder / "eval" / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert {"target", "kind", "weights", "teacher", "dataset", "similarity", "probes", "cost", "files"} <= set(saved)
    assert saved["kind"] == "run" and saved["weights"].endswith("checkpoint-1")
    # No evaluation while training: the default (best) falls back to the newest, and says so.
    assert saved["checkpoint"] == {"path": saved["weights"], "step": 1, "requested": "best", "picked": "latest",
                                   "why": "the run recorded no best eval checkpoint", "best_step": None, "newest_step": 1}
    assert "scored checkpoint-1 (step 1): the newest checkpoint (the run recorded no best eval checkpoint)" in format_report(result)
    assert saved["teacher"]["target_layers"] == list(teacher.target_layer_ids)


def _independent_cosine_l1(student, teacher, cfg, layer: int) -> tuple[float, float]:
    """Utterance by utterance, unpadded, straight torch: frame-pooled cosine and L1 of one layer."""
    dev = load_audio_dataset(cfg.data, cfg.data.eval_split_name)
    cos_sum = l1_sum = frames = 0.0
    for batch in make_eval_batches(dev, cfg.data, 1, MAX_ITEMS):
        wave = batch["waveforms"][0]
        with torch.no_grad():
            out = student(wave[None], torch.tensor([wave.numel()]))
            target = teacher.targets([wave], num_frames=[int(out.lengths[0])]).layers[layer, 0]
        prediction = out.predictions[layer, 0, : target.shape[0]]
        cos_sum += F.cosine_similarity(prediction, target, dim=-1).sum().item()
        l1_sum += (prediction - target).abs().mean(dim=-1).sum().item()
        frames += target.shape[0]
    return cos_sum / frames, l1_sum / frames


def test_similarity_matches_an_independent_computation(run, result):
    _, student, teacher, cfg = run
    section = result["similarity"]
    assert section["split"] == "dev" and section["utterances"] == MAX_ITEMS
    assert [row["teacher_layer"] for row in section["layers"]] == list(teacher.target_layer_ids)
    assert all(-1.0 <= row["cosine"] <= 1.0 and row["l1"] >= 0 for row in section["layers"])
    cosine, l1 = _independent_cosine_l1(student, teacher, cfg, layer=1)
    assert section["layers"][1]["cosine"] == pytest.approx(cosine, abs=1e-5)
    assert section["layers"][1]["l1"] == pytest.approx(l1, rel=1e-5)
    table = format_similarity(section)
    assert table.count("\n") == 3 + len(teacher.target_layer_ids) and f"{section['mean_cosine']:.4f}" in table


def test_plot_written(run, result):
    folder, *_ = run
    pytest.importorskip("matplotlib")
    plot = folder / "eval" / "layer_similarity.png"
    assert result["files"]["plot"] == str(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probes_cover_every_model_with_one_budget(run, result):
    _, _, teacher, _ = run
    section = result["probes"]
    names = ["student", TEACHER] + [f"{u.model_type}(random-init)" for u in teacher.upstreams]
    assert section["budget"] == {"steps": PROBE_STEPS, "learning_rate": 1e-3, "seed": 0, "interface": "weighted_sum"}
    assert section["tasks"]["classification:speaker"] == {"skipped": "the dataset has no 'speaker' column"}
    for spec in ("ctc:text", "classification:label"):
        task = section["tasks"][spec]
        assert [row["model"] for row in task["rows"]] == names, spec
        assert all(row["steps"] == PROBE_STEPS and row["num_dev"] == MAX_ITEMS for row in task["rows"])
    assert all(0 <= row["score"] <= 1 for row in section["tasks"]["classification:label"]["rows"])
    assert all(row["score"] >= 0 for row in section["tasks"]["ctc:text"]["rows"])
    table = format_probes(section)
    assert "ctc:text (cer, lower is better)" in table and "classification:label (accuracy, higher is better)" in table
    assert all(f"| {name} |" in table for name in names) and "classification:speaker: skipped" in table


def test_cost_rows_and_ratios_are_consistent(run, result):
    _, student, teacher, _ = run
    section = result["cost"]
    rows = {row["name"]: row for row in section["rows"]}
    upstreams = [f"{u.model_type}(random-init)" for u in teacher.upstreams]
    assert list(rows) == ["student", TEACHER, *upstreams] and section["reference"] == TEACHER
    fusion = sum(p.numel() for m in (teacher.projection, teacher.interface) for p in m.parameters())
    assert rows[TEACHER]["params"] == sum(rows[name]["params"] for name in upstreams) + fusion
    assert rows["student"]["params"] == student.num_parameters(include_heads=False)
    for row in rows.values():
        assert row["size_ratio"] == pytest.approx(rows[TEACHER]["params"] / row["params"])
        assert row["speedup"] == pytest.approx(rows[TEACHER]["latency_ms_median"] / row["latency_ms_median"])
    assert rows[TEACHER]["size_ratio"] == rows[TEACHER]["speedup"] == 1.0
    assert f"speedup vs {TEACHER}" in format_cost(section)
    assert "wrote " in format_report(result)


def test_exported_student_skips_similarity(run):
    folder, *_ = run
    out = evaluate(folder / "student", probe=False, cost=False, max_items=2)
    assert out["kind"] == "student" and "no prediction heads" in out["similarity"]["skipped"]
    assert out["teacher"] is not None  # RUN/student finds the run's teacher
    assert (folder / "student-eval" / "eval.json").is_file() and not (folder / "student" / "eval.json").exists()
    assert "skipped" in format_report(out)


def test_bare_student_without_teacher_probes_and_costs_itself(run, tmp_path):
    folder, *_ = run
    copy = tmp_path / "student"
    shutil.copytree(folder / "student", copy)
    out = evaluate(copy, data=str(DEMO), overrides=["data.eval_split_name=dev"], probe_tasks=("classification:label",),
                   probe_steps=2, max_items=2, cost_seconds=0.5, cost_repeats=1, out_dir=tmp_path / "eval")
    assert out["teacher"] is None and "skipped" in out["similarity"]
    assert [row["model"] for row in out["probes"]["tasks"]["classification:label"]["rows"]] == ["student"]
    assert [row["name"] for row in out["cost"]["rows"]] == ["student"] and out["cost"]["reference"] == "student"


def test_teacher_override_must_match_the_heads(run, tmp_path):
    folder, _, _, cfg = run
    other = FusedTeacher.from_config({**dataclasses.asdict(cfg.teacher), "projection_dim": 32}, progress=lambda _: None)
    other.fit_pca([make_wave(1.0, seed=s) for s in range(2)])
    other.save_pretrained(tmp_path / "teacher32")
    with pytest.raises(ValueError, match="does not match the recipe's student with heads for 3 targets of width 32"):
        evaluate(folder, teacher=tmp_path / "teacher32", probe=False, cost=False)


def test_bad_probe_task_fails_before_loading(tmp_path):
    with pytest.raises(ValueError, match="expected ctc:COLUMN or classification:COLUMN"):
        evaluate(tmp_path / "missing", probe_tasks=("ctc",))


def test_cost_runs_everything_in_fp32_on_cpu_and_restores(run, result, monkeypatch):
    import distill.evaluation.suite as ev

    _, student, _, cfg = run
    teacher = FusedTeacher.from_config({**dataclasses.asdict(cfg.teacher), "dtype": "bfloat16"}, progress=lambda _: None)
    teacher.fitted = True
    encoder = copy.deepcopy(student.encoder).to(torch.bfloat16)  # a copy: the fixture's student stays fp32
    seen = []

    def spy(jobs, **kwargs):  # what the measured models hold when measure_jobs runs
        seen.extend({p.dtype for m in [encoder, teacher] for p in m.parameters()} | {p.device.type for p in teacher.parameters()})
        return []

    monkeypatch.setattr(ev, "measure_jobs", spy)
    target = ev.EvalTarget("run", Path("."), encoder, True, Path("."), teacher=teacher)
    ev.cost_all(target, seconds=0.5, repeats=1)
    assert set(seen) == {torch.float32, "cpu"}
    # Put back weight by weight: bf16 upstreams, the fp32 projection and interface stay fp32.
    assert all(u.dtype == torch.bfloat16 for u in teacher.upstreams) and teacher.config["dtype"] == "bfloat16"
    assert teacher.projection.weight.dtype == torch.float32 and next(encoder.parameters()).dtype == torch.bfloat16
    section = result["cost"]
    assert (section["device"], section["dtype"]) == ("cpu", "float32") and "(CPU, fp32)" in format_cost(section)


# --------------------------------------------------------------------------- which checkpoint is scored
@pytest.fixture(scope="module")
def run_with_older_best(run, tmp_path_factory):
    """A copy of the run with checkpoint-2 (other weights) after checkpoint-1, which is marked best.

    Whether a short training run's best eval checkpoint is an older one depends on the numbers, so
    the run's files are written directly, with the trainer's own save_checkpoint and mark_best.
    """
    folder, student, _, cfg = run
    two = tmp_path_factory.mktemp("best") / "run"
    shutil.copytree(folder, two, ignore=shutil.ignore_patterns("eval", "student", "student-eval"))
    newer = copy.deepcopy(student)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(7)
        for p in newer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    accelerator = Accelerator(cpu=True)
    save_checkpoint(accelerator, two, 2, None, cfg, accelerator.prepare(newer))
    AcceleratorState._reset_state(reset_partial_state=True)
    mark_best(two, 1, {"step": 1, "loss": 1.0}, total_limit=None)
    assert json.loads((two / BEST_FILE).read_text())["checkpoint"] == "checkpoint-1"
    export_run(two, two / "student")  # from a checkpoint, as train exports: the best one
    return two, student, newer.eval()


def _same_weights(encoder, weights: dict[str, torch.Tensor]) -> bool:
    state = encoder.state_dict()
    return state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in state)


def test_run_is_scored_at_the_exported_best_checkpoint_by_default(run_with_older_best):
    two, best, newer = run_with_older_best
    exported = load_file(two / "student" / "model.safetensors")
    target = load_target(two)
    assert target.source == two / "checkpoint-1" and _same_weights(target.encoder, exported)
    assert _same_weights(target.encoder, best.encoder.state_dict())
    latest = load_target(two, checkpoint="latest")
    assert latest.source == two / "checkpoint-2" and _same_weights(latest.encoder, newer.encoder.state_dict())
    assert not _same_weights(latest.encoder, exported)
    # A run that asked to export its final weights is scored there too.
    final = load_target(two, overrides=["training.load_best_at_end=false"])
    assert final.source == two / "checkpoint-2" and final.checkpoint["why"] == "training.load_best_at_end is false"

    out = evaluate(two, probe=False, cost=False, max_items=2, device="cpu")
    saved = json.loads((two / "eval" / "eval.json").read_text())
    assert saved["weights"] == str(two / "checkpoint-1") == out["checkpoint"]["path"]
    assert saved["checkpoint"] == {"path": str(two / "checkpoint-1"), "step": 1, "requested": "best", "picked": "best",
                                   "why": "the best eval checkpoint", "best_step": 1, "newest_step": 2}
    assert "scored checkpoint-1 (step 1): the best eval checkpoint; the newest is step 2" in format_report(out)


def test_cli_checkpoint_latest_scores_the_newest(run_with_older_best, tmp_path, capsys):
    two, *_ = run_with_older_best
    assert cli_main(["evaluate", str(two), "--checkpoint", "latest", "--no-probe", "--no-cost", "--max-items", "2",
                     "--device", "cpu", "--out-dir", str(tmp_path / "eval")]) == 0
    record = json.loads((tmp_path / "eval" / "eval.json").read_text())["checkpoint"]
    assert (record["step"], record["picked"], record["why"], record["best_step"]) == (2, "latest", "asked for", 1)
    assert "scored checkpoint-2 (step 2): the newest checkpoint (asked for); the best eval checkpoint is step 1" in capsys.readouterr().out
    # An exported folder has no checkpoints; an unknown choice is refused by argparse.
    assert cli_main(["evaluate", str(two / "student"), "--checkpoint", "latest", "--no-probe", "--no-cost"]) == 2
    assert "an exported student has no checkpoints" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["evaluate", str(two), "--checkpoint", "first"])
