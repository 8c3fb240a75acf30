"""Probe task types: what a probe predicts from which dataset column, and what it scored.

Labels: column `c` is read from `batch[c]` (make_eval_batches' extra columns) or `batch[c + "s"]`
("texts"/"labels"); `ProbeTask.from_batches` takes the vocabulary from the (capped) training
batches themselves, so nothing beyond what the probe trains on is ever read. A row without a value
for a task (None, an empty string, NaN) is left out of that task only and counted in its ProbeResult.

Kind "verification" (SUPERB ASV on unseen speakers, verification.py): the column names the
speaker; the vocabulary is every training speaker, of which the probe trains on the seen ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Optional

__all__ = ["ProbeTask", "ProbeResult", "is_missing", "KINDS"]

KINDS = ("ctc", "classification", "verification")


@dataclass
class ProbeTask:
    """What to predict: `kind` "ctc" | "classification" | "verification" from dataset `column`;
    `vocab`: the CTC symbols (blank is index 0 and not listed), the class names or the speakers."""

    kind: str
    column: str
    vocab: list[str]

    @property
    def name(self) -> str:
        """"kind:column", as the CLI's --probe-task spells it."""
        return f"{self.kind}:{self.column}"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ProbeTask: kind={self.kind!r}, expected one of {', '.join(KINDS)}")
        if not self.vocab:
            raise ValueError(f"ProbeTask: empty vocabulary for column {self.column!r}")
        self._index = {symbol: i for i, symbol in enumerate(self.vocab)}

    @classmethod
    def from_batches(cls, batches: Iterable[Mapping[str, Any]], kind: str, column: str) -> "ProbeTask":
        """Vocabulary from the labels of already materialised (training) batches: sorted characters
        (ctc) or sorted labels as str (classification). Only these batches are read, so the
        vocabulary costs nothing beyond the item cap the probe trains on. Verification: sorted
        speakers as str (the seen/unseen split needs the test labels too: run_probes makes it)."""
        values: list[Any] = []
        found, keys = False, set()
        for batch in batches:
            labels = _batch_labels(batch, column)
            if labels is None:
                keys.update(batch)
                continue
            found = True
            values.extend(v for v in labels if not is_missing(v))
        if not found:
            raise ValueError(f"ProbeTask: no {column!r} labels in the batches; keys: {', '.join(sorted(keys)) or 'none'}")
        if kind == "ctc":
            return cls(kind, column, sorted({ch for v in values for ch in str(v)}))
        return cls(kind, column, sorted({str(v) for v in values}))

    def encode(self, value: Any) -> list[int]:
        """CTC: symbol ids (1-based; characters outside the vocab dropped). Classification and
        verification: [class] or [-1]."""
        if self.kind == "ctc":
            return [self._index[ch] + 1 for ch in str(value) if ch in self._index]
        return [self._index.get(str(value), -1)]

    def labels_of(self, batch: Mapping[str, Any]) -> list[Any]:
        labels = _batch_labels(batch, self.column)
        if labels is None:
            raise KeyError(f"ProbeTask: batch has no {self.column!r} labels; keys: {', '.join(batch)}")
        return labels


def _batch_labels(batch: Mapping[str, Any], column: str) -> Optional[list[Any]]:
    # The column's own name first: a dataset may have both "speaker" and "speakers".
    for key in (column, column + "s"):
        if key in batch:
            return list(batch[key])
    return None


def is_missing(value: Any) -> bool:
    """No label: None, an empty or blank string (a CSV's empty cell), or NaN (pandas' empty cell)."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, float) and math.isnan(value)


@dataclass
class ProbeResult:
    """Dev `score` ("cer", "accuracy" or "eer"), mean loss of the last tenth of the steps, utterances
    used, and utterances left out of this task because they had no value for its column.

    Verification ("eer", lower is better): num_train counts the seen speakers' training utterances,
    num_dev the unseen speakers' test utterances; the speaker counts and trials are set, and
    `to_dict` adds "one_minus_eer", the higher-is-better score that means and retention use.
    """

    metric: str
    score: float
    train_loss: float
    steps: int
    num_train: int
    num_dev: int
    missing_train: int = 0
    missing_dev: int = 0
    seen_speakers: Optional[int] = None
    unseen_speakers: Optional[int] = None
    trials: Optional[int] = None
    target_trials: Optional[int] = None

    @property
    def lower_is_better(self) -> bool:
        return self.metric in ("cer", "eer")

    def to_dict(self) -> dict:
        # Fields of other kinds (None) are left out: classification / CTC rows stay as they were.
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if self.metric == "eer":
            out["one_minus_eer"] = 1.0 - self.score
        return {**out, "lower_is_better": self.lower_is_better}
