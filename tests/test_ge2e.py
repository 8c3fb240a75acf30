"""GE2E (resemblyzer's pretrained speaker encoder) as an upstream, and upstreams from the user's code.

The real-weight tests need `pip install --no-deps resemblyzer==0.1.4` (CI installs it); the
parity tests also need librosa / an importable resemblyzer and skip with the reason otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from safetensors.torch import load_file

from teachers import FusedTeacher, load_upstream, trust_upstream_code, wav2vec_num_frames
from teachers.ge2e import GE2E, HOP, N_MELS, ge2e_embedding, load_ge2e, raise_volume, resemblyzer_weights, save_ge2e

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "audio"

try:
    resemblyzer_weights()
    HAVE_WEIGHTS, WHY = True, ""
except FileNotFoundError as err:
    HAVE_WEIGHTS, WHY = False, str(err)
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason=WHY)


def speech(name: str = "utt00_en-us.flac", seconds: float | None = None) -> torch.Tensor:
    wave, rate = sf.read(DEMO / name, dtype="float32")
    wave = soxr.resample(wave, rate, 16000).astype(np.float32)
    return torch.from_numpy(wave[: int(seconds * 16000)] if seconds else wave)


@pytest.fixture(scope="module")
def ge2e() -> GE2E:
    return load_ge2e()


@needs_weights
def test_mel_equals_librosa_on_speech(ge2e):
    librosa = pytest.importorskip("librosa", reason="librosa not installed: the mel parity check needs it")
    wave = speech()
    expected = librosa.feature.melspectrogram(y=wave.numpy(), sr=16000, n_fft=400, hop_length=160, n_mels=40).T
    ours = ge2e.mel(wave[None])[0].numpy()
    assert ours.shape == expected.shape == (1 + wave.numel() // HOP, N_MELS)
    assert np.abs(ours - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


@needs_weights
def test_embedding_equals_resemblyzer(ge2e):
    try:
        from resemblyzer import VoiceEncoder
    except ImportError as err:  # its audio module needs webrtcvad (+ pkg_resources) and librosa
        pytest.skip(f"resemblyzer does not import here ({err}); the weights alone are enough for the upstream")
    reference = VoiceEncoder(device="cpu", verbose=False)
    for name, seconds in (("utt00_en-us.flac", None), ("utt01_en-m3.flac", 1.2)):  # several partials; one padded
        wave = raise_volume(speech(name, seconds))
        expected = reference.embed_utterance(wave.numpy())
        np.testing.assert_allclose(ge2e_embedding(ge2e, wave).numpy(), expected, atol=1e-5)


@needs_weights
def test_upstream_layers_and_no_padding_leak():
    upstream = load_upstream({"builtin": "ge2e"})
    assert (upstream.num_layers, upstream.hidden_size, upstream.frame_rate) == (3, 256, 100.0)
    wave = speech()
    waves = [wave[:9000], wave, wave[:20000]]  # mixed lengths, longest in the middle
    out = upstream(waves)
    assert out.hidden_states.shape[:2] == (4, 3)
    assert out.lengths.tolist() == [1 + w.numel() // HOP for w in waves]
    for i, w in enumerate(waves):
        alone = upstream([w]).hidden_states[:, 0]
        n = int(out.lengths[i])
        torch.testing.assert_close(out.hidden_states[:, i, :n], alone[:, :n], atol=1e-5, rtol=1e-5)
        assert out.hidden_states[:, i, n:].abs().max() == 0 if n < out.hidden_states.shape[2] else True
    # Layer 0 is the log mel in the first 40 features, zeros after.
    mel = torch.log10(upstream.model.mel(raise_volume(wave)[None])[0] + 1e-6)
    torch.testing.assert_close(out.hidden_states[0, 1, :, :N_MELS], mel, atol=1e-4, rtol=1e-4)
    assert out.hidden_states[0, :, :, N_MELS:].abs().max() == 0


@needs_weights
def test_quiet_audio_is_raised_loud_audio_kept():
    wave = speech()
    dbfs = lambda w: 20 * torch.log10(torch.sqrt(torch.mean(w ** 2)))  # noqa: E731 (int16 scale cancels)
    quiet = 0.001 * wave
    raised = raise_volume(quiet)
    assert dbfs(quiet) < -40 and abs(dbfs(raised) + 30) < 1e-3
    torch.testing.assert_close(raised / raised.abs().max(), quiet / quiet.abs().max())  # a gain, nothing else
    loud = wave / wave.abs().max()
    torch.testing.assert_close(raise_volume(loud), loud)  # above -30 dBFS: unchanged


@needs_weights
def test_saved_folder_is_safetensors_and_loads_as_upstream(tmp_path):
    folder = save_ge2e(tmp_path / "ge2e")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "ge2e" and set(load_file(str(folder / "model.safetensors"))) >= {"linear.weight"}
    wave = [speech(seconds=1.5)]
    from_folder = load_upstream(str(folder))(wave).hidden_states
    builtin = load_upstream({"builtin": "ge2e"})(wave).hidden_states
    torch.testing.assert_close(from_folder, builtin)


def test_bad_weights_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_ge2e(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"model_state": {"linear.weight": torch.zeros(256, 256)}}, bad)
    with pytest.raises(ValueError, match=r"bad.pt: missing \[.linear.bias., .lstms.0.bias_hh_l0."):
        load_ge2e(bad)
    with pytest.raises(ValueError, match="expected builtin one of ge2e"):
        load_upstream({"builtin": "nope"})


@needs_weights
def test_fused_teacher_with_ge2e_and_a_transformers_upstream(tmp_path):
    teacher = FusedTeacher.from_config({
        "upstreams": [{"config": {"model_type": "hubert", "hidden_size": 32, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "intermediate_size": 64, "conv_dim": [16] * 7,
                                  "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2}},
                      {"builtin": "ge2e"}],
        "fusion": "chconv", "projection_dim": 16, "target_layers": [1, 2],
    }, progress=lambda line: None)
    waves = [speech(seconds=1.0), speech()]
    frames = [wav2vec_num_frames(w.numel()) for w in waves]  # the wav2vec grid: 49 frames for 1 s
    features, lengths = teacher.features(waves)
    assert features.shape == (4, 2, max(frames), 32 + 256)  # front-end + 3 aligned layers
    assert lengths.tolist() == frames == [49, frames[1]]
    teacher.fit_pca(waves)
    targets = teacher.targets(waves)
    assert targets.layers.shape == (2, 2, max(frames), 16)
    teacher.save_pretrained(tmp_path / "teacher")  # the builtin spec is saved as written
    reloaded = FusedTeacher.from_pretrained(tmp_path / "teacher", progress=lambda line: None)
    assert reloaded.config["upstreams"][1] == {"builtin": "ge2e"}
    torch.testing.assert_close(reloaded.targets(waves).layers, targets.layers)


# ----------------------------------------------------------------------------- the user's code
USER_MODULE = textwrap.dedent('''
    import torch
    from teachers import Upstream

    class Energy(Upstream):
        """Frame log-energy and two layers over it, width `width`, at 50 frames/s."""
        def __init__(self, width=4):
            super().__init__(torch.nn.Linear(1, width), "energy", "energy", 2, width)
            self.frame_rate, self.min_samples = 50.0, 320

        def num_frames(self, num_samples):
            return num_samples // 320

        def _encode(self, waves):
            out = []
            for w in waves:
                e = w[: self.num_frames(w.numel()) * 320].reshape(-1, 320).pow(2).mean(-1, keepdim=True).log1p()
                out.append(torch.stack([e.expand(-1, self.hidden_size), self.model(e), self.model(e).relu()]))
            return out

    def build(width=4):
        return Energy(width)
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_encoders.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield {"code": "my_encoders:build", "kwargs": {"width": 6}}
    trust_upstream_code(False)


def test_code_upstream_refused_unless_trusted(user_module):
    trust_upstream_code(False)
    with pytest.raises(PermissionError, match="--trust-upstream-code"):
        load_upstream(user_module)
    trust_upstream_code()
    upstream = load_upstream(user_module)
    out = upstream([torch.ones(3200), torch.ones(1600)])
    assert out.hidden_states.shape == (3, 2, 10, 6) and out.lengths.tolist() == [10, 5]
    assert not any(p.requires_grad for p in upstream.parameters())


def test_cli_refuses_code_upstream_in_one_line(tmp_path, user_module):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((ROOT / "recipes" / "demo.yaml").read_text())
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "distill", "inspect-teacher", str(recipe), "--seconds", "1",
           "teacher.upstreams=[{code: 'my_encoders:build', kwargs: {width: 64}}]", "teacher.target_layers=[1, 2]"]
    refused = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("fusion-distill inspect-teacher: error: upstream spec code=")
    trusted = subprocess.run(cmd + ["--trust-upstream-code"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert "energy" in trusted.stdout
