"""Synthesise the benchmark corpus with espeak-ng: four labelled tasks on the same audio.

Every utterance is one sentence of random words of one language, spoken by one speaker (voice
variant + base pitch) in one style (speed, pitch range, amplitude); with `pitch_jitter` /
`speed_jitter` the pitch and speed also vary per utterance around the speaker's and style's. Labels, all in metadata.csv
beside the audio, in the layout the project's data layer reads (`data.dataset_name=DIR`):

- `phonemes`: espeak-ng's IPA for the sentence in that language (`-x --ipa`), for CTC / PER;
- `speaker`, `language`, `style`: utterance classes, for accuracy;
- `text`: the words, `split`: train | dev | test.

Speaker, language and style are drawn from a seeded, balanced cycle over their cross product,
so every class is seen in training and the three labels are independent of each other.
Sentences never repeat (across splits either): no test text is heard in training. The same config
gives byte-identical files with the same espeak-ng build.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .config import HERE, CorpusConfig, config_hash

logger = logging.getLogger(__name__)

SAMPLING_RATE = 16000
WORDS_DIR = HERE / "words"
SPLITS = ("train", "dev", "test")
COLUMNS = ["file_name", "split", "text", "phonemes", "speaker", "language", "style"]
DONE = "corpus.json"


class EspeakMissing(RuntimeError):
    pass


def check_espeak() -> str:
    """The espeak-ng version line, or one line saying how to install it."""
    if shutil.which("espeak-ng") is None:
        raise EspeakMissing("espeak-ng is not installed: the benchmark synthesises its corpus with it "
                            "(Debian/Ubuntu: apt-get install espeak-ng; macOS: brew install espeak-ng)")
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[0]


def read_words(language: str) -> list[str]:
    path = WORDS_DIR / f"{language}.txt"
    if not path.exists():
        raise FileNotFoundError(f"no word source for language {language!r}: expected {path}")
    words = [w for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#") for w in line.split()]
    if len(words) < 20:
        raise ValueError(f"{path}: {len(words)} words, expected at least 20")
    return words


def plan(cfg: CorpusConfig) -> list[dict]:
    """Every utterance's labels and words, before any audio: a pure function of the config."""
    rng = np.random.default_rng(cfg.seed)
    words = {lang: read_words(lang) for lang in cfg.languages}
    speakers = [f"{s.variant}-p{s.pitch}" for s in cfg.speakers]
    combos = list(itertools.product(range(len(speakers)), cfg.languages, sorted(cfg.styles)))
    rows, seen = [], set()
    for split in SPLITS:
        count = getattr(cfg, split)
        cycle = []
        while len(cycle) < count:  # balanced: each pass visits every combination once, shuffled
            cycle.extend(combos[i] for i in rng.permutation(len(combos)))
        for i, (spk, lang, style) in enumerate(cycle[:count]):
            low, high = cfg.words_per_sentence
            while True:
                text = " ".join(rng.choice(words[lang], size=int(rng.integers(low, high + 1))))
                if (lang, text) not in seen:
                    seen.add((lang, text))
                    break
            row = {"file_name": f"audio/{split}/{split}{i:05d}.flac", "split": split, "text": text,
                   "speaker": speakers[spk], "language": lang, "style": style, "_speaker_index": spk}
            if cfg.pitch_jitter or cfg.speed_jitter:  # drawn only when asked: older corpora stay byte-identical
                row["_pitch_shift"] = int(rng.integers(-cfg.pitch_jitter, cfg.pitch_jitter + 1))
                row["_speed_factor"] = float(1 + rng.uniform(-cfg.speed_jitter, cfg.speed_jitter))
            rows.append(row)
    return rows


def _synthesise(row: dict, cfg: CorpusConfig, out: Path, workdir: Path) -> dict:
    speaker = cfg.speakers[row["_speaker_index"]]
    style = cfg.styles[row["style"]]
    voice = f"{row['language']}+{speaker.variant}"
    wav = workdir / (Path(row["file_name"]).stem + ".wav")
    ssml = f'<speak><prosody range="{style.range}">{row["text"]}</prosody></speak>'
    pitch = min(99, max(0, speaker.pitch + row.get("_pitch_shift", 0)))
    speed = round(style.speed * row.get("_speed_factor", 1.0))
    subprocess.run(["espeak-ng", "-m", "-v", voice, "-p", str(pitch), "-s", str(speed),
                    "-a", str(style.amplitude), "-w", str(wav), ssml], check=True, capture_output=True)
    audio, rate = sf.read(wav, dtype="float32", always_2d=True)
    wav.unlink()
    wave = np.clip(soxr.resample(audio.mean(axis=1), rate, SAMPLING_RATE, quality="HQ"), -1.0, 1.0)
    ipa = subprocess.run(["espeak-ng", "-q", "-x", "--ipa", "-v", row["language"], row["text"]],
                         check=True, capture_output=True, text=True).stdout
    path = out / row["file_name"]
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, SAMPLING_RATE, format="FLAC", subtype="PCM_16")
    row = {k: v for k, v in row.items() if not k.startswith("_")}
    return {**row, "phonemes": " ".join(ipa.split()), "seconds": len(wave) / SAMPLING_RATE}


def corpus_identity(cfg: CorpusConfig) -> dict:
    """The config fields a corpus depends on; jitter only when used, so corpora made before it
    existed keep their hash (and their cached upstreams)."""
    return {k: v for k, v in asdict(cfg).items() if not (k in ("pitch_jitter", "speed_jitter") and not v)}


def build_corpus(cfg: CorpusConfig, out: Path, workers: int = 2) -> dict:
    """Write the corpus to `out` (skipped when `out` already holds this config's corpus)."""
    out = Path(out)
    digest = config_hash(corpus_identity(cfg) | {"words": {lang: read_words(lang) for lang in cfg.languages}})
    done = out / DONE
    if done.exists() and json.loads(done.read_text()).get("hash") == digest:
        logger.info("corpus %s is up to date (config %s)", out, digest)
        return json.loads(done.read_text())
    version = check_espeak()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rows = plan(cfg)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(lambda r: _synthesise(r, cfg, out, Path(tmp)), rows))
    too_long = [r for r in rows if not cfg.min_seconds <= r["seconds"] <= cfg.max_seconds]
    with open(out / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    seconds = [r["seconds"] for r in rows]
    summary = {
        "hash": digest, "espeak": version, "utterances": {s: sum(r["split"] == s for r in rows) for s in SPLITS},
        "minutes": round(sum(seconds) / 60, 1), "seconds_range": [round(min(seconds), 2), round(max(seconds), 2)],
        "outside_duration_range": len(too_long), "speakers": len(cfg.speakers), "languages": len(cfg.languages),
        "styles": len(cfg.styles), "metadata_sha256": hashlib.sha256((out / "metadata.csv").read_bytes()).hexdigest(),
    }
    done.write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("corpus: %d utterances, %.1f min of audio in %s (%d outside %.1f-%.1f s, dropped by the data layer)",
                len(rows), summary["minutes"], out, len(too_long), cfg.min_seconds, cfg.max_seconds)
    return summary
