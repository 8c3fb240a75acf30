"""`fusion-distill` / `python -m distill`: one subcommand per stage.

    fusion-distill inspect-teacher RECIPE
    fusion-distill train RECIPE [--output-dir DIR] [--resume-from latest|DIR] [key=value ...]
    fusion-distill export RUN_DIR OUT_DIR [--push-to-hub REPO_ID]
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _cmd_train(args: argparse.Namespace) -> None:
    from .config import load_recipe
    from .train import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"training.output_dir={args.output_dir}")
    export_dir = train(load_recipe(args.recipe, overrides), resume_from=args.resume_from)
    if _is_main_process():
        print(f"\nStudent: {export_dir}\nLoad it with no custom code:\n"
              f"  from transformers import AutoModel\n  model = AutoModel.from_pretrained({str(export_dir)!r})")


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import export_run

    folder = export_run(args.run_dir, args.out_dir, push_to_hub_id=args.push_to_hub)
    print(f"exported {folder}" + (f" and pushed to {args.push_to_hub}" if args.push_to_hub else ""))


def _cmd_inspect_teacher(args: argparse.Namespace) -> None:
    from .config import load_recipe
    from .inspect import inspect_teacher

    print(inspect_teacher(load_recipe(args.recipe, args.overrides), seconds=args.seconds))


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion-distill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="distil the recipe's fused teacher into its student")
    p.add_argument("recipe", help="a recipe YAML, or the name of a shipped one (demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.max_steps=200")
    p.add_argument("--output-dir", help="run folder (overrides training.output_dir)")
    p.add_argument("--resume-from", help="'latest' or a checkpoint folder")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="write the run's student as a stock Hugging Face folder")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the folder to this Hub repo")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("inspect-teacher", help="build the teacher and print its shapes, sizes and speed")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--seconds", type=float, default=10.0, help="audio length of the timed forward")
    p.set_defaults(func=_cmd_inspect_teacher)
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
    try:
        args.func(args)
    except (ValueError, OSError) as err:  # FileNotFoundError is an OSError
        # Errors we raise are one line naming the file/field; show that, not a traceback.
        if args.verbose:
            raise
        print(f"fusion-distill {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
