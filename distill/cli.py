"""`fusion-distill` / `python -m distill`: one subcommand per stage.

    fusion-distill recipes [ls]                  the recipes shipped in the package (RECIPE may name one)
    fusion-distill recipes cp NAME DEST          copy one out to edit (DEST: a .yaml path or a folder)
    fusion-distill inspect-teacher RECIPE
    fusion-distill compare-upstreams RECIPE [--max-utterances N] [--max-frames F] [--out DIR]
    fusion-distill cache-targets RECIPE --out DIR [--split SPLIT] [--teacher DIR] [--shard-size N] [--dtype float16|int8] [key=value ...]
      (accelerate launch --num_processes N -m distill cache-targets ...: N processes share the shards)
    fusion-distill verify-cache DIR
    fusion-distill fit-teacher RECIPE --out DIR [--task ctc|classification] [--column C] [--max-items N] [--device D]
    fusion-distill train RECIPE [--output-dir DIR] [--resume-from latest|DIR [--allow-recipe-change KEY[,KEY]] | --overwrite] [key=value ...]
    fusion-distill evaluate (RUN_DIR | STUDENT_DIR) [--checkpoint best|latest] [--teacher DIR] [--data DATA] [--no-probe] [--no-cost]
    fusion-distill export (RUN_DIR | STUDENT_DIR) OUT_DIR [--overwrite] [--onnx [--quantize int8] [--parity-data DATA]] [--push-to-hub REPO_ID]
"""

from __future__ import annotations

import argparse
import logging
import sys

from .runs import CHECKPOINT_CHOICES, is_run

__all__ = ["main"]


def _cmd_train(args: argparse.Namespace) -> None:
    from .config import load_recipe
    from .training.loop import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"training.output_dir={args.output_dir}")
    allow = [key.strip() for group in args.allow_recipe_change or [] for key in group.split(",") if key.strip()]
    export_dir = train(load_recipe(args.recipe, overrides), resume_from=args.resume_from, allow_recipe_change=allow,
                       overwrite=args.overwrite)
    if _is_main_process():
        print(f"\nStudent: {export_dir}\nLoad it with no custom code:\n"
              f"  from transformers import AutoModel\n  model = AutoModel.from_pretrained({str(export_dir)!r})")


def _cmd_export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from students.onnx import PARITY_FILE, require_onnx

    if args.quantize and not args.onnx:
        raise ValueError("--quantize int8 quantises the ONNX graph: add --onnx")
    if args.onnx:
        try:
            require_onnx()
        except ImportError as err:  # one line naming the extra, not a traceback
            raise SystemExit(f"fusion-distill export: error: {err}") from None
    from .export import export_run, export_student_folder

    source = Path(args.run_dir)
    onnx = dict(onnx=args.onnx, quantize=args.quantize, parity_data=args.parity_data, overwrite=args.overwrite)
    if not is_run(source) and (source / "config.json").is_file():
        if not args.onnx:
            raise ValueError(f"{source} is already an exported student; add --onnx to give it ONNX graphs")
        folder = export_student_folder(source, args.out_dir, push_to_hub_id=args.push_to_hub, **onnx)
    else:
        folder = export_run(args.run_dir, args.out_dir, push_to_hub_id=args.push_to_hub, **onnx)
    print(f"exported {folder}" + (f" and pushed to {args.push_to_hub}" if args.push_to_hub else ""))
    if args.onnx:
        import json

        for report in json.loads((folder / PARITY_FILE).read_text()).values():
            print(f"{report['file']}: max abs {report['max_abs']:.2e}, mean cosine {report['mean_cosine']:.5f} "
                  f"vs PyTorch ({len(report['lengths'])} utterances, {report['source']})"
                  + ("" if report["passed"] else f"; below the int8 cosine bar {report['min_cosine']:g}"))


def _cmd_inspect_teacher(args: argparse.Namespace) -> None:
    from .config import load_recipe
    from .inspect import inspect_teacher

    print(inspect_teacher(load_recipe(args.recipe, args.overrides), seconds=args.seconds, fit_pca=args.fit_pca))


def _cmd_compare_upstreams(args: argparse.Namespace) -> None:
    from .complementarity import compare_upstreams, format_complementarity
    from .config import load_recipe

    print(format_complementarity(compare_upstreams(load_recipe(args.recipe, args.overrides), args.out,
                                                   args.max_utterances, args.max_frames)))


def _cmd_cache_targets(args: argparse.Namespace) -> None:
    from teachers import FusedTeacher

    from .cache.writer import cache_targets
    from .config import load_recipe

    cfg = load_recipe(args.recipe, args.overrides)
    teacher = FusedTeacher.from_pretrained(args.teacher) if args.teacher else None
    folder = cache_targets(cfg, args.out, shard_size=args.shard_size, teacher=teacher, batch_size=args.batch_size,
                           split=args.split, dtype=args.dtype)
    if not _is_main_process():  # under accelerate launch every rank returns here; one prints
        return
    if args.split and args.split != cfg.data.train_split_name:
        print(f"{args.split} targets cached in {folder}\nevaluate on them while training: fusion-distill train {args.recipe} "
              f"data.eval_split_name={args.split} data.eval_targets_cache={folder} training.eval_steps=N")
    else:
        print(f"targets cached in {folder}\ntrain from them: fusion-distill train {args.recipe} data.targets_cache={folder}")


def _cmd_verify_cache(args: argparse.Namespace) -> None:
    from .cache.writer import TargetCache

    cache = TargetCache.open(args.cache)
    size = cache.verify(progress=True)
    print(f"{args.cache}: {len(cache.manifest['shards'])} shards, {size / 1e9:.2f} GB, {len(cache)} utterances "
          f"({cache.dtype}): every sha256 matches the manifest")


def _cmd_fit_teacher(args: argparse.Namespace) -> None:
    from .config import load_recipe
    from .fit_teacher import fit_teacher

    cfg = load_recipe(args.recipe, args.overrides)
    result = fit_teacher(cfg, args.out, task_kind=args.task, column=args.column, steps=args.steps,
                         compare_single=not args.no_compare, max_items=args.max_items or None,
                         max_dev_items=args.max_dev_items or None, device=args.device)
    print(result["table"])
    print(f"fitted teacher saved to {args.out}; use it with teacher.projection_fit=supervised teacher.pretrained={args.out}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluation.suite import DEFAULT_PROBE_TASKS, evaluate, format_report

    result = evaluate(
        args.target, teacher=args.teacher, data=args.data, out_dir=args.out_dir,
        probe_tasks=args.probe_task or DEFAULT_PROBE_TASKS, probe_steps=args.probe_steps,
        max_items=args.max_items or None, probe=not args.no_probe, cost=not args.no_cost,
        cost_seconds=args.cost_seconds, cost_repeats=args.cost_repeats, batch_size=args.batch_size,
        overrides=args.overrides, device=args.device, checkpoint=args.checkpoint,
    )
    print(format_report(result))


def _cmd_recipes(args: argparse.Namespace) -> None:
    import shutil
    from pathlib import Path

    from .shipped import recipe_names, recipe_summary, recipes_dir

    names = recipe_names()
    if args.recipes_command != "cp":
        width = max(map(len, names), default=0)
        print("\n".join(f"{name:<{width}}  {recipe_summary(name)}" for name in names))
        print(f"\n(in {recipes_dir()}) train one: fusion-distill train NAME; copy one to edit: fusion-distill recipes cp NAME DEST")
        return
    if args.name not in names:
        raise FileNotFoundError(f"no shipped recipe {args.name!r}; shipped: {', '.join(names)}")
    dest = Path(args.dest)
    dest = dest / f"{args.name}.yaml" if dest.is_dir() else dest
    if dest.exists():
        raise FileExistsError(f"{dest}: already exists; pick another name or remove it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(recipes_dir() / f"{args.name}.yaml", dest)
    print(f"copied recipe {args.name} to {dest}; edit it, then: fusion-distill train {dest}")


def _version() -> str:
    from . import __version__

    return f"fusion-distill {__version__}"


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion-distill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("recipes", help="list the shipped recipes, or copy one out to edit (like `tune ls` / `tune cp`)")
    actions = p.add_subparsers(dest="recipes_command")
    actions.add_parser("ls", help="list them (the default)")
    cp = actions.add_parser("cp", help="copy one out: fusion-distill recipes cp demo my_recipe.yaml")
    cp.add_argument("name", help="a shipped recipe's name (see `fusion-distill recipes`)")
    cp.add_argument("dest", help="a .yaml path, or a folder to copy NAME.yaml into; never overwritten")
    p.set_defaults(func=_cmd_recipes)

    p = sub.add_parser("train", help="distil the recipe's fused teacher into its student")
    p.add_argument("recipe", help="a recipe YAML, or the name of a shipped one (demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.max_steps=200")
    p.add_argument("--output-dir", help="run folder (overrides training.output_dir)")
    p.add_argument("--resume-from", help="'latest' or a checkpoint folder")
    p.add_argument("--allow-recipe-change", action="append", metavar="KEY[,KEY]",
                   help="with --resume-from: accept these changed recipe keys (e.g. training.learning_rate); the run is then not reproducible")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a folder that holds a run: delete its "
                   "checkpoints, logs, teacher and student first (without it such a folder is refused)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="write the run's student as a stock Hugging Face folder (and ONNX)")
    p.add_argument("run_dir", help="a run folder, or an exported student folder (with --onnx)")
    p.add_argument("out_dir", help="the folder to write (may be the student folder itself with --onnx)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the folder to this Hub repo")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR even when it holds something other than "
                   "a previous export (a previous export is always replaced whole)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx, checked against PyTorch "
                   '(needs pip install -e ".[onnx]")')
    p.add_argument("--quantize", choices=("int8",), help="also write model_int8.onnx (ONNX Runtime dynamic int8)")
    p.add_argument("--parity-data", metavar="DATA", help="audio for the parity check: a folder, manifest or hub "
                   "dataset (default: the run's dataset; synthetic signals when there is none)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("cache-targets", help="run the teacher once over the training split and store its targets")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", required=True, help="cache folder (rerun to resume or repair it)")
    p.add_argument("--shard-size", type=int, default=256, help="dataset rows per shard")
    p.add_argument("--batch-size", type=int, default=8, help="utterances per teacher forward")
    p.add_argument("--split", help="split to cache (default: data.train_split_name); the eval split feeds data.eval_targets_cache")
    p.add_argument("--teacher", help="a saved fused teacher to use (e.g. the train cache's teacher/), so both caches share it")
    p.add_argument("--dtype", choices=("float16", "int8"),
                   help="target storage (default: data.targets_cache_dtype); int8 = per-frame absmax scale, about half the disk")
    p.set_defaults(func=_cmd_cache_targets)

    p = sub.add_parser("verify-cache", help="hash every shard of a target cache against its manifest")
    p.add_argument("cache", help="a cache-targets folder")
    p.set_defaults(func=_cmd_verify_cache)

    p = sub.add_parser("fit-teacher", help="fit projection + interface on labels with frozen upstreams")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", required=True, help="folder for the fitted teacher and fit_report.json")
    p.add_argument("--task", choices=("ctc", "classification"), default="ctc")
    p.add_argument("--column", help="label column (default: the recipe's data.text_column_name for ctc, "
                   "data.label_column_name for classification; any other, e.g. phonemes, is read under the canonical name text/label)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--no-compare", action="store_true", help="skip the single-upstream rows")
    p.add_argument("--max-items", type=int, default=1000,
                   help="train utterances read (0: all); their frozen features are held in RAM, ~4 MB per second "
                   "of audio for two base-size upstreams")
    p.add_argument("--max-dev-items", type=int, default=200, help="dev utterances read (0: all)")
    p.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    p.set_defaults(func=_cmd_fit_teacher)

    p = sub.add_parser("evaluate", help="student vs fused teacher: prediction similarity, probes, cost")
    p.add_argument("target", help="a run folder (train --output-dir) or an exported student folder")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. data.eval_split_name=dev")
    p.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES,
                   help="which checkpoint of a run folder to score: best (default: the one the exported student came "
                   "from, i.e. the best eval checkpoint when the run recorded one, else the newest) or latest (the newest)")
    p.add_argument("--teacher", help="a saved FusedTeacher folder (default: RUN/teacher)")
    p.add_argument("--data", help="dataset to evaluate on (replaces data.dataset_name)")
    p.add_argument("--out-dir", help="default: RUN/eval (STUDENT_DIR-eval for an exported folder)")
    p.add_argument("--probe-task", action="append", metavar="KIND:COLUMN",
                   help="ctc, classification or verification on any dataset column, e.g. classification:speaker "
                   "ctc:phonemes verification:speaker (speaker verification on unseen speakers, EER); "
                   "repeatable; default: ctc:text and classification:label")
    p.add_argument("--probe-steps", type=int, default=200, help="training steps of every probe head")
    p.add_argument("--max-items", type=int, default=200, help="utterances read per split (0: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-probe", action="store_true", help="skip the probes")
    p.add_argument("--no-cost", action="store_true", help="skip the cost table")
    p.add_argument("--cost-seconds", type=float, default=10.0, help="audio length of the costed forward")
    p.add_argument("--cost-repeats", type=int, default=3, help="timed forwards per model (median reported)")
    p.add_argument("--device", help="cuda | cpu (default: cuda when available); cost always runs on the CPU")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("inspect-teacher", help="build the teacher and print its shapes, sizes and speed")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--seconds", type=float, default=10.0, help="audio length of the timed forward")
    p.add_argument("--fit-pca", action="store_true",
                   help="fit the PCA projection on the training audio and show how much of each upstream it keeps")
    p.set_defaults(func=_cmd_inspect_teacher)

    p = sub.add_parser("compare-upstreams", help="which upstreams are worth fusing: layer CKA and cross-predictability per pair")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--max-utterances", type=int, default=200, help="training utterances read (the seeded sample PCA uses)")
    p.add_argument("--max-frames", type=int, default=20000, help="frames sampled for CKA and ridge (at most 1 GB)")
    p.add_argument("--out", help="report folder (default: training.output_dir/complementarity)")
    p.set_defaults(func=_cmd_compare_upstreams)
    # On every subcommand, never in a recipe: a recipe must not opt itself into running code.
    for p in sub.choices.values():
        p.add_argument("--trust-upstream-code", action="store_true",
                       help="allow upstream specs {code: 'pkg.module:factory'} that import and run your Python code")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may also follow options (`train R --output-dir D a.b=1`), which argparse's
    # positional matching alone rejects: collect the leftover key=value words here.
    args, extra = parser.parse_known_args(argv)
    stray = [word for word in extra if word.startswith("-") or "=" not in word]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # Accelerate logs every file of every checkpoint at INFO
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    if args.trust_upstream_code:
        from teachers import trust_upstream_code

        trust_upstream_code()
    try:
        args.func(args)
    except (ValueError, OSError) as err:  # FileNotFoundError is an OSError
        # Errors we raise are one line naming the file/field; show that, not a traceback.
        if args.verbose:
            raise
        print(f"fusion-distill {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
