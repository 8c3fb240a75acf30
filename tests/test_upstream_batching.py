"""Teacher batching: masked batches for padding-invariant upstreams, equal lengths for the rest.

Layer-norm wav2vec2, HuBERT and WavLM run different lengths as one padded batch and match runs
alone; group-norm models and Data2VecAudio still run every length on its own; `cache-targets`
sorts a shard's rows by length for batching but stores every row where it stored it before.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_wave, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file
from test_cache import _demo_recipe, corpus  # noqa: F401  (corpus: the module fixture, reused)

from distill.build import build_teacher
from distill.cache.writer import cache_targets
from distill.data.loader import load_audio_dataset
from teachers import load_upstream
from teachers.upstream import padding_invariant

ROOT = Path(__file__).resolve().parents[1]
SECONDS = (0.5, 0.83, 1.2)
LAYER_NORM = dict(feat_extract_norm="layer")


def _count_calls(up) -> list[dict]:
    """Records the batch shape and whether a mask came with it, per forward of the HF model."""
    calls: list[dict] = []

    def hook(module, args, kwargs):
        values = args[0] if args else kwargs["input_values"]
        calls.append({"shape": tuple(values.shape), "mask": kwargs.get("attention_mask") is not None})

    up.model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def _alone(up, waves: list[torch.Tensor]) -> list[torch.Tensor]:
    return [up([w]).hidden_states[:, 0] for w in waves]


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert", "wavlm"])
def test_layer_norm_models_run_mixed_lengths_as_one_padded_batch(kind):
    up = load_upstream(tiny_config(kind, **LAYER_NORM))
    assert up.padding_invariant and not up.pads()  # a CPU gains nothing from padding: off unless asked
    up.padded_batches = True
    waves = [make_wave(s, seed) for seed, s in enumerate(SECONDS)]
    expected = _alone(up, waves)
    calls = _count_calls(up)
    out = up(waves)
    assert calls == [{"shape": (3, waves[-1].numel()), "mask": True}]  # one forward, padded to the longest
    assert out.lengths.tolist() == [up.num_frames(w.numel()) for w in waves]
    for b, alone in enumerate(expected):
        n = int(out.lengths[b])
        torch.testing.assert_close(out.hidden_states[:, b, :n], alone, atol=1e-5, rtol=0)
        assert out.hidden_states[:, b, n:].abs().sum() == 0


@pytest.mark.parametrize("kind", ["hubert", "data2vec-audio"])
def test_other_models_run_each_length_on_its_own(kind):
    up = load_upstream(tiny_config(kind))  # group-norm HuBERT; Data2VecAudio (stacked positional convs)
    assert not up.padding_invariant
    waves = [make_wave(s, seed) for seed, s in enumerate(SECONDS)]
    expected = _alone(up, waves)
    calls = _count_calls(up)
    out = up(waves)
    assert sorted(c["shape"] for c in calls) == sorted((1, w.numel()) for w in waves)
    assert not any(c["mask"] for c in calls)
    for b, alone in enumerate(expected):
        assert torch.equal(out.hidden_states[:, b, : alone.shape[1]], alone)


def test_padding_invariant_predicate():
    def config(kind, **overrides):
        from transformers import AutoConfig

        cfg = dict(tiny_config(kind, **overrides)["config"])
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)

    assert all(padding_invariant(config(k, **LAYER_NORM)) for k in ("wav2vec2", "hubert", "wavlm"))
    assert not any(padding_invariant(config(k)) for k in ("wav2vec2", "hubert", "wavlm"))  # group norm
    assert not padding_invariant(config("data2vec-audio"))
    unverified = {k: v for k, v in tiny_config("hubert", **LAYER_NORM)["config"].items() if k != "model_type"}
    up = load_upstream({"config": {"model_type": "unispeech-sat", **unverified}})
    assert not up.padding_invariant


def test_batches_are_sorted_longest_first():
    # Ties keep their order; a padding upstream runs one batch, the others (and a CPU by default) equal lengths.
    padding = load_upstream(tiny_config("hubert", **LAYER_NORM))
    assert padding._batches([8000, 4000, 12000, 8000]) == [[2], [0, 3], [1]]
    padding.padded_batches = True
    assert padding._batches([8000, 4000, 12000, 8000]) == [[2, 0, 3, 1]]
    assert padding.to("meta").pads()  # any accelerator pads by default
    padding.padded_batches = False
    assert not padding.pads()
    assert load_upstream(tiny_config("hubert"))._batches([8000, 4000, 12000, 8000]) == [[2], [0, 3], [1]]


def _cache_recipe(folder: Path, upstreams):
    """The demo recipe on the test corpus, its upstream list passed through `upstreams`."""
    cfg = _demo_recipe(folder)
    cfg.teacher.upstreams = upstreams(cfg.teacher.upstreams)
    return cfg


def _shards(cfg, tmp_path: Path, name: str, padded: bool | None = None) -> tuple[dict, dict, dict, dict]:
    """Per batch size (1 and 4): shard tensors, shard metadata, manifest entry, wav2vec forwards."""
    teacher = build_teacher(cfg, load_audio_dataset(cfg.data, cfg.data.train_split_name))
    for up in teacher.upstreams:
        if hasattr(up, "padded_batches"):
            up.padded_batches = padded  # True: as on an accelerator
    hooked = [_count_calls(up) for up in teacher.upstreams if hasattr(up, "padding_invariant")]
    tensors, meta, entries, calls = {}, {}, {}, {}
    for batch_size in (1, 4):
        for per_upstream in hooked:
            per_upstream.clear()
        out = cache_targets(cfg, tmp_path / f"{name}-{batch_size}", shard_size=8, teacher=teacher, batch_size=batch_size)
        calls[batch_size] = [c for per_upstream in hooked for c in per_upstream]
        path = str(out / "shard-00000.safetensors")
        tensors[batch_size] = load_file(path)
        with safe_open(path, "pt") as f:
            meta[batch_size] = f.metadata()
        (entries[batch_size],) = json.loads((out / "manifest.json").read_text())["shards"]
    return tensors, meta, entries, calls


def test_cache_shard_does_not_depend_on_the_batch_size(corpus, tmp_path):  # noqa: F811
    # Whisper alone: its windows give the same bits in any batch, so the shard must too.
    cfg = _cache_recipe(corpus, lambda ups: [u for u in ups if u["config"]["model_type"] == "whisper"])
    cfg.teacher.target_layers = [1, 2]
    tensors, meta, entries, _ = _shards(cfg, tmp_path, "whisper")
    assert entries[1]["ids"] == ["a", "b", "c", "d", "e"]  # the kept rows in dataset order, not by length
    # Not the sha256: safetensors writes the metadata dict in hash order (see test_cache_scale).
    assert {k: v for k, v in entries[1].items() if k != "sha256"} == {k: v for k, v in entries[4].items() if k != "sha256"}
    assert meta[1] == meta[4]
    assert tensors[1].keys() == tensors[4].keys()
    assert all(torch.equal(tensors[1][k], tensors[4][k]) for k in tensors[1])


def test_cache_with_padded_batches_stores_rows_in_place(corpus, tmp_path):  # noqa: F811
    # Layer-norm WavLM and HuBERT pad: a batch of 4 holds e, c, a, b (70, 55, 40, 40 frames).
    def layer_norm(ups):
        return [{"config": {**u["config"], **LAYER_NORM}} if u["config"]["model_type"] != "whisper" else u for u in ups]

    tensors, meta, entries, calls = _shards(_cache_recipe(corpus, layer_norm), tmp_path, "padded", padded=True)
    # Per wav2vec upstream: 5 forwards one by one; with batches of 4, [e, c, a, b] padded, then [d].
    assert len(calls[1]) == 2 * 5 and not any(c["mask"] for c in calls[1])
    assert [c["mask"] for c in calls[4]] == [True, False] * 2
    same = ("ids", "num_frames", "num_samples", "rows", "utterances", "frames", "skipped_ids")
    assert {k: entries[1][k] for k in same} == {k: entries[4][k] for k in same}
    assert entries[4]["num_frames"] == [40, 40, 55, 30, 70] and meta[1] == meta[4]
    assert tensors[1].keys() == tensors[4].keys()
    # Batched and alone differ by float rounding (~1e-6) only, which can move a float16 value
    # by one step: equal to within one float16 rounding step, not bit for bit.
    for key, alone in tensors[1].items():
        torch.testing.assert_close(tensors[4][key].float(), alone.float(), atol=1e-3, rtol=2**-10)


@pytest.mark.slow
def test_benchmark_quick_runs():
    # A subprocess: the benchmark sets its own thread count (run as python -m, like every benchmark entry point).
    done = subprocess.run([sys.executable, "-m", "benchmarks.teacher_batching", "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| WavLM Base+ (layer norm) | yes |" in done.stdout and "| HuBERT Base (group norm) | no |" in done.stdout
    assert "masked / one at a time" in done.stdout and "| all three (fused teacher) |" in done.stdout
