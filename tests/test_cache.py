"""distill.cache: targets cached once give the same training loss as the online teacher.

The corpus is a few demo utterances cut to 320 n + 80 samples (exactly n wav2vec frames) and
written as float32 WAV, so a batch of whole utterances sits on the same frame grid as the cached
whole-utterance targets and decoding returns the very samples the online teacher sees.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import torch

from distill.data.audio import decode_audio
from distill.build import build_distill_student, build_teacher
from distill.cache.writer import CacheError, TargetCache, cache_targets
from distill.config import load_recipe
from distill.data.loader import load_audio_dataset, make_train_dataloader
from distill.training.loop import loss_step

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
# id -> frames; "a" and "b" share a length so they can form one padding-free batch.
FRAMES = {"a": 40, "b": 40, "c": 55, "d": 30, "e": 70}
SHARD = 2  # 6 rows -> 3 shards: [a, b], [c, d], [e, short]


def _demo_recipe(corpus: Path, **extra: str):
    overrides = [f"data.dataset_name={corpus}", "data.min_duration_in_seconds=0.0", "teacher.pca_max_utterances=4"]
    return load_recipe("demo", overrides + [f"{k}={v}" for k, v in extra.items()])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache_corpus")
    sources = sorted((DEMO / "audio").glob("*.flac"))
    for (uid, frames), source in zip(FRAMES.items(), sources):
        wave = decode_audio(str(source), 16000)
        assert len(wave) >= 320 * frames + 80
        sf.write(root / f"{uid}.wav", wave[: 320 * frames + 80], 16000, subtype="FLOAT")
    # Passes the header filter (min duration 0) but is shorter than one frame: the cache skips it.
    sf.write(root / "short.wav", decode_audio(str(sources[0]), 16000)[:200], 16000, subtype="FLOAT")
    return root


@pytest.fixture(scope="module")
def cached(corpus, tmp_path_factory):
    """(recipe, cache folder, the teacher loaded back from the cache's teacher folder)."""
    out = tmp_path_factory.mktemp("cache") / "targets"
    cfg = _demo_recipe(corpus)
    cache_targets(cfg, out, shard_size=SHARD)
    return cfg, out, build_teacher(cfg, None, save_dir=out / "teacher")


def _wave(corpus: Path, uid: str) -> torch.Tensor:
    return torch.from_numpy(decode_audio(str(corpus / f"{uid}.wav"), 16000))


def _whole_batch(corpus: Path, ids: list[str]) -> dict:
    waves = torch.stack([_wave(corpus, uid) for uid in ids])  # equal lengths: no padding
    n = len(ids)
    return {"waveforms": waves, "lengths": torch.full((n,), waves.shape[1]), "ids": ids,
            "starts": torch.zeros(n, dtype=torch.long), "skipped": {}}


def _copy(cache: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cache, tmp_path / "copy"))


class _Counting:
    """Wraps teacher.targets to count calls; raises on call number `fail_on` (a crash mid-run)."""

    def __init__(self, teacher, fail_on: int | None = None):
        self.inner, self.calls, self.fail_on = teacher.targets, 0, fail_on
        teacher.targets = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated crash")
        return self.inner(*args, **kwargs)


# --------------------------------------------------------------------------- the check


@pytest.mark.parametrize("ids", [["a", "b"], ["e"]])
def test_loss_from_cache_matches_online_teacher(cached, corpus, ids):
    cfg, out, teacher = cached
    cache = TargetCache.open(out, teacher_hash=teacher.config_hash(), layer_ids=teacher.target_layer_ids)
    torch.manual_seed(0)
    student = build_distill_student(cfg, teacher).eval()  # eval: no dropout, both losses see one network
    batch = _whole_batch(corpus, ids)
    online, online_parts = loss_step(student, teacher, batch, 1.0)
    with_targets = cache.add_targets(dict(batch))
    from_cache, cache_parts = loss_step(student, None, with_targets, 1.0)
    # A random student's loss barely notices WHICH targets it gets (targets one frame off change
    # it by ~6e-4 relative), so the targets themselves are compared too, at float16 precision.
    assert from_cache.item() == pytest.approx(online.item(), rel=1e-4)
    for key, value in online_parts.items():
        assert cache_parts[key].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-4), key
    expected = teacher.targets(batch["waveforms"], lengths=batch["lengths"]).layers
    scale = expected.abs().max().item()
    torch.testing.assert_close(with_targets["targets"], expected, rtol=1e-3, atol=1e-3 * scale)


def test_crops_are_slices_of_whole_utterance_targets(cached, corpus):
    _, out, teacher = cached
    cache = TargetCache.open(out)
    crops = cache.crops(["c", "e"], torch.tensor([320 * 3, 320 * 10]), 20)
    assert crops.shape == (3, 2, 20, 64) and crops.dtype == torch.float32
    assert torch.equal(crops[:, 0], cache.targets("c")[:, 3:23])
    assert torch.equal(crops[:, 1], cache.targets("e")[:, 10:30])
    full = teacher.targets([_wave(corpus, "e")]).layers[:, 0]
    assert cache.targets("e").shape == full.shape == (3, FRAMES["e"], 64)
    torch.testing.assert_close(crops[:, 1], full[:, 10:30], rtol=2e-3, atol=2e-3 * full.abs().max().item())


def test_train_loader_batches_get_aligned_targets(cached, corpus):
    """Each crop's targets are the online teacher's targets of the WHOLE utterance at the crop's
    frames (start // 320 onwards), up to float16 rounding: checked against the teacher, not
    against cache.targets (which is how crops reads them)."""
    cfg, out, teacher = cached
    cache = TargetCache.open(out, verify=False)
    assert cache.min_samples == teacher.min_samples
    dataset = load_audio_dataset(cfg.data, "train")
    loader = make_train_dataloader(dataset, cfg.data, batch_size=2, seed=3, min_samples=cache.min_samples)
    whole = {uid: teacher.targets([_wave(corpus, uid)]).layers[:, 0] for uid in FRAMES}
    seen, starts = 0, set()
    for batch in loader:
        n = (batch["waveforms"].shape[1] - 80) // 320
        targets = cache.add_targets(batch)["targets"]
        assert targets.shape == (3, len(batch["ids"]), n, 64)
        for b, (uid, start) in enumerate(zip(batch["ids"], batch["starts"].tolist())):
            expected = whole[uid][:, start // 320 : start // 320 + n]
            scale = expected.abs().max().item()
            torch.testing.assert_close(targets[:, b], expected, rtol=2e-3, atol=2e-3 * scale)
            seen += 1
            starts.add(start)
    assert seen == len(FRAMES)  # "short" is dropped by the loader too
    assert starts != {0}  # some crop starts inside its utterance, so the frame offset is exercised


def test_manifest_records_teacher_shards_and_skips(cached):
    _, out, teacher = cached
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["dtype"] == "float16"
    assert (manifest["frame_rate"], manifest["hop_length"]) == (50.0, 320)
    assert manifest["teacher_hash"] == teacher.config_hash()
    assert manifest["layer_ids"] == [1, 2, 3] and manifest["target_dim"] == 64
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.safetensors" for i in range(3)]
    assert manifest["totals"] == {"rows": 6, "utterances": 5, "frames": sum(FRAMES.values()), "skipped": {"too_short": 1}}
    assert manifest["shards"][2]["skipped_ids"] == {"short": "too_short"}
    cache = TargetCache.open(out)
    assert sorted(cache.ids) == sorted(FRAMES) and all(cache.num_frames(u) == n for u, n in FRAMES.items())
    assert cache.teacher_dir == out / "teacher" and (cache.teacher_dir / "fused_teacher.json").is_file()
    cache.check_recipe(_demo_recipe(Path(".")).teacher)  # the same teacher section: no error


# --------------------------------------------------------------------------- resuming


def test_rerun_skips_finished_shards_and_redoes_broken_ones(cached, tmp_path):
    cfg, out, _ = cached
    copy = _copy(out, tmp_path)
    mtimes = {p.name: p.stat().st_mtime_ns for p in copy.glob("shard-*")}
    teacher = build_teacher(cfg, None, save_dir=copy / "teacher")
    counter = _Counting(teacher)
    cache_targets(cfg, copy, shard_size=SHARD, teacher=teacher)
    assert counter.calls == 0
    assert {p.name: p.stat().st_mtime_ns for p in copy.glob("shard-*")} == mtimes

    (copy / "shard-00001.safetensors").unlink()
    _flip_last_byte(copy / "shard-00002.safetensors")
    cache_targets(cfg, copy, shard_size=SHARD, teacher=teacher)
    assert counter.calls == 2  # one teacher batch per rewritten shard
    assert (copy / "shard-00000.safetensors").stat().st_mtime_ns == mtimes["shard-00000.safetensors"]
    assert sorted(TargetCache.open(copy).ids) == sorted(FRAMES)


def test_interrupted_run_resumes_where_it_stopped(cached, tmp_path):
    cfg, out, _ = cached
    folder = tmp_path / "interrupted"
    shutil.copytree(out / "teacher", folder / "teacher")  # the fitted teacher, as the first run saved it
    teacher = build_teacher(cfg, None, save_dir=folder / "teacher")
    counter = _Counting(teacher, fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        cache_targets(cfg, folder, shard_size=SHARD, teacher=teacher)
    assert sorted(p.name for p in folder.glob("shard-*")) == ["shard-00000.safetensors"]
    with pytest.raises(CacheError, match="incomplete"):
        TargetCache.open(folder)
    counter.fail_on = None
    cache_targets(cfg, folder, shard_size=SHARD, teacher=teacher)
    assert counter.calls == 4  # 2 before the crash (the second failed), then one per shard left
    resumed, original = TargetCache.open(folder), TargetCache.open(out)
    for uid in FRAMES:
        assert torch.equal(resumed.targets(uid), original.targets(uid))


def test_another_teacher_cannot_reuse_the_folder(cached, tmp_path):
    cfg, out, _ = cached
    copy = _copy(out, tmp_path)
    other_cfg = _demo_recipe(Path(cfg.data.dataset_name), **{"teacher.target_layers": "[2,3]"})
    other = build_teacher(other_cfg, load_audio_dataset(other_cfg.data, "train"))
    with pytest.raises(CacheError, match="made for another run") as err:
        cache_targets(cfg, copy, shard_size=SHARD, teacher=other)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- refusing wrong targets


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(CacheError, match=match) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_corrupted_shard_is_a_one_line_error_naming_it(cached, tmp_path):
    """Opening checks sizes only; the flipped byte is found at the shard's first read, and by verify()."""
    copy = _copy(cached[1], tmp_path)
    _flip_last_byte(copy / "shard-00001.safetensors")
    cache = TargetCache.open(copy)
    assert cache.targets("a").shape == (3, FRAMES["a"], 64)  # shard 0 is intact and reads
    message = _one_line_error("checksum mismatch", cache.targets, "c")  # c lives in shard 1
    assert message.startswith(f"cache {copy}: shard-00001.safetensors checksum mismatch (expected ")
    assert message.endswith("rerun cache-targets")
    message = _one_line_error("checksum mismatch", TargetCache.open(copy).verify)
    assert message.startswith(f"cache {copy}: shard-00001.safetensors checksum mismatch")
    with open(copy / "shard-00002.safetensors", "ab") as f:
        f.write(b"x")  # a size change is caught at open, before any read
    message = _one_line_error("bytes, the manifest says", TargetCache.open, copy)
    assert message.startswith(f"cache {copy}: shard-00002.safetensors has ")


def test_wrong_teacher_or_layers_are_one_line_errors(cached):
    cfg, out, teacher = cached
    _one_line_error("made with teacher", TargetCache.open, out, teacher_hash="0" * 64)
    _one_line_error(r"holds target layers \[1, 2, 3\], expected \[1, 2\]", TargetCache.open, out, layer_ids=[1, 2])
    cache = TargetCache.open(out, teacher_hash=teacher.config_hash(), layer_ids=[1, 2, 3])
    other = _demo_recipe(Path(cfg.data.dataset_name), **{"teacher.dtype": "bfloat16", "teacher.target_layers": "[2,3]"})
    _one_line_error("differs from the recipe's in dtype, target_layers", cache.check_recipe, other.teacher)


def test_streaming_is_refused(cached, tmp_path):
    """The cache is keyed by map-style row ids; a stream (whose ids may differ) cannot use it."""
    cfg, out, _ = cached
    streamed = _demo_recipe(Path(cfg.data.dataset_name), **{"data.streaming": "true", "data.targets_cache": str(out)})
    message = _one_line_error("needs a map-style dataset", cache_targets, streamed, tmp_path / "new")
    assert message.startswith(f"cache {tmp_path / 'new'}: cache-targets needs a map-style dataset (data.streaming=false)")
    assert not (tmp_path / "new").exists()  # refused before loading data or building a teacher
    message = _one_line_error("needs a map-style dataset", TargetCache.check_data, streamed.data)
    assert message.startswith(f"cache {out}: data.targets_cache needs a map-style dataset (data.streaming=false)")
    cache = TargetCache.open(out, verify=False)
    _one_line_error("needs a map-style dataset", cache.check_data, streamed.data)  # on an opened cache too
    cache.check_data(_demo_recipe(Path(cfg.data.dataset_name), **{"data.targets_cache": str(out)}).data)


def test_unknown_ids_and_off_grid_crops_are_refused(cached):
    cache = TargetCache.open(cached[1], verify=False)
    _one_line_error("no targets for utterance 'nope'", cache.crops, ["nope"], [0], 5)
    _one_line_error("'a' has 40 cached frames", cache.crops, ["a"], [320 * 30], 20)
    _one_line_error("not on the 320-sample frame grid", cache.crops, ["a"], [100], 5)


def test_missing_manifest_and_teacher_files(cached, tmp_path):
    copy = _copy(cached[1], tmp_path)
    (copy / "teacher" / "fusion.safetensors").write_bytes(b"not the teacher")
    _one_line_error("teacher/fusion.safetensors checksum mismatch", TargetCache.open, copy)
    (copy / "manifest.json").unlink()
    _one_line_error("no manifest.json; run cache-targets first", TargetCache.open, copy)


@pytest.mark.slow
def test_benchmark_quick_runs(capsys):
    # In-process (the package is imported already); a subprocess would pay every import again.
    spec = importlib.util.spec_from_file_location("cache_vs_online", ROOT / "benchmarks" / "cache_vs_online.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    summary = bench.main(["--quick"])
    printed = capsys.readouterr().out
    assert "cache 3-up / cache 1-up:" in printed and "online 3-up / cache 3-up:" in printed
    assert set(summary["step_ms_median"]) == {"1-up cache", "1-up online", "3-up cache", "3-up online"}
    assert all(ms > 0 for ms in summary["step_ms_median"].values())
