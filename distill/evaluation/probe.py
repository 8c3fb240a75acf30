"""SUPERB-style probing: a frozen encoder, a layer interface (WeightedSum / HConv) and a small head.

One call probes a student, the fused teacher or one upstream under the same budget (steps, lr,
seed, head): `run_probe(hf_encoder_extractor(model), train_batches, dev_batches, task)` (an
exported ONNX graph: `onnx_extractor("STUDENT/model_int8.onnx")`), or for
several tasks at once `run_probes(extract, train_batches, dev_batches, tasks)`, which extracts every
utterance once and trains one interface + head per task on the shared cache.

- CTC: symbols are the characters of the column's strings (an IPA string splits into code points,
  stress/length marks included; spaces separate words). Blank is 0, vocab[i] is i + 1. Head
  "linear": Linear + ReLU + Linear per frame (SUPERB's phoneme probe: the features must carry the
  symbols; fast); "lstm": a 1-layer BiLSTM in between (SUPERB-ASR-style context; slower on CPUs).
  Greedy decoding; "cer" = total edit distance / total reference symbols (lower is better).
- Classification: mean over valid frames, Linear; "accuracy".
- Verification (SUPERB ASV, unseen speakers; verification.py): speakers split into seen and unseen
  from the labels alone; mean over valid frames, Linear to a `head_dim` embedding, trained with
  AM-softmax over the SEEN speakers' training utterances; every pair of the UNSEEN speakers' test
  utterances is a trial scored by cosine; "eer" (lower is better; 1 - EER where higher must win).

Cost: the extractor is frozen, so every utterance is extracted ONCE and its valid frames are cached
in CPU memory (L x T x D values each, `cache_dtype`). A trainable step between the frozen features
and the interface (the fused teacher's projection) is a `transform` run on the cache every step
(`feature_grad=True`, its parameters in `extra_parameters`): upstream forwards still run once.
Task types live in tasks.py (ProbeTask, ProbeResult), extractors in extractors.py; this module
holds the heads and their fitting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from teachers import HConv, WeightedSum, frame_mask

from .extractors import Extractor
from .metrics import ctc_greedy, error_rate
from .tasks import ProbeResult, ProbeTask, is_missing
from .verification import SpeakerSplit, equal_error_rate, score_trials, split_speakers

__all__ = ["run_probe", "run_probes"]

logger = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor], torch.Tensor]  # (L, B, T, D) -> (L, B, T, D')
_HEADS = ("linear", "lstm")
_MAX_GRAD_NORM = 5.0  # CTC has rare loss spikes early on; clipping keeps short budgets stable
# AM-softmax (Wang et al. 2018; SUPERB ASV's loss): a cosine classifier with an additive margin
# makes same-speaker embeddings close in angle, which is what cosine scoring of trials reads.
_AM_SCALE, _AM_MARGIN = 30.0, 0.2


# --------------------------------------------------------------------------- heads


class _CTCHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int, num_symbols: int, recurrent: bool):
        super().__init__()
        self.inner = nn.Linear(in_dim, hidden)
        self.lstm = nn.LSTM(hidden, hidden // 2, batch_first=True, bidirectional=True) if recurrent else None
        self.out = nn.Linear(2 * (hidden // 2) if recurrent else hidden, num_symbols + 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.inner(x))
        if self.lstm is not None:  # packed: padded frames never enter the recurrence
            packed = nn.utils.rnn.pack_padded_sequence(hidden, lengths.cpu(), batch_first=True, enforce_sorted=False)
            hidden, _ = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True,
                                                         total_length=x.shape[1])
        return self.out(hidden)


class _PoolHead(nn.Module):
    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.out = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = frame_mask(lengths, x.shape[1], x.device)[:, :, None].to(x.dtype)
        return self.out((x * mask).sum(dim=1) / lengths.to(x.device, x.dtype).clamp(min=1)[:, None])


class _SpeakerHead(nn.Module):
    """Mean over valid frames, Linear to the embedding; `classes` are the seen speakers' AM-softmax weights."""

    def __init__(self, in_dim: int, embed_dim: int, num_speakers: int):
        super().__init__()
        self.embed = nn.Linear(in_dim, embed_dim)
        self.classes = nn.Parameter(torch.randn(num_speakers, embed_dim) / embed_dim ** 0.5)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = frame_mask(lengths, x.shape[1], x.device)[:, :, None].to(x.dtype)
        return self.embed((x * mask).sum(dim=1) / lengths.to(x.device, x.dtype).clamp(min=1)[:, None])

    def am_softmax_loss(self, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cosine = F.normalize(embeddings, dim=-1) @ F.normalize(self.classes, dim=-1).T
        margin = _AM_MARGIN * F.one_hot(targets, cosine.shape[-1]).to(cosine.dtype)
        return F.cross_entropy(_AM_SCALE * (cosine - margin), targets)


# --------------------------------------------------------------------------- the probe


@dataclass
class _Item:
    features: torch.Tensor  # (L, T, D) valid frames, on the CPU
    target: list[int]  # CTC symbol ids, or [class]
    reference: Any  # what the prediction is scored against: all characters, the class, or the speaker


def run_probe(
    extract: Extractor,
    train_batches: Iterable[Mapping[str, Any]],
    dev_batches: Iterable[Mapping[str, Any]],
    task: ProbeTask,
    interface: Union[str, nn.Module] = "weighted_sum",
    steps: int = 200,
    learning_rate: float = 1e-3,
    seed: int = 0,
    extra_parameters: Iterable[nn.Parameter] = (),
    feature_grad: bool = False,
    *,
    transform: Optional[Transform] = None,
    batch_size: int = 8,
    head: str = "linear",
    head_dim: int = 128,
    device: Union[str, torch.device, None] = None,
    cache_dtype: torch.dtype = torch.float32,
) -> ProbeResult:
    """Train interface + head (Adam) on cached frozen features of `train_batches`; score `dev_batches`.

    interface: "weighted_sum" | "hconv" builds a fresh one for the feature shape; a module is
    trained in place (e.g. a teacher's interface). transform: (L, B, T, D) -> (L, B, T, D') between
    cache and interface; with `feature_grad=True` it runs every step with gradients (put its
    parameters in `extra_parameters`), else once, before caching. Training draws `batch_size`
    utterances per step in a seeded order; `device` (default: where the extractor returns
    features) runs interface and head. head: "linear" | "lstm" (CTC only). Deterministic on CPU.
    Rows without a value for the task are left out and counted (missing_train / missing_dev).
    """
    return run_probes(extract, train_batches, dev_batches, [task], interface, steps, learning_rate, seed,
                      extra_parameters, feature_grad, transform=transform, batch_size=batch_size, head=head,
                      head_dim=head_dim, device=device, cache_dtype=cache_dtype)[task.name]


def run_probes(
    extract: Extractor,
    train_batches: Iterable[Mapping[str, Any]],
    dev_batches: Iterable[Mapping[str, Any]],
    tasks: Sequence[ProbeTask],
    interface: Union[str, nn.Module] = "weighted_sum",
    steps: int = 200,
    learning_rate: float = 1e-3,
    seed: int = 0,
    extra_parameters: Iterable[nn.Parameter] = (),
    feature_grad: bool = False,
    *,
    transform: Optional[Transform] = None,
    batch_size: int = 8,
    head: str = "linear",
    head_dim: int = 128,
    device: Union[str, torch.device, None] = None,
    cache_dtype: torch.dtype = torch.float32,
) -> dict[str, ProbeResult]:
    """`run_probe` for several tasks on one extraction: every utterance of `train_batches` and
    `dev_batches` is extracted once, then each task trains its own fresh interface + head (same
    budget and seed) on the utterances that have a value for its column. Returns {task.name: result}.

    A module `interface` or a trained `transform` (feature_grad) would be shared and trained by
    every task in turn, so those take exactly one task.
    """
    tasks = list(tasks)
    if steps < 1 or batch_size < 1 or head not in _HEADS:
        raise ValueError(f"run_probe: steps={steps}, batch_size={batch_size} (both >= 1), head={head!r} (linear|lstm)")
    if feature_grad and transform is None:
        raise ValueError("run_probe: feature_grad=True trains through `transform`; the extractor itself stays frozen")
    names = [task.name for task in tasks]
    if not tasks or len(set(names)) < len(names):
        raise ValueError(f"run_probes: expected distinct tasks, got {names or 'none'}")
    if len(tasks) > 1 and (isinstance(interface, nn.Module) or feature_grad):
        raise ValueError("run_probes: a module interface or a trained transform is trained in place; probe one task")
    step_transform = transform if feature_grad else None
    cache_transform = None if feature_grad else transform
    train, device = _cache(extract, train_batches, tasks, cache_transform, cache_dtype, device)
    dev, _ = _cache(extract, dev_batches, tasks, cache_transform, cache_dtype, device)
    results = {}
    for task in tasks:
        split = None
        if task.kind == "verification":  # label-only: refuses before any head is trained
            split = split_speakers([c.labels[task.name] for c in train], [c.labels[task.name] for c in dev],
                                   f"run_probe {task.name}")
        train_items, missing_train = _items(train, task, training=True, split=split)
        dev_items, missing_dev = _items(dev, task, training=False, split=split)
        if not train_items or not dev_items:
            raise ValueError(f"run_probe {task.name}: {len(train_items)} training and {len(dev_items)} dev utterances "
                             f"with a value ({missing_train} + {missing_dev} without); need both")
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG alone
            torch.manual_seed(seed)
            modules = _build_modules(interface, train_items[0], task, step_transform, head == "lstm", head_dim, device,
                                     len(split.seen) if split else 0)
        losses = _train(train_items, task, modules, step_transform, extra_parameters, steps, learning_rate, seed,
                        batch_size, device)
        tail = losses[-max(1, steps // 10):]
        common = (sum(tail) / len(tail), steps, len(train_items), len(dev_items), missing_train, missing_dev)
        if split is not None:
            eer, trials, target_trials = _verify(dev_items, modules, step_transform, batch_size, device, seed)
            results[task.name] = ProbeResult("eer", eer, *common, seen_speakers=len(split.seen),
                                             unseen_speakers=len(split.unseen), trials=trials, target_trials=target_trials)
            continue
        score = _evaluate(dev_items, task, modules, step_transform, batch_size, device)
        results[task.name] = ProbeResult("cer" if task.kind == "ctc" else "accuracy", score, *common)
    return results


def _train(train: list[_Item], task: ProbeTask, modules: tuple[nn.Module, nn.Module], transform: Optional[Transform],
           extra_parameters: Iterable[nn.Parameter], steps: int, learning_rate: float, seed: int, batch_size: int,
           device: torch.device) -> list[float]:
    unique = {id(p): p for p in [*modules[0].parameters(), *modules[1].parameters(), *extra_parameters]}
    params = [p for p in unique.values() if p.requires_grad]
    optimizer, losses = torch.optim.Adam(params, lr=learning_rate), []
    for module in modules:
        module.train()
    for step, indices in enumerate(_batch_order(len(train), batch_size, steps, seed), 1):
        items = [train[i] for i in indices]
        loss = _loss(*_forward(items, modules, transform, device), items, task, modules[1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, _MAX_GRAD_NORM)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % max(1, steps // 10) == 0:
            logger.debug("probe %s step %d/%d loss %.4f", task.kind, step, steps, losses[-1])
    optimizer.zero_grad(set_to_none=True)  # no stale gradients left on a caller's modules
    return losses


@dataclass
class _Cached:
    features: torch.Tensor  # (L, T, D) valid frames, on the CPU
    labels: dict[str, Any]  # task name -> this utterance's raw value (None etc. when it has none)


def _cache(extract: Extractor, batches: Iterable[Mapping[str, Any]], tasks: Sequence[ProbeTask],
           transform: Optional[Transform], dtype: torch.dtype, device: Any) -> tuple[list[_Cached], torch.device]:
    cached: list[_Cached] = []
    for batch in batches:
        if len(batch["lengths"]) == 0:
            continue
        labels = {task.name: task.labels_of(batch) for task in tasks}  # before extracting: a missing column fails fast
        with torch.no_grad():
            features, frames = extract(batch["waveforms"], batch["lengths"])
            features = transform(features) if transform is not None else features
        device = features.device if device is None else device
        for b, n in enumerate(frames.tolist()):
            cached.append(_Cached(features[:, b, :n].to("cpu", dtype).clone(),
                                  {name: values[b] for name, values in labels.items()}))
    return cached, torch.device("cpu") if device is None else torch.device(device)


def _items(cached: list[_Cached], task: ProbeTask, training: bool,
           split: Optional[SpeakerSplit] = None) -> tuple[list[_Item], int]:
    """The task's utterances (features shared with the cache, not copied) and how many had no value.
    Verification: training keeps the seen speakers (target: index among them), dev the unseen ones."""
    items, missing = [], 0
    for entry in cached:
        label = entry.labels[task.name]
        if is_missing(label):
            missing += 1
            continue
        if split is not None:
            speakers = split.seen if training else split.unseen
            if str(label) in speakers:
                items.append(_Item(entry.features, [speakers.index(str(label))], str(label)))
            continue
        target = task.encode(label)
        if training and task.kind == "classification" and target[0] < 0:
            continue  # a class outside the vocabulary cannot be trained on
        reference = list(str(label)) if task.kind == "ctc" else target[0]
        items.append(_Item(entry.features, target, reference))
    return items, missing


def _build_modules(interface: Union[str, nn.Module], sample: _Item, task: ProbeTask, transform: Optional[Transform],
                   recurrent: bool, head_dim: int, device: torch.device, num_seen: int = 0) -> tuple[nn.Module, nn.Module]:
    features = sample.features[:, None].float().to(device)  # (L, 1, T, D)
    with torch.no_grad():
        features = transform(features) if transform is not None else features
    if isinstance(interface, nn.Module):
        iface = interface
    elif interface in ("weighted_sum", "hconv"):
        build = WeightedSum if interface == "weighted_sum" else HConv
        iface = build(features.shape[0], features.shape[-1]).to(device)
    else:
        raise ValueError(f"run_probe: interface={interface!r}, expected weighted_sum, hconv or an nn.Module")
    with torch.no_grad():  # any interface's output width, read off one forward
        out_dim = iface(features).shape[-1]
    if task.kind == "ctc":
        return iface, _CTCHead(out_dim, head_dim, len(task.vocab), recurrent).to(device)
    if task.kind == "verification":
        return iface, _SpeakerHead(out_dim, head_dim, num_seen).to(device)
    return iface, _PoolHead(out_dim, len(task.vocab)).to(device)


def _forward(items: Sequence[_Item], modules: tuple[nn.Module, nn.Module], transform: Optional[Transform],
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([it.features.shape[1] for it in items], dtype=torch.long)
    first = items[0].features
    features = first.new_zeros(first.shape[0], len(items), int(lengths.max()), first.shape[-1])
    for b, it in enumerate(items):
        features[:, b, : it.features.shape[1]] = it.features
    features, lengths = features.to(device, torch.float32), lengths.to(device)
    if transform is not None:  # re-zero padded frames: a projection bias would fill them
        features = transform(features) * frame_mask(lengths, features.shape[2])[None, :, :, None]
    iface, head = modules
    return head(iface(features), lengths), lengths


def _loss(logits: torch.Tensor, lengths: torch.Tensor, items: Sequence[_Item], task: ProbeTask,
          head: nn.Module) -> torch.Tensor:
    if task.kind == "verification":  # `logits` are the embeddings
        return head.am_softmax_loss(logits, torch.tensor([it.target[0] for it in items], device=logits.device))
    if task.kind == "classification":
        return F.cross_entropy(logits, torch.tensor([it.target[0] for it in items], device=logits.device))
    targets = torch.tensor([i for it in items for i in it.target], dtype=torch.long, device=logits.device)
    target_lengths = torch.tensor([len(it.target) for it in items], dtype=torch.long)
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, V + 1)
    # zero_infinity: an utterance with more symbols than frames adds nothing instead of inf.
    return F.ctc_loss(log_probs, targets, lengths.cpu(), target_lengths, blank=0, zero_infinity=True)


def _batch_order(num_items: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Seeded epochs of shuffled utterance indices, cut into `steps` batches."""
    generator, size, stream = torch.Generator().manual_seed(seed), min(batch_size, num_items), []
    while len(stream) < steps * size:
        stream.extend(torch.randperm(num_items, generator=generator).tolist())
    return [stream[i * size: (i + 1) * size] for i in range(steps)]


def _evaluate(dev: list[_Item], task: ProbeTask, modules: tuple[nn.Module, nn.Module], transform: Optional[Transform],
              batch_size: int, device: torch.device) -> float:
    for module in modules:
        module.eval()
    predictions: list[Any] = []
    with torch.no_grad():
        for start in range(0, len(dev), batch_size):
            logits, lengths = _forward(dev[start: start + batch_size], modules, transform, device)
            predictions.extend(_decode(logits, lengths, task))
    if task.kind == "ctc":
        return error_rate([it.reference for it in dev], predictions)
    return sum(int(p == it.reference) for p, it in zip(predictions, dev)) / len(dev)


def _verify(dev: list[_Item], modules: tuple[nn.Module, nn.Module], transform: Optional[Transform],
            batch_size: int, device: torch.device, seed: int) -> tuple[float, int, int]:
    """EER over all pairs of the unseen speakers' utterances (cosine of embeddings); (eer, trials, target trials)."""
    for module in modules:
        module.eval()
    with torch.no_grad():
        embeddings = torch.cat([_forward(dev[start: start + batch_size], modules, transform, device)[0].cpu()
                                for start in range(0, len(dev), batch_size)])
    target, nontarget = score_trials(embeddings, [it.reference for it in dev], seed)
    return equal_error_rate(target.numpy(), nontarget.numpy()), len(target) + len(nontarget), len(target)


def _decode(logits: torch.Tensor, lengths: torch.Tensor, task: ProbeTask) -> list[Any]:
    if task.kind == "classification":
        return logits.argmax(-1).tolist()
    best, decoded = logits.argmax(-1).cpu(), []
    for b, n in enumerate(lengths.tolist()):
        decoded.append([task.vocab[i - 1] for i in ctc_greedy(best[b, :n].tolist())])
    return decoded
