"""FusedTeacher: batch invariance, targets, PCA fit, save/load, config hash, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from conftest import make_wave, tiny_config

from teachers import FusedTeacher, TeacherOutput, describe

MIXED = [(1.0, 0), (1.37, 1), (2.0, 2), (1.0, 3)]  # two equal lengths share an upstream batch
KINDS = ("wavlm", "hubert", "whisper", "data2vec-audio")


def _waves(spec=MIXED):
    return [make_wave(seconds, seed) for seconds, seed in spec]


@pytest.fixture(scope="module")
def specs(tiny_upstream_dirs):
    return [tiny_upstream_dirs[k] for k in KINDS]


@pytest.fixture(scope="module")
def concat_teacher(specs):
    return FusedTeacher.from_config({"upstreams": specs, "target_mode": "concat", "fusion": "hconv", "projection_fit": "none"})


@pytest.fixture(scope="module")
def pca_teacher(specs):
    teacher = FusedTeacher.from_config({"upstreams": specs, "projection_dim": 24, "target_layers": [0, 1, 2]})
    teacher.fit_pca(iter(_waves([(1.5, 10), (1.2, 11), (1.8, 12)])), batch_size=2)
    return teacher


@pytest.mark.parametrize("which", ["concat_teacher", "pca_teacher"])
def test_batch_invariance(request, which):
    teacher = request.getfixturevalue(which)
    waves = _waves()
    batch = teacher.targets(waves)
    for b, wave in enumerate(waves):
        alone = teacher.targets([wave])
        n = int(batch.lengths[b])
        assert n == int(alone.lengths[0])
        torch.testing.assert_close(batch.layers[:, b, :n], alone.layers[:, 0], atol=1e-5, rtol=0)


def test_targets_shapes_and_frame_grids(concat_teacher):
    waves = _waves()
    out = concat_teacher.targets(waves)
    assert isinstance(out, TeacherOutput) and out.output is None
    assert concat_teacher.num_aligned_layers == 3 and concat_teacher.target_layer_ids == (1, 2)
    assert out.layers.shape == (2, 4, 99, 4 * 32) and out.layers.dtype == torch.float32
    assert out.lengths.tolist() == [49, 68, 99, 49]
    assert out.layers[:, 0, 49:].abs().max() == 0
    assert out.frame_mask.sum(1).tolist() == out.lengths.tolist()
    assert concat_teacher.targets(waves, num_frames=30).lengths.tolist() == [30] * 4
    assert concat_teacher.targets(waves, num_frames=[5, 6, 7, 8]).layers.shape[2] == 8
    whisper_grid = concat_teacher.targets(waves, num_frames=lambda s: (s // 160 + 1) // 2)
    assert whisper_grid.lengths.tolist() == [50, 69, 100, 50]


def test_padded_batch_equals_list(concat_teacher):
    waves = _waves()
    padded = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    lengths = torch.tensor([w.numel() for w in waves])
    a, b = concat_teacher.targets(waves), concat_teacher.targets(padded, lengths=lengths)
    torch.testing.assert_close(a.layers, b.layers, rtol=0, atol=0)


def test_features_are_normalised_per_upstream(concat_teacher):
    feats, lengths = concat_teacher.features(_waves()[:2])
    assert feats.shape == (3, 2, 68, 128)
    blocks = feats[:, 1, : lengths[1]].unflatten(-1, (4, 32))
    torch.testing.assert_close(blocks.mean(-1), torch.zeros_like(blocks[..., 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(blocks.var(-1, unbiased=False), torch.ones_like(blocks[..., 0]), atol=1e-3, rtol=0)


def test_pca_matches_svd_on_all_frames(specs):
    teacher = FusedTeacher.from_config({"upstreams": specs[:2], "projection_dim": 6})
    waves = _waves([(1.1, 20), (1.6, 21), (0.9, 22)])
    with pytest.raises(RuntimeError, match="not fitted"):
        teacher.targets(waves)
    ratio = teacher.fit_pca(waves, batch_size=2)
    assert 0 < ratio <= 1 and teacher.fitted
    feats, lengths = teacher.features(waves)
    rows = torch.cat([feats[:, b, :n].reshape(-1, feats.shape[-1]) for b, n in enumerate(lengths)]).double()
    mean = rows.mean(0)
    _, _, vh = torch.linalg.svd(rows - mean, full_matrices=False)
    weight = teacher.projection.weight.double()
    cosines = (weight @ vh[:6].T).diag().abs()
    torch.testing.assert_close(cosines, torch.ones(6, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(teacher.projection.bias.double(), -weight @ mean, atol=1e-5, rtol=0)
    z = teacher.project(feats)
    projected = torch.cat([z[:, b, :n].reshape(-1, 6) for b, n in enumerate(lengths)])
    torch.testing.assert_close(projected.mean(0), torch.zeros(6), atol=1e-4, rtol=0)


def test_pca_max_frames_limits_the_sample(specs):
    teacher = FusedTeacher.from_config({"upstreams": specs[:1], "projection_dim": 4})
    waves = _waves([(1.0, 30), (1.0, 31), (1.0, 32)])
    teacher.fit_pca(waves, max_frames=49, batch_size=1)  # first utterance only
    reference = FusedTeacher.from_config({"upstreams": specs[:1], "projection_dim": 4})
    reference.fit_pca(waves[:1])
    torch.testing.assert_close(teacher.projection.weight, reference.projection.weight)


def test_save_load_roundtrip_and_hash(pca_teacher, tmp_path):
    folder = pca_teacher.save_pretrained(tmp_path / "teacher")
    assert sorted(p.name for p in folder.iterdir()) == ["fused_teacher.json", "fusion.safetensors"]
    record = json.loads((folder / "fused_teacher.json").read_text())
    assert record["config"] == pca_teacher.config and record["fitted"]
    loaded = FusedTeacher.from_pretrained(folder, progress=lambda line: None)
    assert loaded.config_hash() == pca_teacher.config_hash()
    waves = _waves()[:2]
    torch.testing.assert_close(loaded.targets(waves).layers, pca_teacher.targets(waves).layers, rtol=0, atol=0)
    # Another process, another working directory: same hash.
    code = f"from teachers import FusedTeacher; print(FusedTeacher.from_pretrained({str(folder)!r}).config_hash())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert other.stdout.strip() == pca_teacher.config_hash()


def test_hash_depends_on_config_and_weights(specs):
    a = FusedTeacher.from_config({"upstreams": specs[:2], "projection_dim": 8})
    b = FusedTeacher.from_config({"upstreams": specs[:2], "projection_dim": 8})
    assert a.config_hash() == b.config_hash()
    assert FusedTeacher.from_config({"upstreams": specs[:2], "projection_dim": 9}).config_hash() != a.config_hash()
    with torch.no_grad():
        b.projection.bias.add_(1e-3)
    assert a.config_hash() != b.config_hash()
    json.dumps(a.config)  # JSON-able
    assert a.config["upstreams"] == [str(Path(s).resolve()) for s in specs[:2]]


@dataclass
class _TeacherSection:  # shaped like the recipe's teacher section
    upstreams: list[Any] = field(default_factory=list)
    fusion: str = "weighted_sum"
    projection_dim: Optional[int] = 16
    projection_fit: str = "pca"
    pretrained: Optional[str] = None
    target_layers: Optional[list[int]] = None
    target_mode: str = "chconv"
    include_interface_output: bool = True
    normalize: bool = True
    dtype: str = "float32"
    pca_max_utterances: int = 64


def test_from_dataclass_and_pretrained(tmp_path):
    section = _TeacherSection(upstreams=[tiny_config("hubert"), tiny_config("wav2vec2")])
    lines: list[str] = []
    teacher = FusedTeacher.from_config(section, progress=lines.append)
    assert len(lines) == 2 and "hubert(random-init)" in lines[0]
    assert teacher.config["upstreams"][0]["config"]["conv_dim"] == [16] * 7
    teacher.fit_pca(_waves()[:2])
    out = teacher.targets(_waves()[:2])
    z = teacher.project(teacher.features(_waves()[:2])[0])
    # Zero-initialised WeightedSum is the layer average of Z.
    torch.testing.assert_close(out.output, z.mean(0) * out.frame_mask[..., None], atol=1e-5, rtol=0)
    teacher.save_pretrained(tmp_path / "fitted")
    section.pretrained = str(tmp_path / "fitted")
    again = FusedTeacher.from_config(section, progress=lines.append)
    assert again.fitted and again.config_hash() == teacher.config_hash()
    section.projection_dim = 12
    with pytest.raises(ValueError, match="fitted for another fusion"):
        FusedTeacher.from_config(section, progress=lines.append)


def test_average_mode_and_bfloat16():
    teacher = FusedTeacher.from_config(
        {"upstreams": [tiny_config("hubert"), tiny_config("wavlm")], "target_mode": "average",
         "fusion": "add_hconv", "projection_fit": "none", "dtype": "bfloat16"}
    )
    assert teacher.target_dim == 32 and teacher.projection is None and teacher.config["dtype"] == "bfloat16"
    feats, _ = teacher.features([make_wave(1.0)])
    out = teacher.targets([make_wave(1.0)])
    assert out.layers.dtype == torch.float32
    torch.testing.assert_close(out.layers, (feats[..., :32] + feats[..., 32:])[[1, 2]] / 2)


def test_configuration_errors(specs):
    base = {"upstreams": specs[:2], "projection_dim": 8}
    with pytest.raises(ValueError, match=r"projection_dim=65 must be in 1..64"):
        FusedTeacher.from_config({**base, "projection_dim": 65})
    with pytest.raises(ValueError, match="target_mode=average needs equal widths"):
        FusedTeacher.from_config({"upstreams": [tiny_config("hubert"), tiny_config("wavlm", hidden_size=48)],
                                  "target_mode": "average", "fusion": "hconv"})
    with pytest.raises(ValueError, match="unknown key"):
        FusedTeacher.from_config({**base, "fusoin": "hconv"})
    with pytest.raises(ValueError, match="fusion='mlp'"):
        FusedTeacher.from_config({**base, "fusion": "mlp"})
    with pytest.raises(ValueError, match="fusion=add_hconv sums"):
        FusedTeacher.from_config({**base, "fusion": "add_hconv"})
    with pytest.raises(ValueError, match="float16 is refused"):
        FusedTeacher.from_config({**base, "dtype": "float16"})
    with pytest.raises(ValueError, match=r"target_layers=\[5\]"):
        FusedTeacher.from_config({**base, "target_layers": [5]})
    with pytest.raises(ValueError, match="needs projection_fit=supervised"):
        FusedTeacher.from_config({**base, "include_interface_output": True})


def test_input_errors(concat_teacher):
    wave = make_wave(1.0)
    with pytest.raises(ValueError, match="sampling_rate must be 16000, got 8000; resample first"):
        concat_teacher.targets([wave], sampling_rate=8000)
    with pytest.raises(ValueError, match=r"expected \(B, S\)"):
        concat_teacher.targets(wave)
    with pytest.raises(ValueError, match="waveform 0 is .* torch.int16"):
        concat_teacher.targets([(wave * 32767).to(torch.int16)])
    with pytest.raises(ValueError, match="lengths are only for a padded"):
        concat_teacher.targets([wave], lengths=torch.tensor([16000]))
    with pytest.raises(ValueError, match="do not fit a batch"):
        concat_teacher.targets(wave[None], lengths=torch.tensor([20000]))
    with pytest.raises(ValueError, match="wavlm.*minimum 400"):
        concat_teacher.targets([wave, torch.zeros(300)], num_frames=1)


def test_describe(pca_teacher):
    info = describe(pca_teacher, seconds=1.0)
    json.dumps(info)
    assert [u["model_type"] for u in info["upstreams"]] == list(KINDS)
    assert info["upstreams"][2]["frame_rate"] == 50.0 and info["upstreams"][2]["num_frames"] == 50
    assert info["aligned_shape"] == [3, 49, 128] and info["target_dim"] == 24
    assert info["interface_parameters"] == sum(p.numel() for p in pca_teacher.interface.parameters())
    assert info["forward_ms"] >= info["fusion_ms"] > 0
    assert "forward_ms" not in describe(pca_teacher, seconds=1.0, timed=False)
