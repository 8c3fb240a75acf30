"""The target cache at corpus scale: several processes, int8 storage, verification at first read.

Same corpus as tests/test_cache.py: a few demo utterances cut to whole wav2vec frames (40, 40,
55, 30, 70 frames) plus one too short to cache; shard size 2 gives 3 shards, so under two
processes rank 0 writes shards 0 and 2 and rank 1 writes shard 1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from distill.data.audio import decode_audio
from distill.cache.writer import CacheError, TargetCache, cache_targets
from distill.cli import main as cli_main
from distill.config import load_recipe
from distill.cache.reader import encode_targets
from distill.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
FRAMES = {"a": 40, "b": 40, "c": 55, "d": 30, "e": 70}
SHARD = 2
FAST = ["data.min_duration_in_seconds=0.0", "teacher.pca_max_utterances=4"]


def _recipe(corpus: Path, *extra: str):
    return load_recipe("demo", [f"data.dataset_name={corpus}", *FAST, *extra])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Targets are compared bit for bit with caches written by 1-thread subprocesses; another
    # module's benchmark may have left this process on more threads (other matmul blocking).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale_corpus")
    sources = sorted((ROOT / "data" / "demo" / "audio").glob("*.flac"))
    for (uid, frames), source in zip(FRAMES.items(), sources):
        sf.write(root / f"{uid}.wav", decode_audio(str(source), 16000)[: 320 * frames + 80], 16000, subtype="FLOAT")
    sf.write(root / "short.wav", decode_audio(str(sources[0]), 16000)[:200], 16000, subtype="FLOAT")
    return root


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory) -> Path:
    """A float16 cache written by this (single) process; the teacher's PCA is fitted here."""
    return cache_targets(_recipe(corpus), tmp_path_factory.mktemp("one") / "cache", shard_size=SHARD)


def _free_port() -> int:
    # Other test runs on this machine may hold accelerate's default port.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(corpus: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "distill", "cache-targets", "demo",
         "--out", str(out), "--shard-size", str(SHARD), f"data.dataset_name={corpus}", *FAST, *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _rows(manifest: dict) -> list[dict]:
    """Shard entries without their checksums: which rows, frames and skips each shard holds."""
    return [{k: v for k, v in entry.items() if k != "sha256"} for entry in manifest["shards"]]


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.safetensors")}


# --------------------------------------------------------------------------- several processes


@pytest.mark.slow
def test_two_processes_write_the_one_process_cache(corpus, tmp_path):
    """Rank 0 fits the teacher, each rank writes its own shards, one manifest: every row's targets equal."""
    two = tmp_path / "two"
    result = _launch_two(corpus, two)
    assert result.stdout.count("targets cached in") == 1  # one rank reports
    assert result.stderr.count("PCA projection") == 1  # fitted once, by rank 0 ...
    assert result.stderr.count("reusing the fused teacher saved in") == 1  # ... and loaded by rank 1
    # The 1-process reference with the same teacher (a PCA refit in another process may differ
    # in the last bits, which is not what this test is about).
    one_process = cache_targets(_recipe(corpus), tmp_path / "one", shard_size=SHARD, teacher=_saved_teacher(two))
    m1, m2 = _manifest(one_process), _manifest(two)
    assert m2["complete"] and m2["teacher_hash"] == m1["teacher_hash"] and m2["totals"] == m1["totals"]
    assert [e["index"] for e in m2["shards"]] == [0, 1, 2]
    assert not list(two.glob("progress-rank*.json"))  # rank 0 folded them into the manifest
    # Shards depend on rows, not ranks. (Not their sha256: safetensors writes the metadata dict in
    # a per-process hash order, so equal tensors need not mean equal bytes.)
    assert _rows(m2) == _rows(m1)
    c1, c2 = TargetCache.open(one_process), TargetCache.open(two)
    assert sorted(c2.ids) == sorted(FRAMES)
    for uid in FRAMES:
        assert torch.equal(c1.targets(uid), c2.targets(uid)), uid


def _as_if_killed(cache: Path) -> None:
    """The state two ranks leave when killed after rank 0 finished shard 0 and rank 1 shard 1."""
    manifest = _manifest(cache)
    identity = {k: manifest[k] for k in ("teacher_hash", "layer_ids", "target_dim", "dtype", "sampling_rate", "dataset", "shard_size")}
    entries = {e["index"]: e for e in manifest["shards"]}
    for rank, index in ((0, 0), (1, 1)):
        (cache / f"progress-rank{rank}.json").write_text(json.dumps({**identity, "shards": [entries[index]]}))
    manifest.update(complete=False, shards=[])  # rank 0 had not merged rank 1's progress yet
    manifest.pop("totals")
    (cache / "manifest.json").write_text(json.dumps(manifest))
    (cache / "shard-00002.safetensors").unlink()


@pytest.mark.slow
def test_a_killed_two_process_cache_resumes_per_rank(corpus, one_process, tmp_path):
    # First with 2 processes (each rank continues from its own progress file), then with 1 process
    # (the same files serve any number of ranks): only the missing shard is computed.
    for name, run in (("two", lambda out: _launch_two(corpus, out)),
                      ("one", lambda out: cache_targets(_recipe(corpus), out, shard_size=SHARD))):
        folder = Path(shutil.copytree(one_process, tmp_path / name))
        _as_if_killed(folder)
        with pytest.raises(CacheError, match="incomplete"):
            TargetCache.open(folder)
        kept = _mtimes(folder)
        run(folder)
        assert _mtimes(folder).items() > kept.items() and set(_mtimes(folder)) == set(kept) | {"shard-00002.safetensors"}
        assert _rows(_manifest(folder)) == _rows(_manifest(one_process)), name
        resumed, reference = TargetCache.open(folder), TargetCache.open(one_process)
        assert all(torch.equal(resumed.targets(uid), reference.targets(uid)) for uid in ("e", "a", "c"))
        assert not list(folder.glob("progress-rank*.json"))


# --------------------------------------------------------------------------- int8 storage


def test_int8_codes_round_trip_within_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 16) * torch.logspace(-3, 2, 7)[None, :, None]  # frames of very different scales
    x[1, 2] = 0.0  # a silent frame must not divide by zero
    stored = encode_targets("utt00000", x, "int8", "test")
    codes, scale = stored["utt00000"], stored["utt00000.scale"]
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (3, 7)
    decoded = codes.float() * scale.float()[..., None]
    assert torch.equal(decoded[1, 2], torch.zeros(16))
    step = scale.float()[..., None]
    # Half a code step, plus float16 rounding of the scale times the largest code.
    assert bool(((decoded - x).abs() <= 0.5 * step + 127 * step * 2**-11 + 1e-12).all())
    assert codes.abs().max() == 127
    with pytest.raises(CacheError, match="test: int8 scales overflow float16"):
        encode_targets("utt00000", torch.full((1, 1, 4), 1e8), "int8", "test")


def test_int8_cache_is_half_the_size_and_close_to_float16(corpus, one_process, tmp_path):
    folder = cache_targets(_recipe(corpus, "data.targets_cache_dtype=int8"), tmp_path / "int8", shard_size=SHARD,
                           teacher=_saved_teacher(one_process))
    manifest = _manifest(folder)
    assert manifest["dtype"] == "int8" and manifest["teacher_hash"] == _manifest(one_process)["teacher_hash"]
    fp16, int8 = TargetCache.open(one_process), TargetCache.open(folder)
    assert int8.dtype == "int8"
    for uid in FRAMES:
        ref, got = fp16.targets(uid), int8.targets(uid)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        cosine = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
        assert cosine.min() > 0.999, uid
        assert ((got - ref).norm() / ref.norm()) < 0.02, uid
    crops = int8.crops(["c"], [320 * 5], 10)
    assert torch.equal(crops[:, 0], int8.targets("c")[:, 5:15])  # slicing codes and scales together
    size = {name: sum(e["bytes"] for e in _manifest(f)["shards"]) for name, f in (("fp16", one_process), ("int8", folder))}
    assert size["int8"] < 0.6 * size["fp16"]  # D=64: (64 + 2) / 128 of the payload, plus headers
    # The other dtype cannot resume into this folder, and an unknown one is refused in one line.
    with pytest.raises(CacheError, match=r"made for another run \(dtype: int8 vs float16\)"):
        cache_targets(_recipe(corpus), folder, shard_size=SHARD, teacher=_saved_teacher(one_process))
    with pytest.raises(CacheError, match="data.targets_cache_dtype='bf16', expected one of float16, int8"):
        cache_targets(_recipe(corpus), tmp_path / "bad", shard_size=SHARD, dtype="bf16")
    # The benchmark's --compare gives the same figures for the two real caches.
    compared = _benchmark("cache_scale").compare_caches(one_process, folder)
    every = torch.cat([torch.nn.functional.cosine_similarity(int8.targets(u), fp16.targets(u), dim=-1).flatten() for u in fp16.ids])
    assert compared["utterances"] == len(fp16.ids) and compared["cosine_min"] == pytest.approx(every.min().item())
    assert compared["cosine_mean"] == pytest.approx(every.mean().item()) and "(int8)" in compared["other"]


def _benchmark(name: str):
    """A script of benchmarks/ loaded from its file, as `python benchmarks/NAME.py` would run it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _saved_teacher(cache: Path):
    from teachers import FusedTeacher

    return FusedTeacher.from_pretrained(cache / "teacher")


def test_a_cache_written_before_sizes_and_int8_still_reads(one_process, tmp_path):
    folder = Path(shutil.copytree(one_process, tmp_path / "old"))
    manifest = _manifest(folder)
    for entry in manifest["shards"]:
        del entry["bytes"]  # the manifest an earlier cache-targets wrote
    (folder / "manifest.json").write_text(json.dumps(manifest))
    cache = TargetCache.open(folder)
    assert cache.dtype == "float16" and torch.equal(cache.targets("e"), TargetCache.open(one_process).targets("e"))


# --------------------------------------------------------------------------- verification


def test_verify_cache_command(one_process, tmp_path, capsys):
    assert cli_main(["verify-cache", str(one_process)]) == 0
    assert "3 shards" in capsys.readouterr().out
    folder = Path(shutil.copytree(one_process, tmp_path / "bad"))
    data = bytearray((folder / "shard-00002.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "shard-00002.safetensors").write_bytes(bytes(data))
    assert cli_main(["verify-cache", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: one line
    assert err.startswith("fusion-distill verify-cache: error: cache ") and "shard-00002.safetensors checksum mismatch" in err


def test_training_stops_at_the_first_read_of_a_corrupted_shard(corpus, one_process, tmp_path):
    folder = Path(shutil.copytree(one_process, tmp_path / "bad"))
    data = bytearray((folder / "shard-00001.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size: opening the cache cannot tell
    (folder / "shard-00001.safetensors").write_bytes(bytes(data))
    TargetCache.open(folder)
    cfg = _recipe(corpus, f"data.targets_cache={folder}", f"training.output_dir={tmp_path / 'run'}", "training.max_steps=12",
                  "training.per_device_train_batch_size=2", "training.report_to=none", "training.eval_steps=null",
                  "training.save_steps=100")
    # 5 utterances in batches of 2: every epoch reads shard 1 (c, d) within 3 steps.
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors checksum mismatch") as err:
        train(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_storage_benchmark_quick_runs(capsys):
    result = _benchmark("cache_scale").main(["--quick"])
    assert "size at K=3, D=768" in capsys.readouterr().out
    # D + 2 bytes a frame vector instead of 2 D: 770 / 1536 of float16, plus shard headers.
    assert 0.49 < result["gb_per_hour"]["int8"] / result["gb_per_hour"]["float16"] < 0.52
    assert result["gb_per_hour"]["int8"] <= 0.45  # the goal
    assert result["int8_vs_fp16_demo_d64"]["cosine_min"] >= 0.999


@pytest.mark.slow
def test_loader_benchmark_quick_runs(capsys):
    result = _benchmark("loader").main(["--quick"])
    assert "| 16k FLAC, 0 workers + int8 cache |" in capsys.readouterr().out
    assert set(result["audio_s_per_s"]) == {"16k FLAC, 0 workers", "44k FLAC, 0 workers",
                                            "16k FLAC, 0 workers + float16 cache", "16k FLAC, 0 workers + int8 cache"}
    assert all(rate > 0 for rate in result["audio_s_per_s"].values())
