"""compare-upstreams: linear CKA, held-out ridge R², the bounded frame sample, the report, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from teachers import FusedTeacher
from teachers.complementarity import FrameSample, compare, cross_cka, linear_cka, ridge_r2

REPO = Path(__file__).resolve().parent.parent


def _numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA in its kernel (frames x frames) form: HSIC of the centred Gram matrices."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float(np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l)))


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Correlated, non-centred columns: CKA must centre them itself.
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64) + 3.0


def test_cka_matches_an_independent_kernel_form():
    x, y = _features(120, 7, 0), _features(120, 5, 1)
    y = y + 0.5 * x[:, :5]  # related, not equal
    assert linear_cka(x, y) == pytest.approx(_numpy_cka(x.numpy(), y.numpy()), rel=1e-9)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_rotation_and_isotropic_scaling_but_not_to_anisotropic_scaling():
    x, y = _features(200, 6, 2), _features(200, 6, 3) + _features(200, 6, 2)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    base = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(7.5 * x, 0.01 * y) == pytest.approx(base, rel=1e-10)
    stretch = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 30.0], dtype=torch.float64)
    assert abs(linear_cka(x * stretch, y) - base) > 1e-3  # CKA is not invariant to any linear map


def test_cross_cka_is_linear_cka_per_layer_pair():
    xs, ys = [_features(80, 4, s) for s in (0, 1)], [_features(80, 3, s) for s in (2, 3, 0)]
    ys[2] = ys[2][:, :3] + xs[0][:, :3]
    table = cross_cka(xs, ys)
    assert table.shape == (2, 3)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            assert float(table[i, j]) == pytest.approx(linear_cka(x, y), rel=1e-10)
    # In parts (a FrameSample's two halves), without concatenating them: the same numbers.
    split = cross_cka([[x[:30], x[30:]] for x in xs], [[y[:30], y[30:]] for y in ys])
    assert torch.allclose(split, table, rtol=1e-10, atol=0)


def _folds(x: torch.Tensor, y: torch.Tensor) -> tuple[list, list]:
    half = x.shape[0] // 2
    return [[x[:half]], [x[half:]]], [[y[:half]], [y[half:]]]


def test_ridge_r2_of_an_exact_linear_copy_is_one_and_of_independent_noise_about_zero():
    x = _features(2000, 16, 5)
    copy = x @ torch.randn(16, 10, generator=torch.Generator().manual_seed(6), dtype=torch.float64) - 1.0
    assert float(ridge_r2(*_folds(x, copy))[0, 0]) == pytest.approx(1.0, abs=1e-3)
    noise = _features(2000, 10, 7)
    assert abs(float(ridge_r2(*_folds(x, noise))[0, 0])) < 0.03


def test_ridge_r2_recovers_a_known_share_and_is_directional():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    # y = 4 of x's 8 directions plus independent noise of equal variance: 50% of y is predictable from
    # x, while only a quarter of x is predictable from y (half of 4 of its 8 directions).
    y = x[:, :4] + torch.randn(4000, 4, generator=g, dtype=torch.float64)
    assert float(ridge_r2(*_folds(x, y))[0, 0]) == pytest.approx(0.5, abs=0.03)
    assert float(ridge_r2(*_folds(y, x))[0, 0]) == pytest.approx(0.25, abs=0.03)


def test_frame_sample_is_bounded_uniform_and_split_by_utterance():
    sample = FrameSample(width=3, max_frames=400, seed=0, dtype=torch.float32)  # frame numbers stay exact
    size = sample.nbytes
    counter = 0
    for _ in range(200):  # 200 utterances x 50 frames = 10000 frames, 25x the budget
        frames = torch.arange(counter, counter + 50, dtype=torch.float32)[:, None].expand(50, 3)
        sample.add(frames)
        counter += 50
    assert sample.nbytes == size == 2 * 200 * 3 * 4
    first, second = sample.halves()
    assert len(first) == len(second) == 200 and sample.seen == [5000, 5000]
    index = torch.cat([first[:, 0], second[:, 0]])
    assert len(set(index.tolist())) == 400  # no frame twice
    utterance = (index // 50).long()
    assert bool((utterance[:200] % 2 == 0).all()) and bool((utterance[200:] % 2 == 1).all())
    # Uniform over the stream: each quarter of the audio holds about a quarter of the sample.
    quarters = torch.bincount((index // 2500).long(), minlength=4).tolist()
    assert all(60 <= q <= 140 for q in quarters), quarters
    small = FrameSample(width=2, max_frames=100)
    small.add(torch.ones(7, 2))
    small.add(2 * torch.ones(5, 2))
    assert [len(h) for h in small.halves()] == [7, 5]  # under the budget every frame is kept


def _sample_of(blocks: list[torch.Tensor], layers: int, frames_per_utterance: int = 40) -> FrameSample:
    rows = torch.cat(blocks, dim=1).repeat(1, layers)  # the same features at every layer
    sample = FrameSample(rows.shape[1], max_frames=rows.shape[0])
    for start in range(0, rows.shape[0], frames_per_utterance):
        sample.add(rows[start: start + frames_per_utterance].float())
    return sample


def test_report_flags_a_near_copy_as_redundant_and_ranks_the_independent_pair_first():
    g = torch.Generator().manual_seed(9)
    content = torch.randn(2400, 12, generator=g)
    twin = content @ torch.linalg.qr(torch.randn(12, 12, generator=g))[0] + 0.1 * torch.randn(2400, 12, generator=g)
    speaker = torch.randn(2400, 8, generator=g)
    report = compare(_sample_of([content, speaker, twin], layers=2), ["content", "speaker", "twin"], [12, 8, 12], 2)
    rows = {u.name: u for u in report.upstreams}
    assert rows["twin"].predictable_from == "content" and rows["twin"].adds_beyond < 0.05
    assert rows["twin"].sentence.startswith("twin adds little: 99% of its variance is predictable from content")
    assert rows["speaker"].adds_beyond > 0.95 and "adds much" in rows["speaker"].sentence
    assert {report.pairs[-1].a, report.pairs[-1].b} == {"content", "twin"}  # least complementary last
    assert report.pairs[-1].best_cka > 0.95 and report.pairs[0].best_cka < 0.05
    assert report.pairs[0].complementarity > 0.95


def _tiny_teacher() -> FusedTeacher:
    common = dict(num_attention_heads=2, conv_dim=[16] * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                  layerdrop=0.0)
    return FusedTeacher.from_config({
        "upstreams": [{"config": {"model_type": "hubert", "hidden_size": 16, "num_hidden_layers": 2,
                                  "intermediate_size": 32, **common}},
                      {"config": {"model_type": "wav2vec2", "hidden_size": 24, "num_hidden_layers": 1,
                                  "intermediate_size": 32, **common}}],
        "projection_dim": 8}, progress=lambda *_: None)


def test_memory_is_bounded_by_the_frame_budget_whatever_the_audio():
    from distill.complementarity import complementarity_of

    teacher = _tiny_teacher()
    g = torch.Generator().manual_seed(10)
    waves = [0.1 * torch.randn(16000, generator=g) for _ in range(12)]  # 12 x 49 frames
    budget_mb = 100 * 3 * 40 * 2 / 2**20  # 100 frames of 3 aligned layers x (16 + 24) bfloat16 features
    report = complementarity_of(teacher, waves, max_frames=10_000, max_memory_mb=budget_mb, names=["h", "w"])
    assert sum(report.frames["sampled"]) == 100 and sum(report.frames["seen"]) == 12 * 49
    assert report.frames["pooled_for_pca"] == 3 * 12 * 49
    assert report.frames["sample_mb"] <= budget_mb + 1e-9
    assert len(report.pairs) == 1 and report.upstreams[0].pca_kept is not None


def test_cli_on_the_demo_recipe(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "distill", "compare-upstreams", "demo", "--max-utterances", "8",
                             "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "complementarity.json").read_text())
    assert report["frames"]["utterances"] == 8
    assert len(report["pairs"]) == 3 and len(report["upstreams"]) == 3
    for pair in report["pairs"]:
        assert len(pair["cka"]) == len(pair["r2_a_to_b"]) == 4  # the demo's 4 aligned layers
        assert all(0.0 <= v <= 1.0 + 1e-9 for row in pair["cka"] for v in row)
    assert [p["complementarity"] for p in report["pairs"]] == sorted((p["complementarity"] for p in report["pairs"]), reverse=True)
    assert sum(u["variance_share"] for u in report["upstreams"]) == pytest.approx(1.0)
    for upstream in report["upstreams"]:
        assert upstream["sentence"] in result.stdout
    assert "most complementary pair:" in result.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert all(Path(p["heatmap"]).is_file() for p in report["pairs"])


def _task(value: float, stderr: float = 0.01) -> dict:
    return {"value": value, "stderr": stderr}


def _probes(triple_mean: float) -> dict:
    four = lambda v: {t: _task(v) for t in ("ctc:phonemes", "classification:speaker", "classification:language", "classification:style")}
    return {"content": four(0.50), "speaker": four(0.40), "content-seed1": four(0.49),
            "content + speaker": four(0.66), "content + content-seed1": four(0.51), "speaker + content-seed1": four(0.64),
            "content + speaker + content-seed1": four(triple_mean)}


def _report() -> dict:
    pair = lambda a, b, ba, ab: {"a": a, "b": b, "b_from_a": ba, "a_from_b": ab, "complementarity": min(1 - ba, 1 - ab)}
    pairs = [pair("content", "speaker", 0.2, 0.3), pair("speaker", "content-seed1", 0.35, 0.25),
             pair("content", "content-seed1", 0.9, 0.85)]
    upstreams = [{"name": "content", "adds_beyond": 0.15, "predictable_from": "content-seed1", "sentence": "c"},
                 {"name": "speaker", "adds_beyond": 0.7, "predictable_from": "content", "sentence": "s"},
                 {"name": "content-seed1", "adds_beyond": 0.1, "predictable_from": "content", "sentence": "r"}]
    return {"pairs": pairs, "upstreams": upstreams}


def test_validation_checks_and_rank_correlation_on_hand_made_scores():
    from benchmarks.mini_superb.complementarity import analyse, spearman

    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert spearman([1, 1, 2], [5, 6, 7]) == pytest.approx(np.corrcoef([0.5, 0.5, 2], [0, 1, 2])[0, 1])
    names = ["content", "speaker", "content-seed1"]
    # SE of a 4-task mean with per-task SE 0.01 is 0.005: +0.004 is within it, +0.02 is not.
    good = analyse(_report(), _probes(0.664), names)
    assert good["criteria"] == {"i_report_flags_redundant_and_ranks_pair": True, "ii_probe_gains_agree": True}
    assert good["gains"]["content_speaker_over_best_single"][0] == pytest.approx(0.16)
    assert good["spearman"]["per_pair"] == pytest.approx(1.0)  # gains 0.16, 0.15, 0.01 follow 0.7, 0.65, 0.1
    assert not analyse(_report(), _probes(0.68), names)["criteria"]["ii_probe_gains_agree"]


def test_one_upstream_is_refused_before_any_model_loads(monkeypatch):
    from distill import complementarity
    from distill.config import load_recipe

    cfg = load_recipe("demo", ["teacher.upstreams=[{config: {model_type: hubert}}]"])
    monkeypatch.setattr(complementarity.FusedTeacher, "from_config", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="has 1 upstream; need two or more"):
        complementarity.compare_upstreams(cfg)
