"""Speaker verification probe: the EER against known answers, the speaker split, and end to end on
toy extractors whose features carry speaker identity perfectly (EER ~0) or not at all (EER ~0.5)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.evaluation.probe import run_probes
from distill.evaluation.tasks import ProbeResult, ProbeTask
from distill.evaluation.verification import equal_error_rate, score_trials, split_speakers

DIM = 16  # toy extractor: one frame per DIM samples, the frame is those samples


# --------------------------------------------------------------------------- the EER


def _reference_eer(target, nontarget) -> float:
    """Independent brute force: every operating point by direct counting, then the crossing."""
    thresholds = sorted(set(target) | set(nontarget)) + [math.inf]
    points = [(sum(s < t for s in target) / len(target), sum(s >= t for s in nontarget) / len(nontarget))
              for t in thresholds]
    for (frr0, far0), (frr1, far1) in zip(points, points[1:]):
        if frr1 - far1 >= 0:
            if frr0 - far0 >= 0:
                return frr0
            a = (far0 - frr0) / ((frr1 - far1) - (frr0 - far0))
            return frr0 + a * (frr1 - frr0)
    raise AssertionError("unreachable")


@pytest.mark.parametrize("target, nontarget, expected", [
    ([0.6, 0.7, 0.9], [0.1, 0.2, 0.5], 0.0),  # separable
    ([0.1, 0.2], [0.6, 0.7, 0.9], 1.0),  # reversed
    ([0.5] * 3, [0.5] * 4, 0.5),  # all tied: no information
    # Accept at >= 0.6: 0.1 rejected (FRR 1/4), 0.9 accepted (FAR 1/4): an operating point on the diagonal.
    ([0.1, 0.6, 0.7, 0.8], [0.2, 0.3, 0.4, 0.9], 0.25),
    # Points (FRR, FAR) ... (1/3, 1/2) at t=0.5, (1/3, 0) at t=0.9: the segment crosses at 1/3.
    ([0.3, 0.9, 0.95], [0.1, 0.5], 1 / 3),
    ([1.0, 3.0], [0.0, 2.0], 0.5),  # symmetric overlap
])
def test_eer_hand_computed(target, nontarget, expected):
    assert equal_error_rate(target, nontarget) == pytest.approx(expected, abs=1e-12)
    assert _reference_eer(target, nontarget) == pytest.approx(expected, abs=1e-12)


def test_eer_matches_brute_force_and_is_symmetric():
    rng = np.random.default_rng(0)
    for _ in range(20):
        t = np.round(rng.normal(1.0, 1.0, rng.integers(1, 30)), 1)  # rounded: ties happen
        n = np.round(rng.normal(0.0, 1.0, rng.integers(1, 30)), 1)
        eer = equal_error_rate(t, n)
        assert eer == pytest.approx(_reference_eer(t.tolist(), n.tolist()), abs=1e-12)
        # Swapping the roles and negating the scores is the same detector.
        assert equal_error_rate(-n, -t) == pytest.approx(eer, abs=1e-12)
        assert equal_error_rate(torch.tensor(t), list(n)) == eer  # any sequence type


def test_eer_of_gaussians_is_phi_of_half_the_distance():
    # Unit-variance Gaussians with means +-1: the threshold 0 gives FAR = FRR = Phi(-1) = 0.1587.
    rng = np.random.default_rng(1)
    eer = equal_error_rate(rng.normal(1, 1, 40_000), rng.normal(-1, 1, 40_000))
    assert eer == pytest.approx(0.5 * math.erfc(1 / math.sqrt(2)), abs=0.006)


def test_eer_refuses_empty_or_nan():
    with pytest.raises(ValueError, match="0 target and 2 non-target"):
        equal_error_rate([], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        equal_error_rate([float("nan")], [0.1])


# --------------------------------------------------------------------------- split and trials


def test_split_alternates_shared_speakers_and_keeps_disjoint_ones():
    split = split_speakers(["a", "b", "c", "d", "x", None], ["d", "c", "b", "a", "b", "y", ""])
    # Sorted a, b, c, d, x, y: shared b and d at odd places -> unseen; x (train only) seen; y (test only) unseen.
    assert split.seen == ["a", "c", "x"] and split.unseen == ["b", "d", "y"]
    disjoint = split_speakers(["a", "b", "a"], ["c", "d", "c"])
    assert disjoint.seen == ["a", "b"] and disjoint.unseen == ["c", "d"]
    # Order-free: the same labels in another order give the same split.
    assert split_speakers(["b", "a", "c", "d"], ["d", "d", "b"]) == split_speakers(["a", "b", "c", "d"], ["b", "d", "d"])


@pytest.mark.parametrize("train, test, match", [
    (["a", "b", "c"], ["a", "b", "c"], "2 seen speakers .* and 1 unseen"),  # a, b, c: only b at an odd place
    (["a"], ["b", "c"], "1 seen speakers"),
    (["a", "b"], ["c", "d"], "no unseen speaker has 2 test utterances"),
])
def test_split_refuses_too_few_speakers(train, test, match):
    with pytest.raises(ValueError, match=match):
        split_speakers(train, test)


def test_trials_are_all_pairs_scored_by_cosine_and_capped():
    emb = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    target, nontarget = score_trials(emb, ["a", "a", "b", "b"])
    assert sorted(target.tolist()) == pytest.approx([1 / math.sqrt(2), 1.0])
    assert sorted(nontarget.tolist()) == pytest.approx([0.0, 0.0, 1 / math.sqrt(2), 1 / math.sqrt(2)])
    capped = score_trials(torch.randn(40, 3, generator=torch.Generator().manual_seed(0)), ["a", "b"] * 20, max_trials=50)
    assert len(capped[0]) == 50 and len(capped[1]) == 50
    again = score_trials(torch.randn(40, 3, generator=torch.Generator().manual_seed(0)), ["a", "b"] * 20, max_trials=50)
    assert torch.equal(capped[0], again[0])  # seeded


# --------------------------------------------------------------------------- end to end


def _batches(speakers: list[str], per_speaker: int, identity: bool, seed: int) -> list[dict]:
    """Utterances whose frames are their speaker's vector plus noise (`identity`) or pure noise."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for name in speakers:
        code = torch.randn(DIM, generator=torch.Generator().manual_seed(sum(map(ord, name))))
        for _ in range(per_speaker):
            frames = int(torch.randint(4, 12, (1,), generator=g))
            noise = torch.randn(frames, DIM, generator=g)
            items.append(((code + 0.3 * noise) if identity else noise, name))
    order = torch.randperm(len(items), generator=g).tolist()
    items = [items[i] for i in order]
    batches = []
    for start in range(0, len(items), 4):
        chunk = items[start: start + 4]
        lengths = torch.tensor([f.shape[0] * DIM for f, _ in chunk])
        waves = torch.zeros(len(chunk), int(lengths.max()))
        for b, (f, _) in enumerate(chunk):
            waves[b, : f.numel()] = f.reshape(-1)
        batches.append({"waveforms": waves, "lengths": lengths, "ids": [str(i) for i in range(len(chunk))],
                        "speaker": [s for _, s in chunk]})
    return batches


def _extract(waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    frames = waveforms.reshape(waveforms.shape[0], -1, DIM)
    return torch.stack([frames, 0.5 * frames]), lengths // DIM  # two "layers"


def _probe(identity: bool) -> ProbeResult:
    speakers = [f"spk{i:02d}" for i in range(12)]
    train, test = _batches(speakers, 8, identity, seed=1), _batches(speakers, 6, identity, seed=2)
    task = ProbeTask.from_batches(train, "verification", "speaker")
    return run_probes(_extract, train, test, [task], steps=150, learning_rate=5e-3, seed=0)["verification:speaker"]


def test_probe_gives_zero_eer_when_features_carry_identity():
    result = _probe(identity=True)
    assert result.metric == "eer" and result.lower_is_better
    assert result.score < 0.03
    # 12 speakers in both splits: every other one unseen; 6 x 6 test utterances -> C(36, 2) trials.
    assert (result.seen_speakers, result.unseen_speakers) == (6, 6)
    assert result.num_train == 6 * 8 and result.num_dev == 6 * 6
    assert result.trials == 36 * 35 // 2 and result.target_trials == 6 * (6 * 5 // 2)
    d = result.to_dict()
    assert d["one_minus_eer"] == pytest.approx(1 - result.score) and d["metric"] == "eer" and d["lower_is_better"]


def test_probe_gives_chance_eer_on_noise_features():
    result = _probe(identity=False)
    assert 0.35 < result.score < 0.65


def test_probe_refuses_too_few_unseen_speakers_and_keeps_other_rows_unchanged():
    train, test = _batches(["a", "b", "c"], 4, True, 1), _batches(["a", "b"], 4, True, 2)
    task = ProbeTask.from_batches(train, "verification", "speaker")
    with pytest.raises(ValueError, match=r"run_probe verification:speaker: .* need at least 2 of each"):
        run_probes(_extract, train, test, [task], steps=2)
    plain = ProbeResult("accuracy", 0.5, 0.1, 2, 3, 4)
    assert "trials" not in plain.to_dict() and "one_minus_eer" not in plain.to_dict()


# --------------------------------------------------------------------------- consumers


def _section(result: ProbeResult) -> dict:
    row = {"model": "student", **result.to_dict()}
    return {"budget": {"interface": "weighted_sum", "steps": 2, "learning_rate": 1e-3, "seed": 0},
            "train_utterances": 48, "dev_utterances": 36,
            "tasks": {"verification:speaker": {"metric": "eer", "lower_is_better": True,
                                               "missing": {"train": 0, "dev": 0}, "rows": [row]}}}


def test_report_table_and_plot_name_the_metric_and_trials(tmp_path):
    from distill.evaluation.plots import format_probes, plot_probe_scores

    result = ProbeResult("eer", 0.125, 0.3, 2, 48, 36, seen_speakers=6, unseen_speakers=6, trials=630, target_trials=90)
    table = format_probes(_section(result))
    assert "verification:speaker (eer, lower is better)" in table and "| student | 0.1250 |" in table
    assert "6 seen speakers" in table and "630 trials (90 same-speaker) of 6 unseen speakers" in table
    assert "1 - EER" in table
    pytest.importorskip("matplotlib")
    assert plot_probe_scores(_section(result), tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_probes_verification_on_the_demo_voices(tmp_path):
    """The CLI path: a bare HF student folder, the demo corpus's 4 voices (`label`): sorted, every
    other one unseen -> 2 seen (16 train utterances), 2 unseen (4 dev utterances, 6 trials)."""
    from transformers import AutoConfig, AutoModel

    from conftest import TINY_CONFIGS
    from distill.cli import main as cli_main

    cfg = dict(TINY_CONFIGS["hubert"])
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(tmp_path / "student")
    demo = str(Path(__file__).resolve().parents[1] / "data" / "demo")
    code = cli_main(["evaluate", str(tmp_path / "student"), "data.eval_split_name=dev", "--data", demo,
                     "--probe-task", "verification:label", "--probe-steps", "2", "--max-items", "0", "--no-cost",
                     "--out-dir", str(tmp_path / "eval")])
    assert code in (0, None)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    task = saved["probes"]["tasks"]["verification:label"]
    assert task["metric"] == "eer" and task["lower_is_better"]
    row = task["rows"][0]
    assert (row["seen_speakers"], row["unseen_speakers"], row["num_train"], row["num_dev"]) == (2, 2, 16, 4)
    assert (row["trials"], row["target_trials"]) == (6, 2) and 0 <= row["score"] <= 1
    assert row["one_minus_eer"] == pytest.approx(1 - row["score"])
    # Too few utterances read: too few speakers; skipped with the reason, the other task still runs.
    from distill.evaluation.suite import evaluate

    out = evaluate(tmp_path / "student", data=demo, overrides=["data.eval_split_name=dev"], cost=False, max_items=2,
                   probe_tasks=("verification:label", "classification:label"), probe_steps=2, out_dir=tmp_path / "e2")
    assert "need at least 2 of each" in out["probes"]["tasks"]["verification:label"]["skipped"]
    assert "rows" in out["probes"]["tasks"]["classification:label"]


def test_benchmark_config_scores_and_report_handle_verification():
    from benchmarks.mini_superb.config import BenchmarkConfigError, load_config
    from benchmarks.mini_superb.report import FUSED, criteria, markdown
    from benchmarks.mini_superb.stages import _with_error

    cfg = load_config(overrides=["tasks=[ctc:phonemes, verification:speaker]"])
    assert cfg.tasks == ["ctc:phonemes", "verification:speaker"]
    with pytest.raises(BenchmarkConfigError, match=r"tasks: 'verify:speaker', expected KIND:COLUMN .*verification"):
        load_config(overrides=["tasks=[verify:speaker]"])
    scored = _with_error(ProbeResult("eer", 0.2, 0.1, 2, 48, 36, seen_speakers=6, unseen_speakers=6, trials=630,
                                     target_trials=90).to_dict())
    assert scored["value"] == pytest.approx(0.8) and scored["value_metric"] == "1 - eer"

    def row(name, group, eer):
        task = _with_error(ProbeResult("eer", eer, 0.1, 2, 48, 36).to_dict())
        return {"name": name, "group": group, "tasks": {"verification:speaker": task}, "params": 1e6}

    rows = [row("upstream: a", "upstream", 0.3), row("upstream: b", "upstream", 0.4), row(FUSED, "fused", 0.2),
            row("student of fused teacher", "student", 0.27), row("student of a", "student", 0.35)]
    verdict, lines, retention = criteria(rows)
    # Retention of 1 - EER: 0.73 / 0.80 = 91.25%; the lower EER wins (a) and (c).
    assert retention["verification:speaker"] == pytest.approx(0.9125) and verdict == {"a": True, "b": True, "c": True}
    assert "ASV (1-EER) 91.2%" in lines[1]
    assert "| ASV (1-EER) |" in markdown({"rows": rows, "criteria_lines": lines})
