"""Does `compare-upstreams` pick the upstreams worth fusing? A check on the mini benchmark.

    python -m benchmarks.mini_superb.complementarity --out benchmarks/mini_superb/results/complementarity \\
        --cache-dir runs/mini_superb_cache --threads 1

Three upstreams: the benchmark's two (content = phoneme-CTC HuBERT, speaker = speaker-ID WavLM,
from its cache, trained there when missing) and a third that duplicates a skill: the content
upstream's config trained again with another seed (`content-seed1`, cached beside the others).
1. The report (distill.complementarity.complementarity_of) over `--max-utterances` training
   utterances, the three upstreams aligned and normalised as the benchmark's fused teacher does.
2. Probes of every subset of the three upstreams, fused without any fitting: the aligned,
   normalised concatenation + weighted sum over layers (the benchmark's "fused: concat + WS" view;
   a single upstream is its "upstream: NAME" row). Same data, budget and heads as the benchmark
   (stages.probe).
3. The checks, fixed before the run:
   (i)  the report says content-seed1 adds little (adds beyond < teachers.complementarity.LITTLE),
        predictable from content, and ranks content + speaker as the most complementary pair;
   (ii) all three fused gain over content + speaker by no more than the standard error of
        content + speaker's mean score, while content + speaker gains over the better of the two
        alone by more than twice the standard error of that difference;
   and the Spearman rank correlation between the report's figures and the probe gains: per pair
   (complementarity vs gain over the better single member) and per direction (what B adds beyond
   A vs the gain of A + B over A alone).
Mean scores average the four tasks (accuracy, or 1 - PER); their standard errors combine the
per-task binomial ones (stages._with_error) as independent; a difference's as independent too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from distill.build import pca_waveforms
from distill.complementarity import complementarity_of, format_complementarity, write_report
from distill.data import load_audio_dataset
from distill.evaluation.extractors import teacher_extractor
from teachers import FusedTeacher
from teachers.complementarity import LITTLE

from .__main__ import prepare
from .config import BenchmarkConfig, load_config
from .stages import corpus_data_config, probe, probe_data
from .upstreams import train_upstream, upstream_folder

logger = logging.getLogger("mini_superb.complementarity")
REDUNDANT = "content-seed1"  # the content upstream's config, trained with seed 1


def upstreams(cfg: BenchmarkConfig, cache_dir: Path) -> tuple[Path, dict[str, Path], dict]:
    """The corpus and the three upstream folders (content, speaker, content-seed1), trained when missing."""
    corpus, corpus_info, reports, sources = prepare(cfg, cache_dir)
    folder = upstream_folder(cache_dir / "upstreams", REDUNDANT, cfg.upstreams["content"], corpus_info["hash"])
    reports[REDUNDANT] = train_upstream(REDUNDANT, cfg.upstreams["content"], corpus, folder, seed=1)
    return corpus, {"content": sources["content"][0], "speaker": sources["speaker"][0], REDUNDANT: folder}, reports


def run(cfg: BenchmarkConfig, out: Path, cache_dir: Path, max_utterances: int) -> dict:
    timings, start = {}, time.perf_counter()
    corpus, folders, reports = upstreams(cfg, cache_dir)
    names = list(folders)
    timings["upstreams_min"] = round((time.perf_counter() - start) / 60, 2)
    t = cfg.teacher
    teacher = FusedTeacher.from_config({"upstreams": [str(f) for f in folders.values()], "fusion": t.fusion,
                                        "projection_dim": t.projection_dim, "target_layers": list(t.target_layers),
                                        "projection_balance": t.projection_balance}, progress=lambda *_: None)

    clock = time.perf_counter()
    data_cfg = corpus_data_config(cfg, corpus)
    train = load_audio_dataset(data_cfg, "train").shuffle(seed=0)
    report = complementarity_of(teacher, pca_waveforms(train, max_utterances, 16000, teacher.min_samples), names=names)
    summary = write_report(report, out, seconds=round(time.perf_counter() - clock, 1))
    print(format_complementarity(summary))
    # How much the report itself moves: the same on another sample of utterances and frames.
    other = load_audio_dataset(data_cfg, "train").shuffle(seed=1)
    again = complementarity_of(teacher, pca_waveforms(other, max_utterances, 16000, teacher.min_samples), names=names, seed=1)
    resample = {"pairs": {f"{p.a} + {p.b}": p.complementarity for p in again.pairs},
                "adds_beyond": {u.name: u.adds_beyond for u in again.upstreams}}
    timings["report_min"] = round((time.perf_counter() - clock) / 60, 2)

    clock = time.perf_counter()
    probes_file = out / "probes.json"
    probes = json.loads(probes_file.read_text()) if probes_file.exists() else {}
    data = probe_data(cfg, corpus, teacher.min_samples)
    for subset in subsets(names):
        key = " + ".join(subset)
        if key in probes:  # a rerun reuses finished rows
            continue
        members = [names.index(n) for n in subset]
        view = FusedTeacher([teacher.upstreams[i] for i in members], specs=[teacher.specs[i] for i in members],
                            fusion="weighted_sum", projection_dim=None, projection_fit="none", target_mode="concat")
        probes[key] = probe(key, teacher_extractor(view, project=False), "weighted_sum", data, cfg)
        probes_file.write_text(json.dumps(probes, indent=2) + "\n")
    timings["probe_min"] = round((time.perf_counter() - clock) / 60, 2)

    verdict = analyse(summary, probes, names)
    result = {"upstreams": {n: {"folder": str(folders[n]), **{k: reports[n][k] for k in ("task", "dev_metric", "dev_score", "steps")}}
                            for n in names},
              "max_utterances": max_utterances, "probe": {"view": "aligned, normalised concatenation + weighted sum",
                                                          **vars(cfg.probe)},
              **verdict, "report_on_another_sample": resample, "timings": timings}
    (out / "validation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "validation.md").write_text(markdown(summary, probes, result))
    for line in result["lines"]:
        print(line)
    return result


def subsets(names: list[str]) -> list[tuple[str, ...]]:
    return [s for k in range(1, len(names) + 1) for s in itertools.combinations(names, k)]


def mean_score(row: dict) -> tuple[float, float]:
    """Mean task value and its standard error (tasks as independent)."""
    values, errors = [t["value"] for t in row.values()], [t["stderr"] for t in row.values()]
    return float(np.mean(values)), math.sqrt(sum(e * e for e in errors)) / len(errors)


def analyse(report: dict, probes: dict, names: list[str]) -> dict:
    score = {k: mean_score(v) for k, v in probes.items()}
    content, speaker = names[0], names[1]

    def key(*members: str) -> str:  # probes are keyed in the order of `names`
        return " + ".join(n for n in names if n in members)

    def gain(fused: str, base: str) -> tuple[float, float]:
        return score[fused][0] - score[base][0], math.hypot(score[fused][1], score[base][1])

    rows = {u["name"]: u for u in report["upstreams"]}
    top = report["pairs"][0]
    redundant = rows[REDUNDANT]
    check_i = (redundant["adds_beyond"] < LITTLE and redundant["predictable_from"] == content
               and {top["a"], top["b"]} == {content, speaker})
    pair, triple = key(content, speaker), key(*names)
    triple_gain, triple_se = gain(triple, pair)
    best_single = max((key(content), key(speaker)), key=lambda k: score[k][0])
    pair_gain, pair_se = gain(pair, best_single)
    check_ii = triple_gain <= score[pair][1] and pair_gain > 2 * pair_se

    pair_points, directed_points = [], []
    for p in report["pairs"]:
        fused = key(p["a"], p["b"])
        better = max((key(p["a"]), key(p["b"])), key=lambda k: score[k][0])
        pair_points.append({"pair": fused, "complementarity": p["complementarity"], "probe_gain": gain(fused, better)[0],
                            "gain_stderr": gain(fused, better)[1], "over": better})
        for base, added, adds in ((p["a"], p["b"], 1 - p["b_from_a"]), (p["b"], p["a"], 1 - p["a_from_b"])):
            directed_points.append({"base": base, "added": added, "adds_beyond": adds,
                                    "probe_gain": gain(fused, key(base))[0], "gain_stderr": gain(fused, key(base))[1]})
    rho_pairs = spearman([q["complementarity"] for q in pair_points], [q["probe_gain"] for q in pair_points])
    rho_directed = spearman([q["adds_beyond"] for q in directed_points], [q["probe_gain"] for q in directed_points])
    lines = [
        f"{'PASS' if check_i else 'FAIL'} (i) {redundant['sentence']}; most complementary pair: {top['a']} + {top['b']} "
        f"(complementarity {top['complementarity']:.3f})",
        f"{'PASS' if check_ii else 'FAIL'} (ii) all three vs content + speaker: {triple_gain:+.3f} (stderr of content + "
        f"speaker's mean {score[pair][1]:.3f}); content + speaker vs {best_single}: {pair_gain:+.3f} "
        f"(> 2 x {pair_se:.3f} needed)",
        f"Spearman rank correlation, report vs probe gain: per pair {rho_pairs:+.2f} (n={len(pair_points)}), "
        f"per direction {rho_directed:+.2f} (n={len(directed_points)})",
    ]
    return {"criteria": {"i_report_flags_redundant_and_ranks_pair": check_i, "ii_probe_gains_agree": check_ii},
            "gains": {"all_three_over_content_speaker": [triple_gain, triple_se],
                      "content_speaker_over_best_single": [pair_gain, pair_se], "best_single": best_single},
            "mean_scores": {k: list(v) for k, v in score.items()}, "pairs": pair_points, "directed": directed_points,
            "spearman": {"per_pair": rho_pairs, "per_direction": rho_directed}, "lines": lines}


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: Pearson correlation of the ranks (ties get their mean rank)."""
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: list[float]) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values), dtype=float)
    for v in np.unique(values):
        ranks[values == v] = ranks[values == v].mean()
    return ranks


def markdown(report: dict, probes: dict, result: dict) -> str:
    tasks = list(next(iter(probes.values())))
    head = ["fused upstreams (concat + WS)", *(t.split(":")[1] for t in tasks), "mean"]
    p = result["probe"]
    ups = ", ".join(f"{n} ({u['task']}, dev {u['dev_metric']} {u['dev_score']:.3f})" for n, u in result["upstreams"].items())
    lines = ["# compare-upstreams on the mini benchmark", "",
             f"Upstreams: {ups}. The report read {result['max_utterances']} training utterances. Probes: every subset "
             f"of the upstreams as the {p['view']} (no fitting), {p['steps']} steps, {p['train_items']} training and up "
             f"to {p['test_items']} test utterances, scores ± binomial standard errors over test utterances. Made by "
             "`python -m benchmarks.mini_superb.complementarity` (benchmarks/mini_superb/complementarity.py says what "
             "each check means).", "",
             "## Probe scores of every subset", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in probes.items():
        mean, se = result["mean_scores"][name]
        cells = [f"{row[t]['value']:.3f} ± {row[t]['stderr']:.3f}" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.3f} ± {se:.3f} |")
    lines += ["", "## The report (compare-upstreams)", "", "| pair (a, b) | best CKA (layers) | b from a (R²) | "
              "a from b (R²) | complementarity | probe gain over the better one |", "|---|---|---|---|---|---|"]
    for p, q in zip(report["pairs"], result["pairs"]):  # the same order: analyse walks report["pairs"]
        lines.append(f"| {p['a']}, {p['b']} | {p['best_cka']:.3f} ({p['best_cka_layers'][0]}, {p['best_cka_layers'][1]}) | "
                     f"{p['b_from_a']:.3f} | {p['a_from_b']:.3f} | {p['complementarity']:.3f} | "
                     f"{q['probe_gain']:+.3f} ± {q['gain_stderr']:.3f} (over {q['over']}) |")
    lines += ["", "| upstream added | to | adds beyond (1 - R²) | probe gain of the pair over the base |", "|---|---|---|---|"]
    for d in result["directed"]:
        lines.append(f"| {d['added']} | {d['base']} | {d['adds_beyond']:.3f} | {d['probe_gain']:+.3f} ± {d['gain_stderr']:.3f} |")
    again = result["report_on_another_sample"]
    lines += ["", f"The report on another {result['max_utterances']} utterances (shuffle seed 1, frame-sample seed 1): "
              "complementarity " + ", ".join(f"{k} {v:.3f}" for k, v in again["pairs"].items()) + "; adds beyond "
              + ", ".join(f"{k} {v:.3f}" for k, v in again["adds_beyond"].items()) + "."]
    lines += ["", *(f"- {u['sentence']}" for u in report["upstreams"]), "", *(f"    {line}" for line in result["lines"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mini_superb.complementarity",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="benchmark config YAML (default: default.yaml)")
    parser.add_argument("--out", required=True, type=Path, help="results folder")
    parser.add_argument("--cache-dir", required=True, type=Path, help="the benchmark's corpus and upstream cache")
    parser.add_argument("--max-utterances", type=int, default=200, help="training utterances the report reads")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    parser.add_argument("--quick", action="store_true", help="the benchmark's tiny corpus and budgets: checks the path")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    run(load_config(args.config, args.set, quick=args.quick), args.out, args.cache_dir, args.max_utterances)
    return 0


if __name__ == "__main__":
    from benchmarks import run_main

    sys.exit(run_main(main, "python -m benchmarks.mini_superb.complementarity"))
