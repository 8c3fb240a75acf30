"""Teacher throughput on mixed-length audio: one at a time vs equal-length batches vs masked batches.

    python benchmarks/teacher_batching.py [--utterances 32] [--min-seconds 2] [--max-seconds 16]
                                          [--batch-size 8] [--repeats 3] [--threads 2]
                                          [--device cpu|cuda] [--dtype float32|bfloat16] [--json PATH] [--quick]

Real-size command (on a quiet machine, or a GPU with `--device cuda`):

    python benchmarks/teacher_batching.py --utterances 32 --batch-size 8 --repeats 3

The upstreams are `teachers.upstream.load_upstream` objects built from stock configs with random
weights (weights do not change the cost): WavLM Base+ geometry with a layer-norm conv front-end
(padding-invariant: masked batches), HuBERT Base (group norm: equal lengths only) and the Whisper
Small encoder (30 s windows, always batched). The utterances have lengths drawn uniformly from
[min, max] seconds, as `cache-targets` feeds them: sorted longest first and cut into
`batch_size` batches. Set-ups, per upstream:

- one at a time: every utterance is its own call;
- equal length: the batches as `cache-targets` forms them, but only equal lengths share a forward
  (the rule for every wav2vec-family model before masked batches);
- masked: the batches padded where the upstream allows it (`padding_invariant`: zero-padded with
  `attention_mask`; otherwise equal lengths only).

Whisper pads every window to 30 s anyway, so both batched set-ups run its windows together.

Repeats run the set-ups interleaved so they share the machine's load; the table shows medians,
the ratios come from one run, the padded share of the audio the masked set-up runs and the
largest difference of any hidden state from a run alone (shortest batch). Compare ratios, never
times across runs. `--quick` uses tiny configs and short audio (for tests; its numbers mean little).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from teachers.configs import real_config, tiny_config
from teachers.upstream import SAMPLING_RATE, Upstream, load_upstream

SETUPS = ("one at a time", "equal length", "masked")
# Real sizes (teachers/configs.py), and tiny ones with the same frame grids for --quick.
_LAYER_NORM = dict(feat_extract_norm="layer", do_stable_layer_norm=True)
REAL = {
    "WavLM Base+ (layer norm)": real_config("wavlm", **_LAYER_NORM),
    "HuBERT Base (group norm)": real_config("hubert"),
    "Whisper Small enc": real_config("whisper-small"),
}
TINY = {
    "WavLM Base+ (layer norm)": tiny_config("wavlm", **_LAYER_NORM),
    "HuBERT Base (group norm)": tiny_config("hubert"),
    "Whisper Small enc": tiny_config("whisper-small"),
}


def make_waves(n: int, min_seconds: float, max_seconds: float, seed: int = 0) -> list[torch.Tensor]:
    """`n` noise waveforms, lengths uniform in [min, max] seconds (sample-exact, so rarely equal)."""
    gen = torch.Generator().manual_seed(seed)
    seconds = min_seconds + (max_seconds - min_seconds) * torch.rand(n, generator=gen)
    return [0.1 * torch.randn(int(s * SAMPLING_RATE), generator=gen) for s in seconds.tolist()]


def cache_batches(waves: list[torch.Tensor], batch_size: int) -> list[list[torch.Tensor]]:
    """Longest first, cut into `batch_size` runs: the batches `cache-targets` gives the teacher."""
    ordered = sorted(waves, key=lambda w: -w.numel())
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def run_setup(up: Upstream, setup: str, batches: list[list[torch.Tensor]]) -> float:
    """Seconds to encode every batch under `setup`."""
    calls = [[w] for batch in batches for w in batch] if setup == "one at a time" else batches
    rule = getattr(up, "padded_batches", "n/a")
    if rule != "n/a":  # wav2vec family: the set-up decides whether it pads (where the model allows it)
        up.padded_batches = setup == "masked"
    try:
        _sync(up)
        start = time.perf_counter()
        for waves in calls:
            up(waves)
        _sync(up)
        return time.perf_counter() - start
    finally:
        if rule != "n/a":
            up.padded_batches = rule


def padded_share(up: Upstream, batches: list[list[torch.Tensor]]) -> float:
    """Share of the audio the masked set-up runs that is padding."""
    if not getattr(up, "padding_invariant", False):
        return 0.0
    real = padded = 0
    for batch in batches:
        lengths = [w.numel() for w in batch]
        for group in up._batches(lengths):
            real += sum(lengths[i] for i in group)
            padded += len(group) * lengths[group[0]]  # the first of a group is its longest
    return 1 - real / padded


def max_diff_alone(up: Upstream, batch: list[torch.Tensor]) -> float:
    """Largest |hidden state| difference between one batch and its items run alone."""
    together = up(batch)
    worst = 0.0
    for b, wave in enumerate(batch):
        alone = up([wave])
        n = int(alone.lengths[0])
        worst = max(worst, (together.hidden_states[:, b, :n] - alone.hidden_states[:, 0]).abs().max().item())
    return worst


def _sync(up: Upstream) -> None:
    if up.device.type == "cuda":
        torch.cuda.synchronize(up.device)


def measure(upstreams: dict[str, Upstream], batches: list[list[torch.Tensor]], repeats: int,
            on_round: Callable[[int], None] = lambda r: None) -> dict[str, dict[str, float]]:
    """Median seconds per upstream and set-up, the set-ups interleaved in every round."""
    times: dict[str, dict[str, list[float]]] = {name: {s: [] for s in SETUPS} for name in upstreams}
    for r in range(repeats):
        for name, up in upstreams.items():
            for setup in SETUPS:
                times[name][setup].append(run_setup(up, setup, batches))
        on_round(r)
    return {name: {s: statistics.median(v) for s, v in per.items()} for name, per in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--utterances", type=int, default=32)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--max-seconds", type=float, default=16.0)
    parser.add_argument("--batch-size", type=int, default=8, help="utterances per teacher call (cache-targets --batch-size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.utterances, args.min_seconds, args.max_seconds, args.batch_size, args.repeats = 8, 0.5, 2.0, 4, 2
    torch.set_num_threads(args.threads)
    configs = TINY if args.quick else REAL
    upstreams = {name: load_upstream({"config": cfg}, args.dtype).to(args.device) for name, cfg in configs.items()}
    waves = [w.to(args.device) for w in make_waves(args.utterances, args.min_seconds, args.max_seconds)]
    batches = cache_batches(waves, args.batch_size)
    for up in upstreams.values():  # warm-up: first calls allocate and pick kernels
        up(batches[-1][:2])
    medians = measure(upstreams, batches, args.repeats)
    audio_s = sum(w.numel() for w in waves) / SAMPLING_RATE
    result = {
        "utterances": len(waves), "audio_seconds": audio_s, "batch_size": args.batch_size, "repeats": args.repeats,
        "device": str(args.device), "dtype": args.dtype, "threads": args.threads, "seconds_median": medians,
        "padding_invariant": {n: getattr(u, "padding_invariant", None) for n, u in upstreams.items()},  # None: Whisper
        "padded_share": {n: padded_share(u, batches) for n, u in upstreams.items()},
        "max_diff_vs_alone": {n: max_diff_alone(u, batches[-1]) for n, u in upstreams.items()},
    }
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


def report(r: dict) -> None:
    n, audio = r["utterances"], r["audio_seconds"]
    print(f"{n} utterances, {audio:.0f} s of audio, batch {r['batch_size']}, {r['device']} {r['dtype']}, "
          f"{r['threads']} threads, median of {r['repeats']} interleaved rounds\n")
    print("| upstream | padding-invariant | " + " | ".join(f"{s} (utt/s, audio s/s)" for s in SETUPS)
          + " | masked / one at a time | masked / equal length | padded share | max diff vs alone |")
    print("|---" * (len(SETUPS) + 6) + "|")
    totals = {s: 0.0 for s in SETUPS}
    for name, per in r["seconds_median"].items():
        invariant = {True: "yes", False: "no", None: "n/a (30 s windows)"}[r["padding_invariant"][name]]
        cells = " | ".join(f"{n / per[s]:.2f}, {audio / per[s]:.1f}" for s in SETUPS)
        print(f"| {name} | {invariant} | {cells} | "
              f"{per['one at a time'] / per['masked']:.2f}x | {per['equal length'] / per['masked']:.2f}x | "
              f"{100 * r['padded_share'][name]:.1f}% | {r['max_diff_vs_alone'][name]:.1e} |")
        for s in SETUPS:
            totals[s] += per[s]
    cells = " | ".join(f"{n / totals[s]:.2f}, {audio / totals[s]:.1f}" for s in SETUPS)
    print(f"| all three (fused teacher) | | {cells} | {totals['one at a time'] / totals['masked']:.2f}x | "
          f"{totals['equal length'] / totals['masked']:.2f}x | | |")


if __name__ == "__main__":
    from benchmarks import run_main

    sys.exit(run_main(main, "python -m benchmarks.teacher_batching"))
