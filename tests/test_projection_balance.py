"""Projection diagnostics and balance: how much of each upstream the PCA projection keeps, checked
against independent numpy computations, and a low-variance but informative upstream that plain PCA
drops and the balanced projections keep.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from conftest import make_wave, tiny_config

from distill.build import teacher_config_diffs
from distill.config import TeacherConfig
from teachers import FusedTeacher
from teachers.pca import CovarianceAccumulator, retained_variance, split_dims


def _accumulate(rows: np.ndarray) -> CovarianceAccumulator:
    stats = CovarianceAccumulator(rows.shape[1])
    for chunk in np.array_split(rows, 3):  # streamed in pieces, as fit_pca does
        stats.update(torch.from_numpy(chunk))
    return stats


def _kept_by_regression(rows: np.ndarray, weight: np.ndarray, dims: list[int]) -> tuple[list[float], float]:
    """Independent: least-squares reconstruction of each block from the projected rows."""
    centred = rows - rows.mean(axis=0)
    z = centred @ weight.T
    fit = z @ np.linalg.lstsq(z, centred, rcond=None)[0]
    bounds = np.cumsum([0, *dims])
    per_block = [float(np.sum(fit[:, a:b] ** 2) / np.sum(centred[:, a:b] ** 2)) for a, b in zip(bounds, bounds[1:])]
    return per_block, float(np.sum(fit ** 2) / np.sum(centred ** 2))


def _correlated_rows(seed: int = 0, n: int = 2000) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    dims = [6, 4, 5]
    mixing = rng.normal(size=(15, 15)) * np.repeat([2.0, 0.5, 1.0], dims)[None, :]
    return rng.normal(size=(n, 15)) @ mixing + 3.0, dims


@pytest.mark.parametrize("balance", ["none", "equal_variance", "split"])
def test_retained_variance_matches_a_least_squares_reconstruction(balance):
    rows, dims = _correlated_rows()
    stats = _accumulate(rows)
    weight, bias = stats.principal_projection(5, dims, balance)
    per_block, total = retained_variance(stats.covariance(), weight, dims)
    expected_blocks, expected_total = _kept_by_regression(rows, weight.numpy(), dims)
    np.testing.assert_allclose(per_block, expected_blocks, rtol=1e-6, atol=1e-9)
    assert total == pytest.approx(expected_total, rel=1e-6)
    # The bias centres the projected rows whatever the balance.
    projected = rows @ weight.numpy().T + bias.numpy()
    np.testing.assert_allclose(projected.mean(axis=0), 0.0, atol=1e-8)


def test_plain_pca_retention_is_the_eigen_share_per_block():
    rows, dims = _correlated_rows(seed=1)
    stats = _accumulate(rows)
    weight, _ = stats.principal_projection(4, dims)
    per_block, total = retained_variance(stats.covariance(), weight, dims)
    cov = np.cov(rows, rowvar=False, bias=True)
    values, vectors = np.linalg.eigh(cov)
    top_values, top_vectors = values[-4:], vectors[:, -4:]
    bounds = np.cumsum([0, *dims])
    for (a, b), kept in zip(zip(bounds, bounds[1:]), per_block):
        assert kept == pytest.approx(np.sum(top_values * np.sum(top_vectors[a:b] ** 2, axis=0)) / np.trace(cov[a:b, a:b]))
    assert total == pytest.approx(top_values.sum() / values.sum()) == pytest.approx(stats.explained_variance_ratio(4))


def test_split_dims():
    assert split_dims(64, [64, 48, 64]) == [22, 21, 21]
    assert split_dims(10, [2, 16]) == [2, 8]  # a narrow upstream's unused share goes to the other
    assert split_dims(18, [2, 16]) == [2, 16]
    with pytest.raises(ValueError, match="projection_dim 19 must be in 1..18"):
        split_dims(19, [2, 16])
    stats = _accumulate(_correlated_rows()[0])
    with pytest.raises(ValueError, match="balance=split needs the upstream widths"):
        stats.principal_projection(4, None, "split")
    with pytest.raises(ValueError, match=r"widths \[6, 4\] do not add up to the feature width 15"):
        stats.principal_projection(4, [6, 4], "equal_variance")
    with pytest.raises(ValueError, match="balance='whiten'"):
        stats.principal_projection(4, [6, 4, 5], "whiten")


def test_a_low_variance_informative_upstream_is_kept_only_when_balanced():
    """Upstream A: 8 loud but label-free directions. Upstream B: quiet, and one of its directions
    carries a binary label. Plain PCA to 8 dims keeps A and drops the label; both balances keep it."""
    rng = np.random.default_rng(0)
    n = 4000
    label = rng.integers(0, 2, n).astype(np.float64)
    loud = rng.normal(size=(n, 8)) * np.sqrt([4, 2, 1, 1, 1, 1, 1, 1])
    quiet = 0.05 * rng.normal(size=(n, 8))
    quiet[:, 0] += 0.2 * (2 * label - 1)
    rows, dims = np.concatenate([loud, quiet], axis=1), [8, 8]
    stats = _accumulate(rows)

    def label_r2(weight: torch.Tensor) -> float:  # how well a linear probe on z recovers the label
        z = (rows - rows.mean(axis=0)) @ weight.numpy().T
        z1 = np.concatenate([z, np.ones((n, 1))], axis=1)
        residual = label - z1 @ np.linalg.lstsq(z1, label, rcond=None)[0]
        return 1 - residual.var() / label.var()

    outcome = {}
    for balance in ("none", "equal_variance", "split"):
        weight, _ = stats.principal_projection(8, dims, balance)
        outcome[balance] = (retained_variance(stats.covariance(), weight, dims)[0], label_r2(weight))
    (loud_kept, quiet_kept), r2 = outcome["none"]
    assert loud_kept > 0.99 and quiet_kept < 0.05 and r2 < 0.05
    for balance in ("equal_variance", "split"):
        (_, quiet_kept), r2 = outcome[balance]
        assert quiet_kept > 0.5 and r2 > 0.9, balance


# --------------------------------------------------------------------------- FusedTeacher.fit_pca


def _teacher(**settings) -> FusedTeacher:
    specs = [tiny_config("wavlm"), tiny_config("hubert", hidden_size=16, num_attention_heads=2)]
    return FusedTeacher.from_config({"upstreams": specs, "projection_dim": 8, **settings})


@pytest.mark.parametrize("balance", ["none", "equal_variance", "split"])
def test_fit_pca_reports_each_upstreams_kept_variance(balance, tmp_path, caplog):
    teacher = _teacher(projection_balance=balance)
    waves = [make_wave(1.0 + 0.3 * s, seed=s) for s in range(3)]
    with caplog.at_level(logging.INFO, logger="teachers.fused"):
        total = teacher.fit_pca(waves)
    report = teacher.projection_report
    assert report["balance"] == balance and report["projection_dim"] == 8 and report["threshold"] == 0.5
    assert [row["width"] for row in report["upstreams"]] == [32, 16] and total == report["explained_variance"]
    # Independent: numpy over the very features the fit saw, every aligned layer pooled.
    feats, lengths = teacher.features(waves)
    rows = np.concatenate([feats[:, b, :n].reshape(-1, 48).double().numpy() for b, n in enumerate(lengths.tolist())])
    assert report["frames"] == len(rows)
    expected_blocks, expected_total = _kept_by_regression(rows, teacher.projection.weight.detach().double().numpy(), [32, 16])
    np.testing.assert_allclose([row["kept"] for row in report["upstreams"]], expected_blocks, rtol=1e-4, atol=1e-6)
    assert total == pytest.approx(expected_total, rel=1e-4)
    centred = rows - rows.mean(axis=0)
    share = np.sum(centred[:, :32] ** 2) / np.sum(centred ** 2)
    assert report["upstreams"][0]["variance_share"] == pytest.approx(share, rel=1e-6)
    if balance == "none":
        values = np.linalg.eigvalsh(np.cov(rows, rowvar=False, bias=True))
        assert total == pytest.approx(values[-8:].sum() / values.sum(), rel=1e-6)
    if balance == "split":  # block-diagonal: each upstream's 4 outputs read only its own features
        weight = teacher.projection.weight.detach()
        assert not weight[:4, 32:].any() and not weight[4:, :32].any()
    assert "PCA projection (balance %s) to 8 dims keeps" % balance in caplog.text
    # Saved with the teacher and loaded back with it.
    folder = teacher.save_pretrained(tmp_path / "teacher")
    assert json.loads((folder / "fused_teacher.json").read_text())["projection_report"] == report
    loaded = FusedTeacher.from_pretrained(folder, progress=lambda line: None)
    assert loaded.projection_report == report and loaded.config["projection_balance"] == balance
    assert loaded.config_hash() == teacher.config_hash()


def test_low_retention_warning_names_the_upstream(caplog):
    teacher = _teacher(projection_dim=1)  # one direction of 48 cannot keep half of both upstreams
    with caplog.at_level(logging.WARNING, logger="teachers.fused"):
        teacher.fit_pca([make_wave(1.0, seed=s) for s in range(2)])
    low = [i for i, row in enumerate(teacher.projection_report["upstreams"]) if row["kept"] < 0.5]
    assert low and all(f"upstream {i} (hubert(random-init)" in caplog.text or f"upstream {i} (wavlm(random-init)" in caplog.text
                       for i in low)
    assert "try teacher.projection_balance=equal_variance or split" in caplog.text


def test_a_reused_run_folder_with_another_balance_is_a_diff():
    teacher = _teacher()
    recipe = TeacherConfig(upstreams=teacher.config["upstreams"], projection_dim=8, target_layers=None,
                           projection_balance="split")
    assert teacher_config_diffs(teacher.config, recipe) == ["projection_balance"]
    legacy = {k: v for k, v in teacher.config.items() if k != "projection_balance"}  # saved before the option
    assert teacher_config_diffs(legacy, TeacherConfig(upstreams=teacher.config["upstreams"], projection_dim=8)) == []
    with pytest.raises(ValueError, match="projection_balance='whiten'"):
        _teacher(projection_balance="whiten")


def test_inspect_teacher_fits_and_shows_the_projection(tmp_path):
    from distill.config import load_recipe
    from distill.inspect import inspect_teacher
    from distill.evaluation.plots import format_projection

    cfg = load_recipe("demo", ["teacher.pca_max_utterances=3", "teacher.projection_balance=split"])
    plain = inspect_teacher(cfg, seconds=0.5)
    assert "projection: PCA not fitted here; --fit-pca" in plain
    text = inspect_teacher(cfg, seconds=0.5, fit_pca=True)
    assert "projection (pca, balance split, 64 dims" in text
    assert all(f"| {name}(random-init) | {width} |" in text for name, width in [("wavlm", 64), ("hubert", 48), ("whisper", 64)])
    report = {"fit": "pca", "balance": "none", "projection_dim": 4, "frames": 10, "explained_variance": 0.6, "threshold": 0.5,
              "upstreams": [{"upstream": "/models/wavlm-base", "width": 8, "variance_share": 0.8, "kept": 0.7},
                            {"upstream": "org/quiet", "width": 8, "variance_share": 0.2, "kept": 0.2}]}
    table = format_projection(report)
    assert "| wavlm-base | 8 | 80.0% | 70.0% |" in table
    assert table.splitlines()[-1].startswith("warning: the projection keeps less than 50% of org/quiet;")
