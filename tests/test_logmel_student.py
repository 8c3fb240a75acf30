"""The log-mel student family (Wav2Vec2BertModel): filterbank parity with transformers'
SeamlessM4TFeatureExtractor on real speech, the frame grid, presets, the forward, export and ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from conftest import make_wave
from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig

from students import (PRESETS, DistillStudent, PredictionHeads, build_student, build_student_config, encoder_inputs,
                      export_student, log_mel_features, make_log_mel_extractor, num_frames)
from teachers import wav2vec_num_frames

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo" / "audio"


def _speech(count: int = 6) -> list[np.ndarray]:
    """Real espeak-ng speech from the demo corpus, resampled to 16 kHz."""
    waves = []
    for path in sorted(DEMO.glob("*.flac"))[:count]:
        audio, rate = sf.read(path, dtype="float32")
        waves.append(soxr.resample(audio, rate, 16000).astype(np.float32))
    return waves


def _padded(waves: list) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.zeros(len(waves), int(lengths.max()))
    for b, w in enumerate(waves):
        batch[b, : len(w)] = torch.as_tensor(w)
    return batch, lengths


def tiny_log_mel_student(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_student(build_student_config("wav2vec2_bert", "w2vbert_tiny", **overrides)).eval()


# --- the filterbank ---------------------------------------------------------------------


def test_features_equal_the_transformers_extractor_on_real_speech():
    waves = _speech()
    assert len(waves) == 6 and len({len(w) % 320 for w in waves}) > 1  # several lengths, odd and even mel counts
    features, mask = log_mel_features(*_padded(waves))
    reference = make_log_mel_extractor()(waves, sampling_rate=16000, return_tensors="np")
    # One padded batch here against per-utterance numpy there: the batch changes nothing.
    assert features.shape == reference["input_features"].shape and features.dtype == torch.float32
    np.testing.assert_allclose(features.numpy(), reference["input_features"], atol=1e-4, rtol=0)
    ours, theirs = mask.numpy(), reference["attention_mask"]
    for b, w in enumerate(waves):
        mel_frames = 1 + (len(w) - 400) // 160
        # The half-filled last frame of an odd mel count is valid for the student only.
        assert ours[b].sum() == theirs[b].sum() + mel_frames % 2
        assert (ours[b] >= theirs[b]).all()


def test_padding_does_not_change_an_utterances_features():
    wave = torch.from_numpy(_speech(1)[0])
    alone, _ = log_mel_features(wave[None], torch.tensor([wave.numel()]))
    noisy_pad = torch.cat([wave, torch.randn(16000)])  # garbage after the valid samples
    padded, mask = log_mel_features(noisy_pad[None], torch.tensor([wave.numel()]))
    n = alone.shape[1]
    assert int(mask.sum()) == n and padded.shape[1] == n
    torch.testing.assert_close(padded, alone, atol=1e-6, rtol=0)


def test_frame_counts_line_up_with_the_teacher_grid_from_half_a_second_to_forty():
    samples = torch.arange(8000, 40 * 16000 + 1)
    counts = num_frames(Wav2Vec2BertConfig(), samples)
    expected = torch.tensor([wav2vec_num_frames(int(n)) for n in samples[::997]])
    assert torch.equal(counts[::997], expected)
    # The same, closed form, for every length in the range.
    assert torch.equal(counts, (samples - 400) // 320 + 1)
    assert int(num_frames(Wav2Vec2BertConfig(), 16000)) == 49
    extractor = make_log_mel_extractor()
    for seconds in (0.5, 0.51, 1.0, 7.33, 40.0):  # the tensors themselves, ours and transformers'
        n = int(seconds * 16000)
        features, mask = log_mel_features(make_wave(seconds)[None], torch.tensor([n]))
        theirs = extractor(make_wave(seconds).numpy(), sampling_rate=16000, return_tensors="np")["input_features"]
        assert features.shape[1] == int(mask.sum()) == theirs.shape[1] == wav2vec_num_frames(n)


# --- presets and the forward ------------------------------------------------------------


@pytest.mark.parametrize("name, millions", [("w2vbert_2l_384", 4.51), ("w2vbert_4l_192", 2.27), ("w2vbert_3l_112", 0.47)])
def test_log_mel_presets(name, millions):
    config = build_student_config("wav2vec2_bert", name)
    assert type(config) is Wav2Vec2BertConfig and config.position_embeddings_type == "rotary"
    assert config.feature_projection_input_dim == 160 and config.layerdrop == 0.0 and config.apply_spec_augment is False
    with torch.device("meta"):
        model = build_student(config)
    assert type(model).__name__ == "Wav2Vec2BertModel" and not hasattr(model, "masked_spec_embed")
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.01)
    assert PRESETS[name]().model_type == "wav2vec2-bert"


def test_arch_and_preset_families_must_agree():
    with pytest.raises(ValueError, match="is a wav2vec2_bert preset; student.arch='hubert'"):
        build_student_config("hubert", "w2vbert_tiny")
    with pytest.raises(ValueError, match="student.conv_dim: not a Wav2Vec2BertConfig field"):
        build_student_config("wav2vec2_bert", "w2vbert_tiny", conv_dim=[8] * 7)
    stock = build_student_config("wav2vec2_bert", None, num_hidden_layers=1)
    assert stock.position_embeddings_type == "rotary" and stock.layerdrop == 0.0


def test_student_forward_shapes_lengths_and_batch_invariance():
    student = DistillStudent(tiny_log_mel_student(), PredictionHeads(32, 8, 2))
    waves = [make_wave(0.7, seed=1), make_wave(1.37, seed=2)]
    batch, lengths = _padded(waves)
    with torch.no_grad():
        out = student(batch, lengths)
        alone = [student(w[None], torch.tensor([w.numel()])) for w in waves]
    frames = [wav2vec_num_frames(w.numel()) for w in waves]
    assert out.predictions.shape == (2, 2, max(frames), 8) and out.lengths.tolist() == frames
    assert len(out.hidden_states) == 3  # layer 0 = projected features, then one per layer
    for b, single in enumerate(alone):
        torch.testing.assert_close(out.predictions[:, b, : frames[b]], single.predictions[:, 0], atol=1e-5, rtol=0)


def test_encoder_inputs_feed_each_family_its_own_input():
    batch, lengths = _padded([make_wave(1.0)])
    log_mel = encoder_inputs(tiny_log_mel_student(), batch, lengths)
    assert set(log_mel.inputs) == {"input_features", "attention_mask"} and log_mel.inputs["input_features"].shape == (1, 49, 160)
    raw = encoder_inputs(build_student_config("hubert", "tiny"), batch, lengths)
    assert set(raw.inputs) == {"input_values", "attention_mask"} and raw.inputs["input_values"].shape == (1, 16000)
    assert log_mel.frame_lengths.tolist() == raw.frame_lengths.tolist() == [49]


# --- export and ONNX --------------------------------------------------------------------


def test_export_loads_with_the_auto_classes_and_its_extractor(tmp_path):
    from transformers import AutoFeatureExtractor, AutoModel, AutoModelForAudioClassification, AutoModelForCTC

    encoder = tiny_log_mel_student()
    out = export_student(encoder, tmp_path / "student", {"teachers": ["a", "b"], "fusion": "chconv"})
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["feature_extractor_type"] == "SeamlessM4TFeatureExtractor"
    extractor = AutoFeatureExtractor.from_pretrained(out)
    assert isinstance(extractor, SeamlessM4TFeatureExtractor)
    assert type(AutoModel.from_pretrained(out)).__name__ == "Wav2Vec2BertModel"
    ctc = AutoModelForCTC.from_pretrained(out, vocab_size=12)
    classifier = AutoModelForAudioClassification.from_pretrained(out, num_labels=3)
    wave = _speech(1)[0]
    inputs = extractor(wave, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        assert ctc(**inputs).logits.shape[-1] == 12 and classifier(**inputs).logits.shape == (1, 3)
        # The folder's extractor gives the features training saw; its mask leaves out the final
        # half-filled frame (odd mel count) that the student counts as valid.
        assert inputs["attention_mask"].sum() == inputs["input_features"].shape[1] - 1
        reloaded = AutoModel.from_pretrained(out)
        theirs = reloaded(inputs["input_features"], attention_mask=torch.ones_like(inputs["attention_mask"]))
        ours = encoder(**encoder_inputs(encoder, torch.from_numpy(wave)[None], torch.tensor([len(wave)])).inputs)
    torch.testing.assert_close(theirs.last_hidden_state, ours.last_hidden_state, atol=1e-4, rtol=0)
    card = (out / "README.md").read_text()
    assert "Log-mel front-end" in card and "AutoFeatureExtractor" in card


def test_onnx_export_passes_parity_and_takes_log_mel_features(tmp_path):
    pytest.importorskip("onnxruntime")
    from students import add_onnx

    encoder = tiny_log_mel_student()
    out = export_student(encoder, tmp_path / "student")
    waves = [make_wave(0.6, seed=1), make_wave(1.37, seed=2), torch.from_numpy(_speech(1)[0])]
    reports = add_onnx(out, encoder, waves, source="test speech", quantize="int8")
    assert reports[0].passed and reports[0].padded_batch and reports[0].max_abs <= 1e-4
    assert reports[1].mean_cosine > 0.9
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_features", "attention_mask"]
    card = (out / "README.md").read_text()
    assert '"input_features": inputs["input_features"]' in card and "computed outside the graph" in card


# --- the whole pipeline through the CLI -------------------------------------------------

LOG_MEL = ["student.arch=wav2vec2_bert", "student.preset=w2vbert_tiny"]
FAST = ["teacher.pca_max_utterances=8", "data.max_crop_seconds=1.0", "training.logging_steps=1", "training.report_to=none"]


def _env() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str, timeout: int = 300):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "distill", *args], cwd=DEMO.parent.parent.parent, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_train_online_then_export_onnx_and_probe(tmp_path):
    run, out = tmp_path / "run", tmp_path / "exported"
    trained = _cli("train", "demo", "--output-dir", str(run), "training.max_steps=3", *LOG_MEL, *FAST)
    assert trained.returncode == 0, trained.stderr[-2000:]
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    exported = _cli("export", str(run), str(out), "--onnx")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["model_type"] == "wav2vec2-bert"
    assert json.loads((out / "onnx_parity.json").read_text())["model.onnx"]["passed"]
    scored = _cli("evaluate", str(run), "--probe-task", "classification:label", "--probe-steps", "5", "--max-items", "8",
                  "--no-cost")
    assert scored.returncode == 0, scored.stderr[-2000:]
    probes = json.loads((run / "eval" / "eval.json").read_text())["probes"]
    assert "student" in json.dumps(probes)


@pytest.mark.slow
def test_cache_then_killed_and_resumed_training_equals_uninterrupted(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    made = _cli("cache-targets", "demo", "--out", str(cache), "--shard-size", "16", *FAST)
    assert made.returncode == 0, made.stderr[-2000:]
    args = ["train", "demo", f"data.targets_cache={cache}", "training.max_steps=6", "training.save_steps=2",
            "training.save_total_limit=5", *LOG_MEL, *FAST]
    full = _cli(*args, "--output-dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "distill", *args, "--output-dir", str(run)], cwd=DEMO.parent.parent.parent,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run / "checkpoint-2" / "checkpoint_complete").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _cli(*args, "--output-dir", str(run), "--resume-from", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = (load_file(r / "checkpoint-6" / "model.safetensors") for r in (tmp_path / "full", run))
    assert a.keys() == b.keys() and any(k.startswith("encoder.encoder.layers.") for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
