"""Train the benchmark's upstreams: tiny stock transformers encoders with complementary skills.

Each upstream is a random-init `HubertModel` / `WavLMModel` / `Wav2Vec2Model` trained on one task
of the corpus and saved with `save_pretrained` (+ a preprocessor_config.json), exactly like a hub
model; the rest of the benchmark only ever reaches it through `teachers.load_upstream(folder)`.
The training heads are discarded. Folders are cached by the hash of (upstream config, corpus), so
a rerun reuses them.

- `ctc:COLUMN` (the content upstream): CTC over the column's characters. Plain CTC from raw audio
  emits only blanks for hundreds of steps on a CPU budget, so a second, discarded head learns a
  frame-level cross-entropy on flat-start labels (the symbols spread evenly over the frames) and
  pulls the encoder towards phonetic features early; CTC then aligns properly.
- `classification:COLUMN` (the speaker upstream): mean pooling over valid frames + Linear, on
  random crops.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, Wav2Vec2FeatureExtractor, get_scheduler

from distill.evaluation.metrics import ctc_greedy, error_rate

from .config import UpstreamConfig, config_hash

logger = logging.getLogger(__name__)

DONE = "training.json"
GE2E = "ge2e"  # `pretrained: ge2e`: the speaker encoder PyPI resemblyzer ships (teachers/ge2e.py)


def read_split(corpus: Path, split: str) -> list[dict]:
    """Rows of metadata.csv for one split, each with its waveform ("wave", float32, 16 kHz)."""
    with open(corpus / "metadata.csv", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == split]
    for row in rows:
        row["wave"] = sf.read(corpus / row["file_name"], dtype="float32")[0]
    return rows


def encoder_config(cfg: UpstreamConfig):
    """A stock transformers config: standard wav2vec conv kernels/strides (320-sample hop), thin
    channels, layer-norm front-end (batch-invariant with an attention mask)."""
    return AutoConfig.for_model(
        cfg.arch, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        conv_dim=[cfg.conv_channels] * 7, feat_extract_norm="layer", do_stable_layer_norm=True,
        num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=4, layerdrop=0.0, mask_time_prob=0.0,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        **({"num_buckets": 32, "max_bucket_distance": 200} if cfg.arch == "wavlm" else {}),
    )


def upstream_folder(cache_dir: Path, name: str, cfg: UpstreamConfig, corpus_hash: str) -> Path:
    if cfg.pretrained:  # real weights do not depend on the corpus
        return Path(cache_dir) / cfg.pretrained
    spec = {k: v for k, v in asdict(cfg).items() if k != "pretrained"}  # the hash trained folders always had
    return Path(cache_dir) / f"{name}-{config_hash({'upstream': spec, 'corpus': corpus_hash})}"


def pretrained_upstream(name: str, cfg: UpstreamConfig, folder: Path) -> dict:
    """Write (or reuse) the folder of a real pretrained upstream; returns its report."""
    if cfg.pretrained == GE2E:
        return _ge2e_upstream(name, folder)
    from benchmarks.pretrained_whisper import KNOWN_MODELS, write_whisper_folder

    if not (folder / "model.safetensors").exists():
        write_whisper_folder(cfg.pretrained, folder)
        logger.info("upstream %s: real %s weights written to %s", name, cfg.pretrained, folder)
    params = AutoConfig.from_pretrained(folder)
    return {"pretrained": cfg.pretrained, "hub_id": KNOWN_MODELS[cfg.pretrained].hub_id,
            "encoder_layers": params.encoder_layers, "d_model": params.d_model}


def _ge2e_upstream(name: str, folder: Path) -> dict:
    """resemblyzer's GE2E speaker encoder, converted once to a safetensors folder."""
    from teachers.ge2e import WIDTH, LAYERS, save_ge2e

    if not (folder / "model.safetensors").exists():
        save_ge2e(folder)
        logger.info("upstream %s: real GE2E weights (resemblyzer) written to %s", name, folder)
    return {"pretrained": GE2E, "source": "PyPI resemblyzer 0.1.4 (pretrained.pt)", "layers": LAYERS, "width": WIDTH}


def train_upstream(name: str, cfg: UpstreamConfig, corpus: Path, folder: Path, seed: int = 0) -> dict:
    """Train (or reuse) one upstream; returns its training report (dev score, steps, minutes)."""
    if (folder / DONE).exists():
        logger.info("upstream %s: reusing %s", name, folder)
        return json.loads((folder / DONE).read_text())
    kind, _, column = cfg.task.partition(":")
    train, dev = read_split(corpus, "train"), read_split(corpus, "dev")
    vocab = sorted({ch for r in train for ch in r[column]}) if kind == "ctc" else sorted({r[column] for r in train})
    torch.manual_seed(seed)
    encoder = AutoModel.from_config(encoder_config(cfg))
    heads = _Heads(kind, cfg.hidden_size, len(vocab))
    start = time.perf_counter()
    losses = _fit(encoder, heads, kind, column, vocab, train, cfg, seed)
    score = _score(encoder, heads, kind, column, vocab, dev)
    folder.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(folder)
    report = {"name": name, "task": cfg.task, "dev_metric": "per" if kind == "ctc" else "accuracy", "dev_score": score,
              "steps": cfg.steps, "final_loss": float(np.mean(losses[-20:])), "minutes": (time.perf_counter() - start) / 60,
              "params": sum(p.numel() for p in encoder.parameters()), "config": asdict(cfg)}
    (folder / DONE).write_text(json.dumps(report, indent=2) + "\n")
    logger.info("upstream %s: dev %s %.3f after %d steps (%.1f min)", name, report["dev_metric"], score, cfg.steps,
                report["minutes"])
    return report


class _Heads(nn.Module):
    def __init__(self, kind: str, hidden: int, num_labels: int):
        super().__init__()
        self.kind = kind
        self.main = nn.Linear(hidden, num_labels + (1 if kind == "ctc" else 0))  # CTC: blank is 0
        self.frame = nn.Linear(hidden, num_labels) if kind == "ctc" else None


def _normalise(wave: np.ndarray) -> np.ndarray:
    # What Wav2Vec2FeatureExtractor(do_normalize=True) does, and what the teachers do.
    return (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)


def _batch(rows: list[dict], crop: int | None, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    waves = []
    for r in rows:
        w = r["wave"]
        if crop and len(w) > crop:
            start = int(rng.integers(0, len(w) - crop + 1))
            w = w[start:start + crop]
        waves.append(_normalise(w))
    lengths = torch.tensor([len(w) for w in waves])
    x = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        x[i, : len(w)] = torch.from_numpy(w)
    return x, lengths


def _encode(encoder: nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).long()
    hidden = encoder(x, attention_mask=mask).last_hidden_state
    frames = encoder._get_feat_extract_output_lengths(lengths).clamp(max=hidden.shape[1])
    return hidden, frames


def _loss(heads: _Heads, hidden, frames, labels: list, vocab: list[str], cfg: UpstreamConfig) -> torch.Tensor:
    valid = torch.arange(hidden.shape[1])[None] < frames[:, None]
    if heads.kind == "classification":
        pooled = (hidden * valid[..., None]).sum(1) / frames[:, None]
        return F.cross_entropy(heads.main(pooled), torch.tensor([vocab.index(v) for v in labels]))
    index = {s: i for i, s in enumerate(vocab)}
    ids = [[index[c] for c in text if c in index] for text in labels]
    log_probs = heads.main(hidden).log_softmax(-1).transpose(0, 1)
    targets = torch.tensor([i + 1 for seq in ids for i in seq])
    ctc = F.ctc_loss(log_probs, targets, frames, torch.tensor([len(s) for s in ids]), zero_infinity=True)
    flat = torch.full(hidden.shape[:2], -100, dtype=torch.long)  # flat start: symbols spread evenly
    for b, seq in enumerate(ids):
        n = int(frames[b])
        flat[b, :n] = torch.tensor(seq)[(torch.arange(n) * len(seq)) // n]
    return ctc + cfg.frame_ce_weight * F.cross_entropy(heads.frame(hidden).transpose(1, 2), flat, ignore_index=-100)


def _fit(encoder, heads, kind, column, vocab, train, cfg: UpstreamConfig, seed: int) -> list[float]:
    params = [*encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.01)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    rng = np.random.default_rng(seed)
    crop = int(cfg.crop_seconds * 16000) if cfg.crop_seconds else None
    encoder.train()
    losses = []
    order = rng.permutation(len(train))
    for step in range(cfg.steps):
        start = (step * cfg.batch_size) % len(train)
        if start + cfg.batch_size > len(train):
            order, start = rng.permutation(len(train)), 0
        rows = [train[i] for i in order[start:start + cfg.batch_size]]
        hidden, frames = _encode(encoder, *_batch(rows, crop, rng))
        loss = _loss(heads, hidden, frames, [r[column] for r in rows], vocab, cfg)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, cfg.steps // 10) == 0:
            logger.info("  %s step %d/%d loss %.3f", cfg.task, step + 1, cfg.steps, np.mean(losses[-20:]))
    return losses


@torch.no_grad()
def _score(encoder, heads, kind, column, vocab, rows: list[dict]) -> float:
    """Dev PER (greedy CTC) or accuracy, whole utterances one at a time."""
    encoder.eval()
    hits, hyps, refs = 0, [], []
    for r in rows:
        hidden, _ = _encode(encoder, *_batch([r], None, np.random.default_rng(0)))
        if kind == "classification":
            hits += vocab[int(heads.main(hidden.mean(1)).argmax())] == r[column]
            continue
        best = heads.main(hidden[0]).argmax(-1).tolist()
        hyps.append([s - 1 for s in ctc_greedy(best)])
        refs.append([vocab.index(c) for c in r[column] if c in vocab])
    return hits / len(rows) if kind == "classification" else error_rate(refs, hyps)
