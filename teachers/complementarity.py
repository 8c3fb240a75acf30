"""Which upstreams are worth fusing: layer similarity (linear CKA) and cross-predictability (ridge R²)
between the aligned, normalised layers of every pair of upstreams.

The samples are frames, not utterances. A fused teacher's `features` (L, B, T, sum D_i) are fed
utterance by utterance into a `FrameSample`: a seeded reservoir of at most `max_frames` frames,
half from even-numbered utterances and half from odd ones, so memory is fixed by one number
(max_frames x L x sum D_i bfloat16 values) whatever the amount of audio. A reservoir rather than running
sums X^T Y: every pair needs all L x L layer blocks of X^T Y, which is O(L^2 D_a D_b) per pair
(about 0.4 GB per pair of base-size upstreams), whereas the sample's size does not grow with the
number of upstreams squared.

- Linear CKA (Kornblith et al. 2019) on centred frames, in feature space:
  ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F); 1 for the same features up to rotation and scale.
  Computed on both halves together, from their cross-products (never a concatenated copy). It is
  biased upwards when frames are few against the widths
  (about sqrt(D_a D_b) / frames for unrelated features).
- Cross-predictability: ridge regression from A's layer i to B's layer j, fitted on one half and
  scored on the other, then the other way round (two folds, squared errors pooled). R² is the
  share of B's layer variance (summed over features) that A's layer predicts on held-out
  utterances. The ridge is `ridge` times the mean variance of A's features.
- Summaries: "B from A" = the mean over B's layers of the best R² from any layer of A (at least
  0); what B adds beyond A = 1 - that. A pair's complementarity is the smaller of what each adds beyond
  the other: fusing A and B gains over either alone only when both add something.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Union

import numpy as np
import torch

Features = Union[torch.Tensor, Sequence[torch.Tensor]]  # (n, D), or parts (n_k, D) that together are the n frames

__all__ = ["FrameSample", "PairReport", "UpstreamReport", "ComplementarityReport", "linear_cka", "cross_cka",
           "ridge_r2", "compare", "sentence", "LITTLE", "MUCH"]

# What an upstream adds beyond the upstream that predicts it best: below LITTLE it "adds little",
# from MUCH on it "adds much"; in between "adds some". Sentence wording only; the numbers are in the JSON.
LITTLE, MUCH = 0.2, 0.5


class FrameSample:
    """A seeded uniform sample (reservoir) of at most `max_frames` rows of width `width`, in two
    halves by utterance parity: half 0 holds frames of even utterances, half 1 of odd ones.

    Rows are stored as `dtype`: bfloat16 by default, half the memory of float32 with its range
    (unnormalised features of large models can exceed float16's); its 3 significant digits add
    noise of about 1e-5 of a feature's variance, far below what the report rounds to. Every
    computation casts to float64."""

    def __init__(self, width: int, max_frames: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
        if max_frames < 4:
            raise ValueError(f"FrameSample: max_frames={max_frames}, need at least 4 (two per half)")
        self.width, self.capacity = int(width), max_frames // 2
        self.rows = [torch.empty(self.capacity, self.width, dtype=dtype) for _ in range(2)]
        self.seen = [0, 0]  # frames offered to each half
        self.utterances = 0
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def nbytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.rows)

    def add(self, frames: torch.Tensor) -> None:
        """One utterance's frames (T, width); utterances alternate between the halves."""
        if frames.dim() != 2 or frames.shape[1] != self.width:
            raise ValueError(f"FrameSample: got frames of shape {tuple(frames.shape)}, expected (T, {self.width})")
        half, frames = self.utterances % 2, frames.detach().to("cpu", self.rows[0].dtype)
        self.utterances += 1
        rows, seen, cap = self.rows[half], self.seen[half], self.capacity
        fill = min(max(cap - seen, 0), frames.shape[0])
        rows[seen: seen + fill] = frames[:fill]
        rest = frames[fill:]
        if len(rest):  # Algorithm R: frame number t replaces a random slot with probability cap / (t + 1)
            t = torch.arange(seen + fill, seen + fill + len(rest), dtype=torch.float64)
            slots = (torch.rand(len(rest), generator=self._generator, dtype=torch.float64) * (t + 1)).long()
            keep = (slots < cap).nonzero().flatten().numpy()[::-1].copy()  # newest first
            if keep.size:  # one slot drawn twice: the later frame wins, as in the sequential algorithm
                last = torch.from_numpy(keep[np.unique(slots.numpy()[keep], return_index=True)[1]])
                rows[slots[last]] = rest[last]
        self.seen[half] = seen + frames.shape[0]

    def halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampled rows of each half, (n_0, width) and (n_1, width)."""
        return tuple(r[: min(s, self.capacity)] for r, s in zip(self.rows, self.seen))  # type: ignore[return-value]


def _centred(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x - x.mean(dim=0, keepdim=True)


def _parts(x: Features) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _centred_cross(x: Features, y: Features) -> torch.Tensor:
    """(D_x, D_y) cross-product of the centred features, X^T Y - n mean_x mean_y^T, summed over
    parts (the halves of a FrameSample) so they are never concatenated; float64."""
    xs, ys = _parts(x), _parts(y)
    n = sum(len(p) for p in xs)
    if n != sum(len(q) for q in ys):
        raise ValueError(f"linear CKA: {n} vs {sum(len(q) for q in ys)} frames")
    sum_x = sum(p.double().sum(dim=0) for p in xs)
    sum_y = sum(q.double().sum(dim=0) for q in ys)
    return sum(p.double().T @ q.double() for p, q in zip(xs, ys)) - torch.outer(sum_x, sum_y) / n


def linear_cka(x: Features, y: Features) -> float:
    """Linear CKA of two sets of features of the same n frames, (n, D_x) and (n, D_y) (or lists
    of parts with matching lengths)."""
    scale = torch.linalg.matrix_norm(_centred_cross(x, x)) * torch.linalg.matrix_norm(_centred_cross(y, y))
    return float(torch.linalg.matrix_norm(_centred_cross(y, x)) ** 2 / scale.clamp(min=1e-300))


def cross_cka(xs: Sequence[Features], ys: Sequence[Features]) -> torch.Tensor:
    """(len(xs), len(ys)) linear CKA of every layer pair; the self terms are computed once per layer.
    Memory: one (D_x, D_y) matrix and one float64 copy of a part at a time."""
    x_norms = [torch.linalg.matrix_norm(_centred_cross(x, x)) for x in xs]
    y_norms = [torch.linalg.matrix_norm(_centred_cross(y, y)) for y in ys]
    out = torch.zeros(len(xs), len(ys), dtype=torch.float64)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            out[i, j] = torch.linalg.matrix_norm(_centred_cross(x, y)) ** 2 / (x_norms[i] * y_norms[j]).clamp(min=1e-300)
    return out


def ridge_r2(xs: Sequence[Sequence[torch.Tensor]], ys: Sequence[Sequence[torch.Tensor]], ridge: float = 1e-3) -> torch.Tensor:
    """(len(xs[0]), len(ys[0])) held-out R² of ridge regressions from every layer of A to every
    layer of B, two-fold: xs[f][i] / ys[f][j] are layer i of A / layer j of B on fold f (two
    folds, the same frames within a fold). Fitted on one fold, scored on the other, both ways;
    squared errors and variances are pooled over the folds (R² = 1 - SSE / SST, SST around the
    scored fold's own mean)."""
    if len(xs) != 2 or len(ys) != 2:
        raise ValueError("ridge_r2: expected two folds")
    sse = torch.zeros(len(xs[0]), len(ys[0]), dtype=torch.float64)
    sst = torch.zeros(len(ys[0]), dtype=torch.float64)
    for fit, score in ((0, 1), (1, 0)):
        y_means = [y.double().mean(dim=0) for y in ys[fit]]
        targets = torch.cat([y.double() - m for y, m in zip(ys[fit], y_means)], dim=1)  # (n_fit, sum of B's widths)
        widths = [y.shape[1] for y in ys[fit]]
        for j, y in enumerate(ys[score]):
            sst[j] += (_centred(y) ** 2).sum()
        for i, x in enumerate(xs[fit]):
            x_mean = x.double().mean(dim=0)
            xc = x.double() - x_mean
            gram = xc.T @ xc
            gram.diagonal().add_(ridge * float(gram.diagonal().mean()) + 1e-12)
            weight = torch.cholesky_solve(xc.T @ targets, torch.linalg.cholesky(gram))  # every layer of B at once
            x_test = xs[score][i].double() - x_mean
            for j, (y, w) in enumerate(zip(ys[score], torch.split(weight, widths, dim=1))):
                sse[i, j] += ((y.double() - y_means[j] - x_test @ w) ** 2).sum()
    return 1 - sse / sst.clamp(min=1e-300)[None, :]


@dataclass
class PairReport:
    """Two upstreams a and b. cka[i][j]: layer i of a vs layer j of b. r2_a_to_b[i][j]: b's layer j
    predicted from a's layer i (held out); r2_b_to_a[j][i] the other way. b_from_a: mean over b's
    layers of the best R² from any layer of a (best_source_a: a's layer that predicts b best on
    average); complementarity = min(1 - b_from_a, 1 - a_from_b)."""

    a: str
    b: str
    cka: list[list[float]]
    r2_a_to_b: list[list[float]]
    r2_b_to_a: list[list[float]]
    best_cka: float
    best_cka_layers: tuple[int, int]
    b_from_a: float
    a_from_b: float
    best_source_a: int
    best_source_b: int
    complementarity: float
    heatmap: str | None = None


@dataclass
class UpstreamReport:
    """One upstream: its share of the fused features' variance, what the fused PCA projection keeps
    of it (None without one), and the other upstream that predicts it best."""

    name: str
    width: int
    variance_share: float
    pca_kept: float | None
    predictable: float  # best "b_from_a" over the other upstreams
    predictable_from: str
    source_layer: int
    adds_beyond: float
    sentence: str = ""


@dataclass
class ComplementarityReport:
    upstreams: list[UpstreamReport]
    pairs: list[PairReport]  # most complementary first
    frames: dict = field(default_factory=dict)  # sampled per half, seen per half, utterances
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def compare(sample: FrameSample, names: Sequence[str], dims: Sequence[int], num_layers: int, ridge: float = 1e-3,
            variance_share: Sequence[float] | None = None, pca_kept: Sequence[float] | None = None) -> ComplementarityReport:
    """Every pair of upstreams on the sampled frames. A frame row is the flattened (L, sum D_i)
    aligned features: layer l of upstream u is columns l * sum(dims) + offset(u) .. + dims[u]."""
    if len(set(names)) != len(names):
        raise ValueError(f"compare: upstream names must be distinct, got {list(names)}")
    if len(names) != len(dims) or len(names) < 2:
        raise ValueError(f"compare: need at least two upstreams with one width each, got {list(names)} / {list(dims)}")
    total = sum(dims)
    if sample.width != num_layers * total:
        raise ValueError(f"compare: sample width {sample.width} != {num_layers} layers x {total} features")
    halves = sample.halves()
    if min(len(h) for h in halves) < 2:
        raise ValueError(f"compare: {len(halves[0])} + {len(halves[1])} sampled frames; need utterances in both halves "
                         "(at least two utterances)")
    offsets = np.cumsum([0, *dims])

    def layers(rows: torch.Tensor, u: int) -> list[torch.Tensor]:
        return [rows[:, l * total + offsets[u]: l * total + offsets[u] + dims[u]] for l in range(num_layers)]

    def both(u: int) -> list[list[torch.Tensor]]:  # per layer, the two halves' blocks (views, not copies)
        return [list(parts) for parts in zip(*(layers(h, u) for h in halves))]

    pairs = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            cka = cross_cka(both(a), both(b))
            a_to_b = ridge_r2([layers(h, a) for h in halves], [layers(h, b) for h in halves], ridge)
            b_to_a = ridge_r2([layers(h, b) for h in halves], [layers(h, a) for h in halves], ridge)
            best = int(cka.argmax())
            # A negative held-out R² (worse than the mean) predicts nothing: shares are clamped at 0.
            b_from_a, a_from_b = (max(0.0, float(r2.max(dim=0).values.mean())) for r2 in (a_to_b, b_to_a))
            pairs.append(PairReport(
                a=names[a], b=names[b], cka=_rounded(cka), r2_a_to_b=_rounded(a_to_b), r2_b_to_a=_rounded(b_to_a),
                best_cka=float(cka.max()), best_cka_layers=divmod(best, num_layers), b_from_a=b_from_a, a_from_b=a_from_b,
                best_source_a=int(a_to_b.mean(dim=1).argmax()), best_source_b=int(b_to_a.mean(dim=1).argmax()),
                complementarity=min(1 - b_from_a, 1 - a_from_b)))
    pairs.sort(key=lambda p: -p.complementarity)
    upstreams = []
    for u, (name, width) in enumerate(zip(names, dims)):
        # (predictable share, from which upstream, its best source layer) for every other upstream
        options = [(p.b_from_a, p.a, p.best_source_a) if p.b == name else (p.a_from_b, p.b, p.best_source_b)
                   for p in pairs if name in (p.a, p.b)]
        predictable, partner, layer = max(options)
        row = UpstreamReport(name, int(width), float(variance_share[u]) if variance_share is not None else float("nan"),
                             None if pca_kept is None else float(pca_kept[u]), predictable, partner, layer, 1 - predictable)
        row.sentence = sentence(row)
        upstreams.append(row)
    frames = {"sampled": [len(h) for h in halves], "seen": list(sample.seen), "utterances": sample.utterances}
    return ComplementarityReport(upstreams, pairs, frames, {"ridge": ridge, "max_frames": 2 * sample.capacity,
                                                            "num_layers": num_layers})


def sentence(row: UpstreamReport) -> str:
    """One line on what an upstream adds beyond the upstream that predicts it best."""
    share = f"{row.predictable:.0%} of its variance is predictable from {row.predictable_from} (layer {row.source_layer})"
    if row.adds_beyond < LITTLE:
        return f"{row.name} adds little: {share}"
    if row.adds_beyond < MUCH:
        return f"{row.name} adds some: {share}; {row.adds_beyond:.0%} is its own"
    return f"{row.name} adds much: only {share}"


def _rounded(matrix: torch.Tensor) -> list[list[float]]:
    return [[round(float(v), 4) for v in row] for row in matrix]
