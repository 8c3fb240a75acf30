"""Mini SUPERB on synthesised speech: does a student distilled from the FUSED teacher win?

    python -m benchmarks.mini_superb --out runs/mini_superb                 # the shipped config
    python -m benchmarks.mini_superb --config benchmarks/mini_superb/alt.yaml --out runs/mini_alt
    python -m benchmarks.mini_superb --quick --out runs/mini_quick          # same path, tiny, minutes
    python -m benchmarks.mini_superb --attempts --out runs/mini_superb      # then: attempts to move (b)'s boundary
    python -m benchmarks.mini_superb --student-arch wav2vec2_bert --set student.intermediate_size=128 --out runs/mini_logmel

Stages (each reuses what a previous run left, keyed by config hashes): synthesise the corpus with
espeak-ng; train the upstreams (default: phoneme CTC HuBERT, speaker-ID WavLM) and save them like
hub models, or write a real pretrained one (real.yaml: Whisper tiny.en via
benchmarks/pretrained_whisper.py); distil one student from the fused teacher and one from each
upstream through `fusion-distill train`; fit a supervised projection with `fusion-distill fit-teacher`; probe every
upstream, fused view and student on four tasks with one budget; fine-tune students end to end with
stock `AutoModelForCTC`; cost everything on 10 s of audio. Writes OUT/results.json, results.md,
results.png and prints PASS/FAIL for the three criteria (report.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .attempts import run_attempts
from .config import STUDENT_ARCHS, BenchmarkConfig, config_hash, load_config
from .corpus import build_corpus, corpus_identity
from .recipes import recipe, write_recipe
from .report import criteria, markdown, mean_value, plot
from .sweep import run_sweep
from .stages import distil, finetune_ctc, finetune_data, training_summary, fit_supervised, latency, probe, probe_data, student_extractor, teacher_rows
from .upstreams import pretrained_upstream, train_upstream, upstream_folder

logger = logging.getLogger("mini_superb")


def teachers(cfg: BenchmarkConfig) -> tuple[str, ...]:
    """Student runs: the fused teacher (every upstream, in config order), then each upstream alone."""
    return ("fused", *cfg.upstreams)


def prepare(cfg: BenchmarkConfig, cache_dir: Path) -> tuple[Path, dict, dict, dict[str, list[Path]]]:
    """The corpus and the upstreams (trained here or real pretrained weights; built once, cached
    by config hash); the upstream folders each student's teacher uses."""
    corpus = cache_dir / f"corpus-{config_hash(corpus_identity(cfg.corpus))}"
    corpus_info = build_corpus(cfg.corpus, corpus)
    folders = {n: upstream_folder(cache_dir / "upstreams", n, u, corpus_info["hash"]) for n, u in cfg.upstreams.items()}
    reports = {n: pretrained_upstream(n, u, folders[n]) if u.pretrained else train_upstream(n, u, corpus, folders[n])
               for n, u in cfg.upstreams.items()}
    sources = {"fused": list(folders.values()), **{n: [f] for n, f in folders.items()}}
    return corpus, corpus_info, reports, sources


def target_caches(cfg: BenchmarkConfig, out: Path) -> dict[str, Path | None]:
    return {n: out / "targets" / n if cfg.distill.cache_targets else None for n in teachers(cfg)}


def on_top(cfg: BenchmarkConfig, out: Path, cache_dir: Path, sweep: bool, attempts: bool) -> None:
    """The sweep and/or the attempts on top of a finished benchmark in OUT (its results.json and student runs)."""
    results = out / "results.json"
    if not results.exists():
        raise SystemExit(f"--sweep-only / --attempts: no {results}; run the benchmark into {out} first")
    main = json.loads(results.read_text())
    corpus, _, _, sources = prepare(cfg, cache_dir)
    data = probe_data(cfg, corpus, _fused_teacher(out).min_samples)
    if sweep:
        run_sweep(cfg, out, corpus, sources, target_caches(cfg, out), main, data)
    if attempts:
        run_attempts(cfg, out, corpus, sources["fused"], main, data)


def run(cfg: BenchmarkConfig, out: Path, cache_dir: Path, finetune: bool = True, supervised: bool = True,
        sweep: bool = False) -> dict:
    timings, start = {}, time.perf_counter()

    def lap(name: str) -> None:
        timings[name] = round((time.perf_counter() - start) / 60 - sum(timings.values()), 2)

    corpus, corpus_info, upstream_reports, sources = prepare(cfg, cache_dir)
    lap("corpus_and_upstreams")
    recipes = {n: write_recipe(recipe(cfg, corpus, sources[n], out / "runs" / n), out / "recipes" / f"{n}.yaml", root=out)
               for n in teachers(cfg)}
    targets = target_caches(cfg, out)
    students = {n: distil(recipes[n], out / "runs" / n, targets[n], root=out) for n in teachers(cfg)}
    lap("distil")
    supervised_dir = None
    if supervised:
        supervised_dir = fit_supervised(recipes["fused"], out / "teachers" / "supervised", cfg.teacher.supervised_steps,
                                        cfg.probe.train_items, root=out)
        lap("fit_teacher")

    fused_teacher = _fused_teacher(out)
    data = probe_data(cfg, corpus, fused_teacher.min_samples)
    rows, costed = probe_teachers(cfg, out, fused_teacher, supervised_dir, data)
    for n in teachers(cfg):
        extract, model = student_extractor(students[n])
        name = "student of fused teacher" if n == "fused" else f"student of {n} upstream"
        rows.append({"name": name, "group": "student", "interface": "weighted_sum", "teacher": n,
                     "tasks": probe(name, extract, "weighted_sum", data, cfg), "folder": str(students[n]),
                     "training": training_summary(out / "runs" / n)})
        if n == "fused":  # every student has the same architecture: costed once
            costed[model] = (name, "student")
    lap("probe")

    costs = latency({name: (kind, module) for module, (name, kind) in costed.items()})
    _attach_costs(rows, costs)
    lap("cost")

    verdict, lines, retention = criteria(rows)
    result = {"config": asdict(cfg), "corpus": corpus_info, "upstreams": upstream_reports, "rows": rows,
              "projection": fused_teacher.projection_report,
              "retention": retention, "criteria": verdict, "criteria_lines": lines, "finetune": {}, "timings_min": timings}
    if finetune:
        singles = [r for r in rows if r["group"] == "student" and r["name"] != "student of fused teacher"]
        best = max(singles, key=mean_value)
        init, ft_data = Path(students["fused"]), finetune_data(cfg, corpus)
        result["finetune"] = {
            "student of fused teacher": finetune_ctc(students["fused"], init, ft_data, cfg),
            best["name"]: finetune_ctc(Path(best["folder"]), init, ft_data, cfg),
            "same architecture, random init": finetune_ctc(None, init, ft_data, cfg),
        }
        lap("finetune")
    result["timings_min"] = timings
    _write(result, out)
    _card_results(students["fused"], rows, result["finetune"], cfg, lines)
    for line in lines:
        print(line)
    if sweep:
        run_sweep(cfg, out, corpus, sources, targets, result, data)
        logger.info("wrote %s, sweep.md and sweep_size.png / sweep_steps.png", out / "sweep.json")
    return result


def probe_teachers(cfg: BenchmarkConfig, out: Path, fused_teacher, supervised_dir: Path | None, data: tuple) -> tuple[list[dict], dict]:
    """Probe rows of every upstream and fused view (scores kept in OUT/probes/ by the teacher's
    config hash), and the modules to cost."""
    rows, costed = [], {}
    identity = fused_teacher.config_hash()
    for name, group, interface, extract, module in teacher_rows(fused_teacher, supervised_dir, list(cfg.upstreams)):
        cache = out / "probes" / f"{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}_{interface}.json"
        rows.append({"name": name, "group": group, "interface": interface,
                     "tasks": probe(name, extract, interface, data, cfg, cache, identity)})
        costed.setdefault(module, (name, "upstream" if group == "upstream" else "fused"))
    return rows, costed


def _fused_teacher(out: Path):
    from teachers import FusedTeacher
    return FusedTeacher.from_pretrained(out / "runs" / "fused" / "teacher")


def _attach_costs(rows: list[dict], costs: dict[str, dict]) -> None:
    student_cost = next(c for name, c in costs.items() if name.startswith("student"))
    fused_cost = next(c for name, c in costs.items() if name.startswith("fused"))
    for r in rows:
        c = costs.get(r["name"]) or (student_cost if r["group"] == "student" else fused_cost)
        r["params"], r["latency_ms"] = c["params"], c["latency_ms"]


def _write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(result))
    plot(result, out / "results.png")
    logger.info("wrote %s, results.md and results.png", out / "results.json")


def _card_results(folder: Path, rows: list[dict], finetune: dict, cfg: BenchmarkConfig, lines: list[str]) -> None:
    """The fused student's model card gets its probe scores as model-index results and the
    benchmark's criteria lines (pass or fail) as a section of its text."""
    from huggingface_hub import EvalResult, ModelCard

    card = ModelCard.load(folder / "README.md")
    student = next(r for r in rows if r["name"] == "student of fused teacher")
    results = []
    for task, t in student["tasks"].items():
        kind, _, column = task.partition(":")
        metric = {"cer": "per"}.get(t["metric"], t["metric"])  # per | accuracy | eer (unseen speakers)
        head = {"ctc": "linear CTC", "verification": "linear embedding, cosine trials"}.get(kind, "linear")
        results.append(EvalResult(
            task_type={"ctc": "automatic-speech-recognition", "verification": "speaker-verification"}.get(
                kind, "audio-classification"),
            task_name=f"{column} probe (frozen encoder, weighted sum + {head} head)",
            # dataset_config per task: the hub groups results by task type and dataset, which
            # would merge the three classification tasks into one unnamed entry.
            dataset_type="mini-superb-espeak", dataset_name=f"mini SUPERB ({cfg.name}), test split",
            dataset_config=column, dataset_split="test", metric_type=metric, metric_name=f"{column} {metric}",
            metric_value=round(t["score"], 4)))
    card.data.eval_results = results
    card.data.model_name = f"mini SUPERB ({cfg.name}) student of the fused teacher"
    verdict = f"## Mini SUPERB ({cfg.name}) verdict"
    card.text = card.text.split(f"\n{verdict}\n")[0].rstrip() + f"\n\n{verdict}\n\n" + "\n".join(f"- {line}" for line in lines) + "\n"
    card.save(folder / "README.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mini_superb", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="benchmark config YAML (default: benchmarks/mini_superb/default.yaml)")
    parser.add_argument("--out", required=True, type=Path, help="results folder")
    parser.add_argument("--cache-dir", type=Path, help="corpus and trained upstreams (default: OUT/../mini_superb_cache)")
    parser.add_argument("--quick", action="store_true", help="tiny corpus and budgets: checks the pipeline, not the scores")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    parser.add_argument("--student-arch", choices=STUDENT_ARCHS,
                        help="the students' family (same as --set student.arch=ARCH): hubert (raw audio, conv front-end) "
                             "or wav2vec2_bert (log-mel Conformer; intermediate_size=128 matches the default 0.47M)")
    parser.add_argument("--sweep", action="store_true", help="also retention vs student size and vs steps (sweep.*)")
    parser.add_argument("--sweep-only", action="store_true", help="only the sweep, on top of the results already in OUT")
    parser.add_argument("--attempts", action="store_true",
                        help="only the attempts (attempts.variants) to move criterion (b), on top of the results in OUT")
    parser.add_argument("--threads", type=int, default=2, help="torch threads here and in every stage (1 on a busy machine)")
    parser.add_argument("--no-finetune", action="store_true")
    parser.add_argument("--no-supervised", action="store_true", help="skip the fit-teacher row")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    overrides = args.set + ([f"student.arch={args.student_arch}"] if args.student_arch else [])
    cfg = load_config(args.config, overrides, quick=args.quick)
    cache_dir = args.cache_dir or args.out.parent / "mini_superb_cache"
    if args.sweep_only or args.attempts:
        on_top(cfg, args.out, cache_dir, sweep=args.sweep_only, attempts=args.attempts)
        return 0
    run(cfg, args.out, cache_dir, finetune=not args.no_finetune, supervised=not args.no_supervised, sweep=args.sweep)
    return 0


if __name__ == "__main__":
    from benchmarks import run_main

    sys.exit(run_main(main, "python -m benchmarks.mini_superb"))
