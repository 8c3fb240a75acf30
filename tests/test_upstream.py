"""Upstream adapters: loading, shapes, frame grids, feature extraction, freezing, errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import TINY_CONFIGS, make_wave, tiny_config

from teachers import load_upstream

W2V_KINDS = ["wavlm", "hubert", "wav2vec2", "data2vec-audio"]


@pytest.fixture(scope="module")
def upstreams(tiny_upstream_dirs):
    return {kind: load_upstream(folder) for kind, folder in tiny_upstream_dirs.items()}


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_shapes_lengths_and_zero_padding(upstreams, kind):
    up = upstreams[kind]
    waves = [make_wave(1.0, 0), make_wave(1.37, 1)]
    out = up(waves)
    assert up.num_layers == 2 and up.hidden_size == 32 and up.frame_rate == 50.0
    assert out.hidden_states.shape == (3, 2, max(out.lengths), 32)
    assert out.hidden_states.dtype == torch.float32
    assert out.lengths.tolist() == [up.num_frames(w.numel()) for w in waves]
    # wav2vec conv grid: 49 frames per second; Whisper: (samples // 160 + 1) // 2.
    assert out.lengths.tolist() == ([50, 69] if kind == "whisper" else [49, 68])
    assert out.hidden_states[:, 0, out.lengths[0]:].abs().max() == 0
    assert out.hidden_states[:, 0, : out.lengths[0]].abs().amax(dim=-1).min() > 0


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_batch_invariance_per_upstream(upstreams, kind):
    up = upstreams[kind]
    waves = [make_wave(1.0, 0), make_wave(1.37, 1), make_wave(2.0, 2), make_wave(1.0, 3)]
    batch = up(waves)
    for b, wave in enumerate(waves):
        alone = up([wave])
        n = int(batch.lengths[b])
        assert n == int(alone.lengths[0])
        torch.testing.assert_close(batch.hidden_states[:, b, :n], alone.hidden_states[:, 0], atol=1e-5, rtol=0)


def test_config_spec_matches_saved_folder(upstreams):
    # Same seed, same config: the random-init spec and the saved folder are the same model.
    wave = [make_wave(1.0)]
    for kind in ("hubert", "whisper"):
        from_config = load_upstream(tiny_config(kind))
        torch.testing.assert_close(from_config(wave).hidden_states, upstreams[kind](wave).hidden_states)
        assert from_config.name == f"{kind}(random-init)"


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_frozen_and_eval(upstreams, kind):
    up = upstreams[kind]
    up.train()
    assert not up.model.training and not any(m.training for m in up.model.modules())
    assert not any(p.requires_grad for p in up.parameters())
    assert up.num_parameters() == sum(p.numel() for p in up.model.parameters()) > 0


def test_outputs_are_ordinary_tensors(upstreams):
    # Produced under inference mode but returned as normal tensors, so autograd may save them.
    out = upstreams["hubert"]([make_wave(1.0)])
    assert not out.hidden_states.is_inference()
    weight = torch.ones(32, requires_grad=True)
    (out.hidden_states * weight).sum().backward()


def test_minimum_length_error(upstreams):
    assert upstreams["wavlm"].min_samples == 400 and upstreams["whisper"].min_samples == 160
    assert upstreams["wavlm"].num_frames(400) == 1
    upstreams["wavlm"]([torch.zeros(400)])
    with pytest.raises(ValueError, match=r"wavlm.*399 samples.*minimum 400"):
        upstreams["wavlm"]([make_wave(1.0), torch.zeros(399)])
    with pytest.raises(ValueError, match="expected a 1-D float tensor"):
        upstreams["hubert"]([torch.zeros(2, 16000)])


def test_normalisation_defaults_and_preprocessor(upstreams, tiny_upstream_dirs, tmp_path):
    from transformers import Wav2Vec2FeatureExtractor

    # fairseq convention without a preprocessor: group-norm front-ends take raw audio.
    assert not upstreams["wavlm"].do_normalize and not upstreams["hubert"].do_normalize
    assert upstreams["data2vec-audio"].do_normalize
    assert load_upstream(tiny_config("hubert", feat_extract_norm="layer")).do_normalize
    folder = shutil.copytree(tiny_upstream_dirs["hubert"], tmp_path / "hubert")
    Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(folder)
    normalising = load_upstream(folder)
    assert normalising.do_normalize
    wave = make_wave(1.0)
    scaled = normalising([wave * 5 + 0.1]).hidden_states
    torch.testing.assert_close(scaled, normalising([wave]).hidden_states, atol=1e-4, rtol=1e-4)


def test_whisper_log_mel_matches_feature_extractor(upstreams):
    from transformers import WhisperFeatureExtractor

    up = upstreams["whisper"]
    wave = make_wave(1.3)
    expected = WhisperFeatureExtractor(feature_size=80)(wave.numpy(), sampling_rate=16000, return_tensors="pt")
    padded = torch.nn.functional.pad(wave, (0, up.window_samples - wave.numel()))
    ours = up._log_mel(padded[None])
    assert ours.shape == (1, 80, 3000)
    torch.testing.assert_close(ours, expected.input_features, atol=1e-4, rtol=1e-4)


def test_whisper_long_audio_is_chunked_and_stitched(upstreams):
    up = upstreams["whisper"]
    wave = make_wave(31.0)
    out = up([wave])
    assert int(out.lengths[0]) == up.num_frames(wave.numel()) == 1500 + 50
    first_window = up([wave[: 30 * 16000]])
    torch.testing.assert_close(out.hidden_states[:, 0, :1500], first_window.hidden_states[:, 0])
    second_window = up([wave[30 * 16000:]])
    torch.testing.assert_close(out.hidden_states[:, 0, 1500:], second_window.hidden_states[:, 0])


def test_dtypes():
    with pytest.raises(ValueError, match="float16 is refused"):
        load_upstream(tiny_config("hubert"), dtype=torch.float16)
    with pytest.raises(ValueError, match="float16 is refused"):
        load_upstream(tiny_config("hubert"), dtype="float16")
    bf16 = load_upstream(tiny_config("hubert"), dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    reference = load_upstream(tiny_config("hubert"))([make_wave(1.0)]).hidden_states
    out = bf16([make_wave(1.0)]).hidden_states
    assert out.dtype == torch.float32
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()


def test_unsupported_and_unreachable_specs():
    with pytest.raises(ValueError, match=r"model_type 'bert' is not supported; supported: wavlm, hubert"):
        load_upstream({"config": {"model_type": "bert", "hidden_size": 32}})
    with pytest.raises(ValueError, match="expected a hub id"):
        load_upstream(42)
    # conftest sets HF_HUB_OFFLINE=1: an unknown hub id must fail fast, in one line.
    with pytest.raises(OSError, match="offline or unreachable") as info:
        load_upstream("nobody-here/no-such-speech-model")
    assert "\n" not in str(info.value)


def test_generic_wav2vec_style_encoder():
    # Any AutoModel with a wav2vec conv front-end works, e.g. UniSpeech-SAT.
    config = {k: v for k, v in TINY_CONFIGS["hubert"].items() if k != "model_type"}
    up = load_upstream({"config": {"model_type": "unispeech-sat", **config}})
    out = up([make_wave(1.0)])
    assert out.hidden_states.shape == (3, 1, 49, 32)
