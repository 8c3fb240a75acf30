"""students/export.py: a stock HF folder that plain transformers loads, and the hub upload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import RepoUrl
from safetensors.torch import load_file

import students.export as export_module
from students import DistillStudent, PredictionHeads, build_student, build_student_config, export_student, push_to_hub

CARD = {
    "teachers": ["microsoft/wavlm-base-plus", "facebook/hubert-base-ls960"],
    "fusion": "chconv",
    "target_layers": [4, 8, 12],
    "dataset": "openslr/librispeech_asr",
    "steps": 200,
    "final_losses": {"total": 1.2345, "layer_4": 0.4},
    "recipe": "student:\n  preset: tiny\n",
}

# Runs in a fresh interpreter that never imports our packages: what a downstream user has.
_USER_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from huggingface_hub import ModelCard
    from transformers import AutoModel, AutoModelForAudioClassification, AutoModelForCTC, Wav2Vec2FeatureExtractor

    out = sys.argv[1]
    model = AutoModel.from_pretrained(out).eval()
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(out)
    inputs = extractor(torch.randn(16000).numpy(), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    assert tuple(hidden.shape) == (1, 49, 32), hidden.shape
    ctc = AutoModelForCTC.from_pretrained(out, vocab_size=32)
    assert ctc.lm_head.out_features == 32
    classifier = AutoModelForAudioClassification.from_pretrained(out, num_labels=5)
    assert classifier.classifier.out_features == 5
    card = ModelCard.load(out + "/README.md")
    assert "microsoft/wavlm-base-plus" in card.text and "facebook/hubert-base-ls960" in card.text
    assert card.data.library_name == "transformers"
    assert not any(name.split(".")[0] in ("students", "teachers", "distill") for name in sys.modules)
    print("USER-OK", type(model).__name__)
    """
)


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return build_student(build_student_config("hubert", "tiny"))


@pytest.fixture
def exported(encoder, tmp_path):
    return export_student(encoder, tmp_path / "student", CARD), encoder


def test_export_writes_the_four_files(exported):
    out, encoder = exported
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hubert" and config["architectures"] == ["HubertModel"]
    assert set(load_file(out / "model.safetensors")) == set(encoder.state_dict())
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["feature_extractor_type"] == "Wav2Vec2FeatureExtractor"
    assert (preprocessor["feature_size"], preprocessor["sampling_rate"], preprocessor["padding_value"]) == (1, 16000, 0.0)
    assert preprocessor["do_normalize"] is True and preprocessor["return_attention_mask"] is True
    card = (out / "README.md").read_text()
    for text in ("library_name: transformers", "fusion-distill", "chconv", "[4, 8, 12]", "1.234", "AutoModelForCTC", "preset: tiny"):
        assert text in card, text


def test_exported_folder_loads_in_plain_transformers(exported):
    out, _ = exported
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", _USER_SCRIPT, str(out)], cwd=out, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "USER-OK HubertModel" in result.stdout


def test_group_norm_export_does_not_ask_for_an_attention_mask(tmp_path):
    encoder = build_student(build_student_config("wav2vec2", "tiny", feat_extract_norm="group"))
    out = export_student(encoder, tmp_path / "group")
    assert json.loads((out / "preprocessor_config.json").read_text())["return_attention_mask"] is False
    assert json.loads((out / "config.json").read_text())["model_type"] == "wav2vec2"


def test_export_accepts_only_the_hf_encoder(encoder, tmp_path):
    student = DistillStudent(encoder, PredictionHeads(32, 24, 2))
    with pytest.raises(TypeError, match=r"expected a transformers PreTrainedModel.*got DistillStudent"):
        export_student(student, tmp_path / "bad")


def test_export_fails_when_the_reload_differs(encoder, tmp_path, monkeypatch):
    # Simulate a save that drops a weight: the reloaded state must not pass as the encoder's.
    real_state_dict = type(encoder).state_dict

    def state_dict_without_a_key(self, *args, **kwargs):
        state = real_state_dict(self, *args, **kwargs)
        if self is not encoder:
            state.pop("encoder.layer_norm.bias")
        return state

    monkeypatch.setattr(type(encoder), "state_dict", state_dict_without_a_key)
    with pytest.raises(RuntimeError, match=r"export_student: reloading .* reported .*encoder\.layer_norm\.bias") as err:
        export_student(encoder, tmp_path / "broken")
    assert "\n" not in str(err.value)


def test_export_fails_when_a_reloaded_weight_differs(encoder, tmp_path, monkeypatch):
    real_from_pretrained = export_module.AutoModel.from_pretrained

    def perturbed(*args, **kwargs):
        model, info = real_from_pretrained(*args, **kwargs)
        with torch.no_grad():
            model.encoder.layers[1].final_layer_norm.weight.add_(1e-3)
        return model, info

    monkeypatch.setattr(export_module.AutoModel, "from_pretrained", perturbed)
    with pytest.raises(RuntimeError, match=r"encoder\.layers\.1\.final_layer_norm\.weight differs after reloading"):
        export_student(encoder, tmp_path / "perturbed")


def test_push_to_hub_uploads_that_folder(exported, monkeypatch):
    out, _ = exported
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))

    monkeypatch.setattr(export_module.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(export_module.HfApi, "upload_folder", upload_folder)
    url = push_to_hub(out, "me/tiny-student", private=True)

    assert url == "https://huggingface.co/me/tiny-student"
    assert [(name, repo) for name, repo, _ in calls] == [("create_repo", "me/tiny-student"), ("upload_folder", "me/tiny-student")]
    assert calls[0][2]["exist_ok"] is True and calls[0][2]["private"] is True
    assert calls[1][2]["folder_path"] == out and calls[1][2]["repo_type"] == "model"


def test_push_to_hub_refuses_a_folder_that_is_not_an_export(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lacks config\.json, model\.safetensors"):
        push_to_hub(tmp_path, "me/tiny-student")
