"""The benchmark's config: corpus, upstreams, teacher, student and budgets, one YAML file.

`default.yaml` beside this file is the shipped benchmark; `alt.yaml` is a second corpus (other
languages, voices, words and seed) that must give the same verdicts. `--quick` shrinks sizes and
budgets (`QUICK_OVERRIDES`) so the same code path runs in a few minutes. Unknown keys and wrong
types are one-line errors (OmegaConf structured configs).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distill.evaluation.tasks import KINDS as TASK_KINDS  # stdlib only; verification = ASV on unseen speakers (EER)

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "default.yaml"
STUDENT_ARCHS = ("hubert", "wav2vec2_bert")  # raw-audio HuBERT or log-mel Conformer students


@dataclass
class SpeakerSpec:
    variant: str  # espeak-ng voice variant (`-v LANG+VARIANT`)
    pitch: int  # base pitch, 0-99 (`-p`)


@dataclass
class StyleSpec:
    speed: int  # words per minute (`-s`)
    range: str  # SSML prosody range: x-low | low | medium | high | x-high
    amplitude: int  # 0-200 (`-a`)


@dataclass
class CorpusConfig:
    seed: int = 0
    languages: list[str] = field(default_factory=lambda: ["en", "de", "es", "fr"])  # words/<lang>.txt
    speakers: list[SpeakerSpec] = field(default_factory=list)
    styles: dict[str, StyleSpec] = field(default_factory=dict)
    words_per_sentence: list[int] = field(default_factory=lambda: [3, 7])  # inclusive range
    train: int = 1600
    dev: int = 240
    test: int = 240
    min_seconds: float = 1.0
    max_seconds: float = 5.0
    # Per utterance, a speaker's base pitch moves by up to +-pitch_jitter and the style's speed by
    # up to +-speed_jitter (a fraction): identity is then the voice, not one pitch and rate.
    pitch_jitter: int = 0
    speed_jitter: float = 0.0


@dataclass
class UpstreamConfig:
    """A tiny transformers encoder trained on one task and saved with save_pretrained, or a real
    pretrained model (`pretrained`: a name of benchmarks.pretrained_whisper.KNOWN_MODELS, or `ge2e`:
    the speaker encoder PyPI resemblyzer ships)."""

    arch: str = ""  # hubert | wavlm | wav2vec2 (trained upstreams)
    task: str = ""  # ctc:COLUMN | classification:COLUMN (trained upstreams)
    pretrained: Optional[str] = None  # e.g. whisper-tiny.en: real weights, frozen, not trained here
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 256
    conv_channels: int = 64  # every layer of the 7-layer wav2vec conv front-end
    steps: int = 600
    learning_rate: float = 2e-3
    warmup_steps: int = 60
    batch_size: int = 8
    crop_seconds: Optional[float] = None  # classification crops; CTC always sees whole utterances
    frame_ce_weight: float = 0.5  # CTC only: flat-start frame cross-entropy head (discarded)


@dataclass
class TeacherSection:
    fusion: str = "chconv"
    projection_dim: int = 128
    target_layers: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    pca_max_utterances: int = 256
    projection_balance: str = "none"  # none | equal_variance | split (teachers/pca.py)
    supervised_steps: int = 300  # fit-teacher budget for the supervised-projection row


@dataclass
class StudentSection:
    # hubert: raw audio through a 7-layer conv front-end (conv_channels wide). wav2vec2_bert: a
    # log-mel Conformer (students/presets.py w2vbert_*; conv_channels unused; each layer has two
    # FFNs and a conv module, so intermediate_size=128 gives the 0.47M of the default HuBERT).
    arch: str = "hubert"  # hubert | wav2vec2_bert
    hidden_size: int = 112
    num_hidden_layers: int = 3
    num_attention_heads: int = 2
    intermediate_size: int = 224
    conv_channels: int = 48
    head_mode: str = "predict"


@dataclass
class DistillSection:
    steps: int = 1200
    batch_size: int = 8
    crop_seconds: float = 3.0
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    cache_targets: bool = True  # teacher once over the corpus (cache-targets), not every step
    eval_steps: Optional[int] = None  # training.eval_steps: held-out eval, best checkpoint, convergence line


@dataclass
class SweepSection:
    """`--sweep`: extra students per teacher, each probed like the main ones."""

    teachers: list[str] = field(default_factory=lambda: ["fused", "content"])
    steps: list[int] = field(default_factory=list)  # at the default student size
    sizes: dict[str, StudentSection] = field(default_factory=dict)  # at distill.steps


@dataclass
class AttemptsSection:
    """`--attempts`: fused-teacher students whose recipe differs by dotted recipe overrides."""

    steps: Optional[int] = None  # None: distill.steps
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {recipe.key: value}


@dataclass
class ProbeSection:
    steps: int = 300
    learning_rate: float = 2e-3
    batch_size: int = 8
    train_items: int = 480  # utterances of the train split the probe heads learn from
    test_items: int = 240


@dataclass
class FinetuneSection:
    steps: int = 300
    head_only_fraction: float = 0.5  # the first half trains only the CTC head (encoder frozen)
    head_learning_rate: float = 5e-3
    learning_rate: float = 5e-4  # then the encoder too, decaying linearly
    batch_size: int = 8
    train_items: int = 800


@dataclass
class BenchmarkConfig:
    name: str = "default"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSection = field(default_factory=StudentSection)
    distill: DistillSection = field(default_factory=DistillSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    sweep: SweepSection = field(default_factory=SweepSection)
    attempts: AttemptsSection = field(default_factory=AttemptsSection)
    tasks: list[str] = field(default_factory=lambda: ["ctc:phonemes", "classification:speaker",
                                                      "classification:language", "classification:style"])


# The same path on a tiny corpus: checks the plumbing and the files, not the scores.
QUICK_OVERRIDES = [
    "corpus.train=48", "corpus.dev=12", "corpus.test=16", "corpus.words_per_sentence=[2,4]",
    "teacher.projection_dim=16", "teacher.target_layers=[1,2]", "teacher.pca_max_utterances=16",
    "teacher.supervised_steps=4",
    "student.hidden_size=16", "student.num_hidden_layers=2", "student.intermediate_size=32", "student.conv_channels=16",
    "distill.steps=4", "distill.warmup_steps=1", "distill.eval_steps=2", "distill.crop_seconds=1.0", "distill.batch_size=4",
    "probe.steps=4", "probe.train_items=24", "probe.test_items=16",
    "finetune.steps=4", "finetune.train_items=16",
    "sweep.steps=[2]", "sweep.teachers=[fused]",
    "attempts.steps=2", "attempts.variants={lr: {training.learning_rate: 0.002}, split: {teacher.projection_balance: split}}",
    "sweep.sizes={xs: {hidden_size: 8, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 16, conv_channels: 8}}",
]
# ... and for every upstream trained here (pretrained ones keep their real size).
QUICK_UPSTREAM = ["steps=4", "warmup_steps=1", "hidden_size=32", "conv_channels=16", "num_hidden_layers=2",
                  "intermediate_size=64", "num_attention_heads=2"]



class BenchmarkConfigError(ValueError):
    """A config file that cannot be used; one line naming the file and the key."""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, quick: bool = False) -> BenchmarkConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists():
        raise BenchmarkConfigError(f"benchmark config not found: {path}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(BenchmarkConfig), OmegaConf.load(path))
    except OmegaConfBaseException as err:
        raise BenchmarkConfigError(f"{path}:{_key(err)} {str(err).splitlines()[0]}") from None
    quick_items = QUICK_OVERRIDES + [f"upstreams.{name}.{item}" for name, u in merged.upstreams.items()
                                     if not u.pretrained for item in QUICK_UPSTREAM]
    for item in (quick_items if quick else []) + list(overrides or []):
        key, sep, value = item.partition("=")
        if not sep:
            raise BenchmarkConfigError(f"override {item!r}: expected KEY=VALUE")
        try:  # replace, not merge: `sweep.sizes={}` empties the mapping instead of keeping its keys
            parsed = yaml.safe_load(value)
            if isinstance(parsed, dict):  # typed mappings: empty first, then merge (validates each entry)
                OmegaConf.update(merged, key, {}, merge=False)
            OmegaConf.update(merged, key, parsed, merge=isinstance(parsed, dict))
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            raise BenchmarkConfigError(f"override {item!r}:{_key(err)} {str(err).splitlines()[0]}") from None
    cfg: BenchmarkConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if len(cfg.upstreams) < 2:
        raise BenchmarkConfigError(f"{path}: upstreams: expected at least two to fuse, got {sorted(cfg.upstreams)}")
    for name, u in cfg.upstreams.items():
        if not u.pretrained and not (u.arch and u.task):
            raise BenchmarkConfigError(f"{path}: upstreams.{name}: expected `pretrained: NAME` or both `arch` and `task`")
        if name == "fused":
            raise BenchmarkConfigError(f"{path}: upstreams.fused: the name is taken by the fused teacher's student")
    if cfg.student.arch not in STUDENT_ARCHS:
        raise BenchmarkConfigError(f"{path}: student.arch={cfg.student.arch!r}: expected one of {', '.join(STUDENT_ARCHS)}")
    if not cfg.corpus.speakers or not cfg.corpus.styles or not cfg.corpus.languages:
        raise BenchmarkConfigError(f"{path}: corpus.speakers, corpus.styles and corpus.languages must not be empty")
    for spec in cfg.tasks:  # the probe kinds (distill.evaluation.tasks.KINDS), before hours of stages
        kind, _, column = spec.partition(":")
        if kind not in TASK_KINDS or not column:
            raise BenchmarkConfigError(f"{path}: tasks: {spec!r}, expected KIND:COLUMN with KIND one of {', '.join(TASK_KINDS)}")
    return cfg


def _key(err: Exception) -> str:
    return f" {err.full_key}:" if getattr(err, "full_key", None) else ""


def config_hash(section: object) -> str:
    """A short, stable digest of a config section: what a cached artefact was built from."""
    text = json.dumps(asdict(section) if not isinstance(section, dict) else section, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
