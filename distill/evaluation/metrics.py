"""Error rates for the CTC probes: Levenshtein distance over symbols, corpus-level rate."""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["ctc_greedy", "edit_distance", "error_rate"]


def edit_distance(reference: Sequence[Any], hypothesis: Sequence[Any]) -> int:
    """Levenshtein distance; substitutions, insertions and deletions all cost 1."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        current = [i]
        for j, hyp in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


def error_rate(references: Sequence[Sequence[Any]], hypotheses: Sequence[Sequence[Any]]) -> float:
    """Corpus error rate: total edit distance / total reference length (CER on characters)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"error_rate: {len(references)} references vs {len(hypotheses)} hypotheses")
    errors, total = sum(edit_distance(r, h) for r, h in zip(references, hypotheses)), sum(map(len, references))
    return errors / total if total else float(errors > 0)


def ctc_greedy(best_path: Sequence[int], blank: int = 0) -> list[int]:
    """Greedy CTC decoding of one utterance's frame-wise best symbols: merge repeats, drop blanks."""
    return [s for i, s in enumerate(best_path) if s != blank and (i == 0 or s != best_path[i - 1])]
