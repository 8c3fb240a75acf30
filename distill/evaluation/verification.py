"""Speaker verification on unseen speakers (SUPERB ASV): the speaker split, the trials and the EER.

Label-only helpers, so a caller can refuse an unusable task before extracting anything:
- `split_speakers`: which speakers the head may train on (seen) and which make the trials (unseen).
  Speakers that appear only in the training batches are seen, only in the test batches unseen;
  a speaker in both is unseen when its position among all speakers (sorted) is odd: every other
  one, deterministic, no seed, the same for every model probed, and a speaker's side does not
  change when a test cap leaves out some other speaker.
- `score_trials`: every pair of test utterances of unseen speakers, scored by the cosine of their
  embeddings; each of the target and non-target sets is capped by a seeded sample (the EER is a
  pair of per-class rates, so capping one class does not bias it).
- `equal_error_rate`: exact on the empirical curve, see its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .tasks import is_missing

__all__ = ["SpeakerSplit", "split_speakers", "score_trials", "equal_error_rate", "MAX_TRIALS"]

MAX_TRIALS = 200_000  # per class (target / non-target); all pairs of 630 utterances fit


@dataclass(frozen=True)
class SpeakerSplit:
    seen: list[str]  # sorted; the head's classes
    unseen: list[str]  # sorted; the trials' speakers


def split_speakers(train_labels: Sequence[Any], test_labels: Sequence[Any], name: str = "verification") -> SpeakerSplit:
    """Seen and unseen speakers from the label values (missing ones ignored); ValueError (one line)
    when fewer than 2 seen speakers have training utterances or fewer than 2 unseen ones have test
    utterances, or when no unseen speaker has 2 test utterances (no same-speaker trial)."""
    train = {str(v) for v in train_labels if not is_missing(v)}
    test_counts: dict[str, int] = {}
    for v in test_labels:
        if not is_missing(v):
            test_counts[str(v)] = test_counts.get(str(v), 0) + 1
    everyone = sorted(train | test_counts.keys())
    held_out = {s for i, s in enumerate(everyone) if i % 2 and s in test_counts} | (test_counts.keys() - train)
    seen, unseen = sorted(train - held_out), sorted(held_out)
    if len(seen) < 2 or len(unseen) < 2:
        raise ValueError(f"{name}: {len(seen)} seen speakers with training utterances and {len(unseen)} unseen speakers "
                         f"with test utterances; need at least 2 of each ({len(train)} training, {len(test_counts)} "
                         "test speakers; one in both splits is unseen at an odd place in sorted order)")
    if all(test_counts[s] < 2 for s in unseen):
        raise ValueError(f"{name}: no unseen speaker has 2 test utterances, so there is no same-speaker trial")
    return SpeakerSplit(seen, unseen)


def score_trials(embeddings: torch.Tensor, speakers: Sequence[str], seed: int = 0,
                 max_trials: int = MAX_TRIALS) -> tuple[torch.Tensor, torch.Tensor]:
    """(target scores, non-target scores): cosine of every pair i < j of `embeddings` (N, E),
    same speaker or not, each set capped at `max_trials` by a seeded sample."""
    unit = F.normalize(embeddings.double(), dim=-1)
    first, second = torch.triu_indices(len(speakers), len(speakers), offset=1)
    ids = torch.tensor([{s: i for i, s in enumerate(sorted(set(speakers)))}[s] for s in speakers])
    scores = (unit[first] * unit[second]).sum(-1)
    same = ids[first] == ids[second]
    generator = torch.Generator().manual_seed(seed)
    capped = []
    for part in (scores[same], scores[~same]):
        if len(part) > max_trials:
            part = part[torch.randperm(len(part), generator=generator)[:max_trials]]
        capped.append(part)
    return capped[0], capped[1]


def equal_error_rate(target: Sequence[float] | np.ndarray | torch.Tensor,
                     nontarget: Sequence[float] | np.ndarray | torch.Tensor) -> float:
    """The EER of target (same-speaker) and non-target scores, higher score = more alike.

    Every distinct score is a threshold t (accept when score >= t), plus one above them all; each
    gives an operating point (FAR = share of non-targets accepted, FRR = share of targets
    rejected). Ordered by threshold, FRR - FAR rises from -1 to +1; the EER is where the straight
    line through consecutive operating points crosses FAR = FRR (tied scores form one threshold:
    all scores equal gives 0.5). Separable scores give 0, reversed ones 1.
    """
    t = np.asarray(target, dtype=np.float64).ravel()
    n = np.asarray(nontarget, dtype=np.float64).ravel()
    if not len(t) or not len(n) or not (np.isfinite(t).all() and np.isfinite(n).all()):
        raise ValueError(f"equal_error_rate: {len(t)} target and {len(n)} non-target scores; need finite scores of both")
    values, inverse = np.unique(np.concatenate([t, n]), return_inverse=True)
    per_target = np.bincount(inverse[: len(t)], minlength=len(values))
    per_nontarget = np.bincount(inverse[len(t):], minlength=len(values))
    # Threshold k accepts values[k:]: rejected targets are those below it.
    frr = np.concatenate([[0.0], np.cumsum(per_target)]) / len(t)
    far = 1.0 - np.concatenate([[0.0], np.cumsum(per_nontarget)]) / len(n)
    diff = frr - far
    j = int(np.argmax(diff >= 0))  # the last point has diff = +1, so one exists
    if diff[j] == 0 or j == 0:
        return float(frr[j])
    alpha = -diff[j - 1] / (diff[j] - diff[j - 1])
    return float(frr[j - 1] + alpha * (frr[j] - frr[j - 1]))
