"""teacher.position_reference=silence: Whisper features minus the encoder's silent-window response.

Whisper adds absolute positions to its input; a student trained on crops cannot see where its crop
began. Subtracting the response to silence makes layer 0 exactly position-free (the conv output of
silence carries the same positional embedding) and leaves every other upstream untouched.
"""

from __future__ import annotations

import json

import pytest
import torch

from distill.build import single_upstream_teacher
from distill.config import RecipeError, load_recipe
from teachers import FusedTeacher, load_upstream
from tests.conftest import make_wave, tiny_config

HOP = 320  # one Whisper encoder frame: two 160-sample mel hops


def _whisper(subtract: bool):
    upstream = load_upstream(tiny_config("whisper"))
    upstream.subtract_silence = subtract
    return upstream


def test_silence_maps_to_zero_at_every_layer():
    upstream = _whisper(True)
    out = upstream([torch.zeros(16000)])
    assert out.hidden_states.shape[1:3] == (1, 50) and out.hidden_states.abs().max() == 0
    assert _whisper(False)([torch.zeros(16000)]).hidden_states.abs().max() > 0


def test_layer_zero_no_longer_depends_on_where_speech_starts():
    wave = make_wave(1.0, seed=3)
    delay = 10  # frames of leading silence
    delayed = torch.cat([torch.zeros(delay * HOP), wave])
    for subtract, close in ((True, True), (False, False)):
        upstream = _whisper(subtract)
        a = upstream([wave]).hidden_states[0, 0]
        b = upstream([delayed]).hidden_states[0, 0]
        inner = slice(3, 45)  # away from the conv edges at the speech onset and the end
        diff = (a[inner] - b[delay + inner.start : delay + inner.stop]).abs().max()
        assert (diff < 1e-4) == close, (subtract, float(diff))


def test_each_window_of_long_audio_subtracts_from_its_own_start():
    upstream = _whisper(True)
    wave = torch.cat([torch.zeros(480000), make_wave(2.0)])  # window 1 silent, window 2 speech
    out = upstream([wave]).hidden_states[:, 0]
    assert out.shape[1] == 1500 + 100 and out[:, :1500].abs().max() == 0 and out[:, 1500:].abs().max() > 0


def test_teacher_sets_it_on_whisper_only_and_keeps_it_through_save_and_single_views(tmp_path):
    teacher = FusedTeacher.from_config({"upstreams": [tiny_config("whisper"), tiny_config("wavlm")],
                                        "fusion": "chconv", "projection_dim": 16, "position_reference": "silence"})
    assert teacher.upstreams[0].subtract_silence and not hasattr(teacher.upstreams[1], "subtract_silence")
    assert teacher.config["position_reference"] == "silence"
    assert single_upstream_teacher(teacher, 0).upstreams[0].subtract_silence
    assert single_upstream_teacher(teacher, 0, fit=True).position_reference == "silence"
    teacher.fit_pca([make_wave(1.0), make_wave(0.8, seed=1)])
    teacher.save_pretrained(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "fused_teacher.json").read_text())["config"]["position_reference"] == "silence"
    assert FusedTeacher.from_pretrained(tmp_path / "t").upstreams[0].subtract_silence
    plain = FusedTeacher.from_config({"upstreams": [tiny_config("whisper")], "fusion": "weighted_sum",
                                      "projection_fit": "none", "target_mode": "concat"})
    # The default leaves a teacher's config (and so every target cache hash) as before the option.
    assert "position_reference" not in plain.config and not plain.upstreams[0].subtract_silence


def test_bad_value_is_one_line(tmp_path):
    with pytest.raises(RecipeError, match=r"teacher\.position_reference.*none, silence"):
        load_recipe("recipes/demo.yaml", ["teacher.position_reference=zeros"])
    with pytest.raises(ValueError, match="position_reference='zeros', expected one of none, silence"):
        FusedTeacher([_whisper(False)], fusion="weighted_sum", projection_fit="none", target_mode="concat",
                     position_reference="zeros")
