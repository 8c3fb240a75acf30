"""The benchmark's stages, each through the project's public CLI or API.

- distil: `python -m distill train RECIPE` in a real process, one per teacher;
- fit: `python -m distill fit-teacher` for the supervised-projection row;
- probe: `distill.evaluation.probe.run_probes` on features from `teacher_extractor` / `hf_encoder_extractor`;
- fine-tune: a stock `AutoModelForCTC.from_pretrained(student_folder)` in a plain loop;
- cost: `distill.evaluation.cost` jobs on 10 s of audio, interleaved rounds, one run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from transformers import AutoFeatureExtractor, AutoModel, AutoModelForCTC, get_scheduler

from distill.build import single_upstream_teacher
from distill.config import DataConfig, load_recipe
from distill.evaluation.cost import (audio_encoder_job, fused_teacher_job, measure_jobs, student_job, upstream_job,
                                     whisper_encoder_job)
from distill.data.loader import load_audio_dataset, make_eval_batches
from distill.evaluation.metrics import ctc_greedy, error_rate
from distill.evaluation.extractors import hf_encoder_extractor, teacher_extractor
from distill.evaluation.probe import run_probes
from distill.evaluation.tasks import ProbeTask
from distill.evaluation.verification import split_speakers
from distill.runs import read_eval_log
from teachers import FusedTeacher

from .config import BenchmarkConfig

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- the CLI in real processes
def cli(*args: str, log: Path, cwd: Path = REPO) -> None:
    """`python -m distill ARGS` in `cwd` (a recipe's relative paths are read from there), output to
    `log`; one line naming the log when it fails."""
    # The child uses as many threads as this process: on a shared machine oversubscribed threads
    # make torch many times slower, not faster. PYTHONPATH: this checkout's distill from any cwd.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run([sys.executable, "-m", "distill", *args], cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"fusion-distill {args[0]} failed ({done.returncode}): {tail[0]} (full log: {log})")
    logger.info("fusion-distill %s done in %.1f min (log: %s)", args[0], (time.perf_counter() - start) / 60, log)


def distil(recipe: Path, run_dir: Path, targets: Path | None = None, elsewhere: Sequence[Path] = (),
           root: Path = REPO) -> Path:
    """Train one student; reuse a finished run of the same recipe: in `run_dir`, or any of the
    run folders `elsewhere` (the sweep's point that equals an attempt is not trained twice).
    root: the folder the recipe's relative paths start from (the benchmark's --out, write_recipe).

    targets: a target cache folder. The teacher then runs once over the corpus
    (`fusion-distill cache-targets`), not at every step: on a CPU the two upstreams' forward is
    about half of a step. Students of the same teacher (the sweep) share one cache.
    """
    wanted = _resolved(recipe)  # read once, compared with every finished run
    for other in elsewhere:
        if other != run_dir and (other / "student" / "config.json").exists() and _resolved(other / "recipe.yaml") == wanted:
            logger.info("%s: reusing the equal run %s", recipe.name, other)
            return other / "student"
    student = run_dir / "student"
    if (student / "config.json").exists():
        if _resolved(run_dir / "recipe.yaml") == wanted:
            return student
        # A changed config (more steps, another student) must not silently score the old student.
        logger.info("%s was trained from another recipe than %s: training again", run_dir, recipe)
        shutil.rmtree(run_dir)
    overrides = []
    if targets is not None:
        if not (targets / "manifest.json").exists() or not (targets / "teacher").exists():
            cli("cache-targets", str(recipe.resolve()), "--out", str(targets.resolve()), log=targets.with_suffix(".log"),
                cwd=root)
        overrides = [f"data.targets_cache={targets.resolve()}"]
        if OmegaConf.load(recipe).training.get("eval_steps"):
            # The held-out eval's targets too, by the same saved teacher: without them every
            # evaluation runs the teacher (Whisper's 30 s window) over the dev split again.
            dev = targets.with_name(f"{targets.name}-dev")
            if not (dev / "manifest.json").exists():
                cli("cache-targets", str(recipe.resolve()), "--out", str(dev.resolve()), "--split", "dev",
                    "--teacher", str((targets / "teacher").resolve()), log=dev.with_suffix(".log"), cwd=root)
            overrides.append(f"data.eval_targets_cache={dev.resolve()}")
    cli("train", str(recipe.resolve()), *overrides, "--output-dir", str(run_dir.resolve()), log=run_dir.with_suffix(".log"),
        cwd=root)
    return student


def _same_recipe(recipe: Path, used: Path) -> bool:
    """Whether a finished run used this recipe; where it ran and where its targets came from do not count."""
    return _resolved(used) == _resolved(recipe)


def _resolved(path: Path) -> dict | None:
    """A recipe as `train` reads it, without its output and cache folders; None when there is no file."""
    if not path.exists():
        return None
    body = OmegaConf.to_container(OmegaConf.structured(load_recipe(path)))
    body["training"].pop("output_dir")
    for key in ("targets_cache", "eval_targets_cache"):  # where targets came from is not what was trained
        body["data"].pop(key)
    return body


def training_summary(run_dir: Path) -> dict:
    """What the run said about itself: its last held-out eval (per-layer cosine vs the teacher),
    the best step, and the trainer's one-line convergence verdict."""
    evals = read_eval_log(run_dir)
    log = run_dir.with_suffix(".log")
    lines = log.read_text().splitlines() if log.exists() else []
    verdict = next((ln.strip() for ln in reversed(lines) if "convergence" in ln or ln.strip().startswith("eval loss")), None)
    if not evals:
        return {"convergence": verdict}
    last = evals[-1]
    cosines = [last[k] for k in sorted(k for k in last if k.startswith("cos/"))]
    best = min(evals, key=lambda r: r["loss"])
    return {"eval_steps": [r["step"] for r in evals], "eval_loss": [round(r["loss"], 4) for r in evals],
            "final_layer_cosine": [round(c, 4) for c in cosines], "best_step": best["step"], "convergence": verdict}


def fit_supervised(recipe: Path, out: Path, steps: int, max_items: int, root: Path = REPO) -> Path:
    """The seed paper's stage: projection + HConv + head fitted on phoneme CTC, upstreams frozen."""
    if not (out / "fused_teacher.json").exists():
        cli("fit-teacher", str(recipe.resolve()), "--out", str(out.resolve()), "--task", "ctc", "--column", "phonemes",
            "--steps", str(steps), "--max-items", str(max_items), "--no-compare", "--device", "cpu",
            "teacher.projection_fit=supervised", f"teacher.pretrained={out.resolve()}", log=out.with_suffix(".log"), cwd=root)
    return out


# ----------------------------------------------------------------------------- probes
def corpus_data_config(cfg: BenchmarkConfig, corpus: Path) -> DataConfig:
    """The corpus as the data layer reads it; every label is an extra column under its own name."""
    return DataConfig(dataset_name=str(corpus), text_column_name=None, label_column_name=None,
                      min_duration_in_seconds=cfg.corpus.min_seconds, max_duration_in_seconds=cfg.corpus.max_seconds)


def probe_data(cfg: BenchmarkConfig, corpus: Path, min_samples: int) -> tuple[list[dict], list[dict], list[ProbeTask]]:
    """Materialised train/test batches (every model sees the same ones) and the tasks."""
    columns = [t.partition(":")[2] for t in cfg.tasks]
    data, p = corpus_data_config(cfg, corpus), cfg.probe
    train = list(make_eval_batches(load_audio_dataset(data, "train", columns=columns), data, p.batch_size,
                                   p.train_items, min_samples))
    test = list(make_eval_batches(load_audio_dataset(data, "test", columns=columns), data, p.batch_size,
                                  p.test_items, min_samples))
    tasks = [ProbeTask.from_batches(train, *spec.split(":")) for spec in cfg.tasks]
    for task in tasks:  # too few seen / unseen speakers: refuse now, not after every model is probed
        if task.kind == "verification":
            split_speakers([v for b in train for v in task.labels_of(b)], [v for b in test for v in task.labels_of(b)],
                           f"tasks: {task.name}")
    return train, test, tasks


def probe(name: str, extract: Callable, interface: str, data: tuple, cfg: BenchmarkConfig,
          cache: Path | None = None, identity: str = "") -> dict[str, dict]:
    """Every task on one model, one shared feature cache; scores with standard errors.

    cache: a JSON file that keeps the scores, reused while `identity` (what the model is, e.g. a
    teacher's config hash), the interface and the probe settings are the same. A real Whisper
    teacher's probe costs minutes on a CPU; a rerun (or a process started earlier) need not pay twice.
    """
    train, test, tasks = data
    p = cfg.probe
    key = {"name": name, "identity": identity, "interface": interface, "probe": dataclasses.asdict(p),
           "tasks": [t.name for t in tasks], "items": [len(train), len(test)]}
    if cache is not None and cache.exists():
        stored = json.loads(cache.read_text())
        if stored["key"] == key:
            logger.info("probed %-34s reused from %s", name, cache)
            return stored["tasks"]
    start = time.perf_counter()
    results = run_probes(extract, train, test, tasks, interface=interface, steps=p.steps, learning_rate=p.learning_rate,
                         seed=0, batch_size=p.batch_size)
    logger.info("probed %-34s %s (%.0f s)", name, "  ".join(f"{k}={r.score:.3f}" for k, r in results.items()),
                time.perf_counter() - start)
    scores = {task: _with_error(r.to_dict()) for task, r in results.items()}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "tasks": scores}, indent=1) + "\n")
    return scores


def _with_error(result: dict) -> dict:
    """Adds `value` (higher is better: accuracy, 1 - PER or 1 - EER; `value_metric` says which) and
    its binomial standard error over test utterances (an approximation for PER, whose symbols within
    an utterance are not independent, and for EER, over the unseen speakers' test utterances)."""
    # An error rate above 1 (more insertions than reference symbols) scores 0, not below.
    value = max(0.0, 1.0 - result["score"]) if result["lower_is_better"] else result["score"]
    n = max(result["num_dev"], 1)
    value_metric = f"1 - {result['metric']}" if result["lower_is_better"] else result["metric"]
    return {**result, "value": value, "value_metric": value_metric, "stderr": math.sqrt(max(value * (1 - value), 0.0) / n)}


def teacher_rows(teacher: FusedTeacher, supervised: Path | None, names: Sequence[str]) -> list[tuple[str, str, str, Callable, Any]]:
    """(row name, group, interface, extractor, costed module) for every upstream and fused view.

    The four fused views share one run of the teacher per batch (`_shared_features`): with a real
    Whisper upstream, its 30 s window is most of a probe's time on a CPU.
    """
    rows, features = [], _shared_features(teacher)
    for i, name in enumerate(names):
        upstream = teacher.upstreams[i]  # costed as its transformers model, else end to end
        rows.append((f"upstream: {name}", "upstream", "weighted_sum", _upstream_features(teacher, i, features),
                     upstream.model if hasattr(upstream.model, "config") else upstream))
    projected = lambda w, n: _projected(teacher, *features(w, n))  # noqa: E731
    rows += [  # `features`: the aligned, normalised concatenation
        ("fused: concat + WS", "fused", "weighted_sum", features, teacher),
        ("fused: concat + HConv", "fused", "hconv", features, teacher),
        ("fused teacher: CHConv-PCA", "fused", "weighted_sum", projected, teacher),
        ("fused: CHConv-PCA + HConv", "fused", "hconv", projected, teacher),
    ]
    if supervised is not None:
        rows.append(("fused: CHConv supervised (PR) + HConv", "fused", "hconv",
                     teacher_extractor(FusedTeacher.from_pretrained(supervised)), teacher))
    return rows


def _shared_features(teacher: FusedTeacher) -> Callable:
    """`teacher_extractor(teacher, project=False)`, computed once per batch tensor (probe batches
    are materialised once and handed to every row)."""
    extract, seen = teacher_extractor(teacher, project=False), {}

    def features(waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(waveforms), waveforms.data_ptr(), tuple(waveforms.shape), tuple(lengths.tolist()))
        if key not in seen:
            seen[key] = (waveforms, extract(waveforms, lengths))  # keeps the tensor alive: its id stays unique
        return seen[key][1]

    return features


def _upstream_features(teacher: FusedTeacher, index: int, shared: Callable) -> Callable:
    """Upstream `index` alone as `single_upstream_teacher(teacher, index)` gives it. When the
    upstream has the aligned layer count, that is exactly its slice of the fused concatenation
    (the same frame alignment and per-upstream normalisation, no layer interpolation): taken from
    the shared run instead of running the model again."""
    if teacher.upstreams[index].num_layers + 1 != teacher.num_aligned_layers:
        return teacher_extractor(single_upstream_teacher(teacher, index), project=False)
    start = sum(teacher.dims[:index])

    def extract(waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, frames = shared(waveforms, lengths)
        return features[..., start : start + teacher.dims[index]], frames

    return extract


def _projected(teacher: FusedTeacher, features: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return teacher.project(features), frames


def student_extractor(folder: Path) -> tuple[Callable, torch.nn.Module]:
    model = AutoModel.from_pretrained(folder)  # a stock HubertModel or Wav2Vec2BertModel: no custom code
    return hf_encoder_extractor(model), model


# ----------------------------------------------------------------------------- drop-in fine-tuning
def finetune_data(cfg: BenchmarkConfig, corpus: Path, column: str = "phonemes") -> tuple[list[dict], list[dict], list[str]]:
    """Single-utterance train/test batches and the CTC vocabulary, read once for every fine-tune."""
    data = corpus_data_config(cfg, corpus)
    train = list(make_eval_batches(load_audio_dataset(data, "train", columns=[column]), data, 1, cfg.finetune.train_items))
    test = list(make_eval_batches(load_audio_dataset(data, "test", columns=[column]), data, 1, cfg.probe.test_items))
    return train, test, sorted({ch for b in train for ch in b[column][0]})


def finetune_ctc(folder: Path | None, init_config: Path, data: tuple[list[dict], list[dict], list[str]],
                 cfg: BenchmarkConfig, seed: int = 0) -> dict:
    """Fine-tune `AutoModelForCTC` end to end on phonemes (`data` from finetune_data); test PER.
    folder=None: the same architecture (config of `init_config`) from random init, the
    no-distillation baseline."""
    f, column = cfg.finetune, "phonemes"
    train, test, vocab = data
    kwargs = dict(vocab_size=len(vocab) + 1, pad_token_id=0, ctc_loss_reduction="mean", ctc_zero_infinity=True)
    torch.manual_seed(seed)
    if folder is not None:
        model = AutoModelForCTC.from_pretrained(folder, **kwargs)
    else:
        from transformers import AutoConfig
        model = AutoModelForCTC.from_config(AutoConfig.from_pretrained(init_config, **kwargs))
    features = AutoFeatureExtractor.from_pretrained(init_config)  # the student's own preprocessing
    start = time.perf_counter()
    losses = _finetune_loop(model, features, train, vocab, column, f, seed)
    per = _test_per(model, features, test, vocab, column)
    return {"per": per, "value": 1 - per, "stderr": math.sqrt(max(per * (1 - per), 0) / max(len(test), 1)),
            "final_loss": float(np.mean(losses[-20:])), "steps": f.steps, "minutes": (time.perf_counter() - start) / 60,
            "train_items": len(train), "test_items": len(test)}


def _inputs(features, waves: list[np.ndarray]) -> dict:
    return features(waves, sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="pt")


def _finetune_loop(model, features, train, vocab, column, f, seed) -> list[float]:
    """Two phases, as wav2vec 2.0 fine-tuning does (fairseq's `freeze_finetune_updates`): first
    only the new CTC head learns, on the frozen encoder, so CTC leaves its all-blank phase on
    features it cannot yet damage; then the encoder joins (the conv feature encoder stays frozen,
    as transformers' CTC recipes do) at a lower, decaying learning rate."""
    index = {s: i + 1 for i, s in enumerate(vocab)}
    rng, losses = np.random.default_rng(seed), []
    head_steps = int(f.steps * f.head_only_fraction)
    if hasattr(model, "freeze_feature_encoder"):  # a log-mel student has no conv feature encoder
        model.freeze_feature_encoder()
    model.train()
    for phase, steps in (("head", head_steps), ("encoder", f.steps - head_steps)):
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("lm_head") or (phase == "encoder" and "feature_extractor" not in name)
        trainable = [p for p in model.parameters() if p.requires_grad]
        lr = f.head_learning_rate if phase == "head" else f.learning_rate
        optimizer = torch.optim.AdamW(trainable, lr=lr)
        scheduler = get_scheduler("constant" if phase == "head" else "linear", optimizer, num_warmup_steps=0,
                                  num_training_steps=max(steps, 1))
        for _ in range(steps):
            picks = [train[i] for i in rng.choice(len(train), size=min(f.batch_size, len(train)), replace=False)]
            waves = [b["waveforms"][0, : int(b["lengths"][0])].numpy() for b in picks]
            ids = [[index[c] for c in b[column][0] if c in index] for b in picks]
            labels = torch.full((len(ids), max(map(len, ids))), -100)
            for i, seq in enumerate(ids):
                labels[i, : len(seq)] = torch.tensor(seq)
            loss = model(**_inputs(features, waves), labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 5.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def _test_per(model, features, test, vocab, column) -> float:
    model.eval()
    references, hypotheses = [], []
    for b in test:
        wave = b["waveforms"][0, : int(b["lengths"][0])].numpy()
        best = model(**_inputs(features, [wave])).logits[0].argmax(-1).tolist()
        hypotheses.append([vocab[s - 1] for s in ctc_greedy(best)])
        references.append(list(b[column][0]))
    return error_rate(references, hypotheses)


# ----------------------------------------------------------------------------- cost
def latency(models: dict[str, tuple[str, torch.nn.Module]], seconds: float = 10.0, repeats: int = 5) -> dict[str, dict]:
    """Params and median CPU latency on `seconds` of audio, all models in interleaved rounds."""
    wave = 0.1 * torch.randn(int(seconds * 16000), generator=torch.Generator().manual_seed(0))
    builders = {"student": student_job, "upstream": audio_encoder_job, "fused": fused_teacher_job}
    jobs = []
    for name, (kind, module) in models.items():
        if kind == "upstream" and not hasattr(module, "config"):  # GE2E or another non-transformers upstream
            jobs.append(upstream_job(name, module, wave))
        elif kind == "upstream" and getattr(module.config, "model_type", None) == "whisper":
            # Its real cost: the 30 s window it must run whatever the audio's length, log-mel included.
            jobs.append(whisper_encoder_job(name, module, wave, include_log_mel=True))
        else:
            jobs.append(builders[kind](name, module, wave))
    costs = measure_jobs(jobs, repeats=repeats, threads=2)
    return {c.name: {"params": c.params, "latency_ms": c.latency_ms_median, "gflops": c.gflops} for c in costs}
