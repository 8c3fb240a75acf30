"""distill.evaluation.cost: parameter and FLOP counts against hand counts, ratios, and the benchmark script."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from conftest import TINY_CONFIGS, make_wave, tiny_config
from distill.evaluation.cost import (Cost, audio_encoder_job, cost_table, count_gflops, count_params, fused_teacher_job, measure_cost,
                          measure_jobs, ratios, student_job, sum_costs, time_forwards, whisper_encoder_job)

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(repeats=1, warmup=0)


def _cost(job) -> Cost:
    return measure_jobs([job], **FAST)[0]


def _tiny(kind: str, **overrides) -> nn.Module:
    cfg = {**TINY_CONFIGS[kind], **overrides}
    torch.manual_seed(0)
    return AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).eval()


def test_linear_flops_match_hand_count():
    n, a, b = 7, 24, 40
    layer = nn.Linear(a, b)
    x = torch.randn(n, a)
    cost = measure_cost("linear", lambda: layer(x), layer, **FAST)
    assert cost.gflops * 1e9 == 2 * n * a * b  # one multiply-add = 2 FLOPs; the bias add is not counted
    assert cost.params == a * b + b


def test_cpu_attention_is_counted():
    # On CPU, SDPA runs a flash kernel torch has no formula for; we add it: QK^T and AV, 2 FLOPs each.
    b, h, s, d = 2, 3, 50, 16
    q = torch.randn(b, h, s, d)
    flops = count_gflops(lambda: nn.functional.scaled_dot_product_attention(q, q, q)) * 1e9
    assert flops == 2 * (2 * b * h * s * s * d)


def test_tiny_hubert_cost_params_and_flops_scale_with_audio():
    model = _tiny("hubert")
    short = _cost(audio_encoder_job("hubert", model, make_wave(1.0)))
    long = _cost(audio_encoder_job("hubert", model, make_wave(2.0)))
    assert short.params == sum(p.numel() for p in model.parameters())
    assert short.gflops > 0 and short.latency_ms_median > 0
    # Conv and linear FLOPs grow with frames (49 -> 99); attention adds a small quadratic part.
    assert 1.9 < long.gflops / short.gflops < 2.2
    assert _cost(student_job("student", model, make_wave(1.0))).gflops == pytest.approx(short.gflops)


class _Recorder(nn.Module):
    """Stands in for a student: keeps what it was fed."""

    def __init__(self):
        from transformers import HubertConfig

        super().__init__()
        self.config = HubertConfig()  # what students.encoder_inputs dispatches on
        self.weight = nn.Parameter(torch.zeros(1))
        self.inputs = []

    def forward(self, input_values, attention_mask=None):
        self.inputs.append(input_values)
        return input_values * self.weight


def test_student_job_feeds_what_the_exported_preprocessor_gives():
    from transformers import Wav2Vec2FeatureExtractor

    wave = 3.0 * make_wave(1.0) + 0.5  # loud and off-centre: normalisation visibly matters
    model = _Recorder()
    student_job("student", model, wave).forward()
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    expected = extractor(wave.numpy(), sampling_rate=16000, return_tensors="pt").input_values
    [fed] = model.inputs
    assert fed.shape == (1, wave.numel()) and fed.dtype == torch.float32
    torch.testing.assert_close(fed, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expected one 1-D waveform"):
        student_job("student", model, wave[None])


def test_sdpa_and_eager_attention_count_the_same():
    wave = make_wave(1.0)
    counts = [_cost(audio_encoder_job(impl, _tiny("hubert", attn_implementation=impl), wave)).gflops for impl in ("eager", "sdpa")]
    assert counts[0] == pytest.approx(counts[1])


def test_whisper_encoder_costs_its_fixed_window():
    model = _tiny("whisper")
    encoder = model.get_encoder()
    one = _cost(whisper_encoder_job("whisper", model, make_wave(1.0)))
    two = _cost(whisper_encoder_job("whisper", encoder, make_wave(2.0)))
    with_mel = _cost(whisper_encoder_job("whisper", encoder, make_wave(1.0), include_log_mel=True))
    # 3000 mel frames whatever the audio length; only the encoder's parameters count.
    assert one.gflops == two.gflops > 0
    assert one.params == two.params == with_mel.params == sum(p.numel() for p in encoder.parameters())
    assert with_mel.gflops > one.gflops  # the mel filterbank matmul (the FFT itself is not counted)
    assert "excl. log-mel" in one.note and "incl. log-mel" in with_mel.note
    with pytest.raises(ValueError, match="<= 480000 samples"):
        whisper_encoder_job("whisper", model, make_wave(31.0))


def test_count_params_shared_and_passthrough():
    model = _tiny("hubert")
    total = sum(p.numel() for p in model.parameters())
    assert count_params(model) == count_params([model, model.encoder]) == count_params(model.parameters()) == total
    assert count_params(123) == 123


def test_timing_rounds_interleave_and_threads_restore():
    calls = []
    times = time_forwards([lambda: calls.append("a"), lambda: calls.append(torch.is_inference_mode_enabled())], repeats=3, warmup=2)
    assert [len(t) for t in times] == [3, 3]
    assert calls == ["a", True] * 5  # one call of each per round: warm-up rounds, then timed rounds
    before = torch.get_num_threads()
    cost = measure_cost("noop", lambda: None, 0, threads=1, repeats=3, warmup=0)
    assert torch.get_num_threads() == before
    assert cost.latency_ms_median == sorted(cost.latencies_ms)[1] and cost.latency_ms_min == min(cost.latencies_ms)
    with pytest.raises(ValueError):
        time_forwards([lambda: None], repeats=0)


def test_ratios_sum_and_table():
    teacher = Cost("teacher", params=200_000_000, gflops=300.0, latency_ms_median=6000.0)
    other = Cost("other", params=100_000_000, gflops=100.0, latency_ms_median=3000.0)
    student = Cost("student", params=5_000_000, gflops=10.0, latency_ms_median=150.0)
    assert ratios(student, teacher) == (40.0, 40.0)
    assert ratios(student, other) == (20.0, 20.0)
    both = sum_costs("pair", [teacher, other])
    assert (both.params, both.gflops, both.latency_ms_median) == (300_000_000, 400.0, 9000.0)
    assert both.note == "sum of teacher + other"

    table = cost_table([teacher, other, student], ["teacher", "other"])
    lines = table.splitlines()
    assert lines[0].startswith("| model | params (M) | GFLOPs | latency (ms) | min (ms) | speedup vs teacher | size ratio vs teacher")
    row = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert row == ["student", "5", "10.0", "150.0", "-", "40.00x", "40.00x", "20.00x", "20.00x"]
    assert [c.strip() for c in lines[2].strip("|").split("|")][5:7] == ["1.00x", "1.00x"]
    assert cost_table([student], "student").count("\n") == 2  # a single reference by name
    with pytest.raises(ValueError, match="missing"):
        cost_table([teacher], "missing")


def test_fused_teacher_cost_counts_every_part():
    from teachers import FusedTeacher

    teacher = FusedTeacher.from_config(
        {"upstreams": [tiny_config("wavlm"), tiny_config("whisper")], "projection_dim": 32}, progress=lambda _: None
    )
    wave = make_wave(1.0)
    with pytest.raises(ValueError, match="not fitted"):
        fused_teacher_job("teacher", teacher, wave)
    teacher.fit_pca([wave])
    cost = _cost(fused_teacher_job("teacher", teacher, wave))
    parts = [u.num_parameters() for u in teacher.upstreams] + [count_params(teacher.projection), count_params(teacher.interface)]
    assert cost.params == sum(parts)
    whisper = _cost(whisper_encoder_job("whisper", teacher.upstreams[1].model, wave))
    assert cost.gflops > whisper.gflops > 0


@pytest.mark.slow
def test_benchmark_quick_runs(tmp_path):
    out = tmp_path / "cost.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cost", "--quick", "--repeats", "1", "--warmup", "0", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    names = "distilhubert|hubert_2l_768_conv256|hubert_4l_384_conv256|hubert_2l_384_conv128|w2vbert_2l_384|w2vbert_4l_192|w2vbert_3l_112"
    assert re.fullmatch(rf"speedup vs 3-upstream teacher: \d+(\.\d+)?x \(({names})\)", last), last
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert {"teacher2 fused", "teacher3 fused", "teacher3 sum", "hubert_2l_384_conv128", "w2vbert_3l_112"} <= set(rows)
    assert result["best"]["student"] == last.rsplit("(", 1)[1].rstrip(")")
    filterbanks = {"log-mel filterbank (torch)", "log-mel filterbank (numpy)"}
    assert filterbanks <= set(rows) and all(rows[name]["params"] == 0 for name in filterbanks)
    models = [r for name, r in rows.items() if name not in filterbanks]
    assert all(r["params"] > 0 and r["gflops"] > 0 and r["latency_ms_median"] > 0 for r in models)
    assert re.search(r"best log-mel student: w2vbert_\w+, [\d.]+x faster .* goal >= 100x: (met|NOT met)", proc.stdout)
    assert result["best_log_mel"]["student"] in names.split("|")[4:]
