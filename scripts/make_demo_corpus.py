"""Synthesise the committed demo corpus (data/demo/) with espeak-ng.

Forty short English sentences, each spoken once by one of four espeak-ng voices (ten per
voice, so the voice is a balanced 4-class utterance label), resampled 22.05 kHz -> 16 kHz
with soxr and written as mono 16-bit FLAC. `metadata.csv` lists file_name, text, phonemes
(espeak-ng IPA for that voice), label (the voice) and split (8 train + 2 dev per voice).

The committed files were made on Debian with espeak-ng 1.51, soxr 1.1 and libsndfile 1.2.2:

    . .venv/bin/activate
    python scripts/make_demo_corpus.py            # writes data/demo/{audio/*.flac,metadata.csv}

Speed and pitch are fixed per voice, so reruns with the same espeak-ng build give the same
audio. The script refuses to write a clip outside 1.5-4.0 s rather than silently shipping one.
"""

from __future__ import annotations

import argparse
import csv
import logging
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

log = logging.getLogger("make_demo_corpus")

ROOT = Path(__file__).resolve().parent.parent
SAMPLING_RATE = 16000
MIN_SECONDS, MAX_SECONDS = 1.5, 4.0
DEV_FROM = 32  # sentences 32..39 are dev: with voices cycling every 4, that is 2 per voice

# (voice, words per minute, pitch 0-99): distinct speed and pitch make the label learnable.
VOICES = [
    ("en-us", 160, 50),
    ("en+m3", 150, 35),
    ("en+f2", 165, 70),
    ("en-gb-x-rp", 175, 50),
]

# Lowercase, no punctuation: the text column doubles as a character-CTC target. Short, medium
# and long sentences are spread over the voices and splits so length bucketing has work to do.
SENTENCES = [
    "the kettle is singing again",
    "please close the window before it rains",
    "a small boat drifted slowly toward the shore",
    "my sister plays the violin every evening after school",
    "the old clock in the hall stopped at noon",
    "turn left after the second bridge and follow the river",
    "we bought some fresh bread",
    "he painted the fence a bright shade of green",
    "she found a silver key under the mat by the back door",
    "our train leaves at half past seven",
    "the garden smells of mint after the rain",
    "the children counted the stars",
    "the library opens early on saturdays",
    "bring a warm woollen coat",
    "a gentle wind moved the tall grass along the edge of the field",
    "the soup needs a little more salt",
    "they planted three apple trees",
    "the meeting was moved to thursday morning",
    "a red kite circled high above the valley while the farmer worked",
    "keep the receipt in case the shoes do not fit",
    "the cat sleeps on the warm windowsill when the sun is out",
    "he forgot his umbrella on the bus",
    "the river runs quite fast",
    "we watched the sunset from the harbour wall",
    "write your name at the top of the page",
    "the lamp flickered for a moment and then the house went dark",
    "four ducks swam across the frozen pond",
    "the baker starts work early",
    "she tuned the old piano by ear",
    "pour the milk in slowly",
    "a parcel arrived for you this morning",
    "the path climbs steeply through the pine woods before it reaches the lake",
    "the fox crossed the road",
    "he whistled a cheerful tune while he fixed his bike",
    "the museum has a room full of maps",
    "the snow melted by the end of the week",
    "we shared a pot of tea by the fire and talked until late",
    "the ship sounded its horn in the fog",
    "please leave the door open",
    "the market is busy on friday afternoons",
]


def synthesise(sentence: str, voice: str, speed: int, pitch: int, workdir: Path) -> np.ndarray:
    """espeak-ng -> 22.05 kHz int16 wav -> float32 16 kHz mono."""
    wav_path = workdir / "utt.wav"
    cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav_path), sentence]
    subprocess.run(cmd, check=True)
    audio, rate = sf.read(wav_path, dtype="float32", always_2d=True)
    return soxr.resample(audio.mean(axis=1), rate, SAMPLING_RATE, quality="HQ")


def phonemise(sentence: str, voice: str) -> str:
    """IPA for this voice's accent; espeak breaks long clauses over lines, so join them."""
    cmd = ["espeak-ng", "-v", voice, "-q", "-x", "--ipa", sentence]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return " ".join(out.split())


def build(out_dir: Path) -> list[dict]:
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    for stale in audio_dir.glob("*.flac"):  # a rerun must not leave orphans from older lists
        stale.unlink()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, sentence in enumerate(SENTENCES):
            voice, speed, pitch = VOICES[i % len(VOICES)]
            wave = synthesise(sentence, voice, speed, pitch, Path(tmp))
            seconds = len(wave) / SAMPLING_RATE
            if not MIN_SECONDS <= seconds <= MAX_SECONDS:
                raise SystemExit(f"sentence {i} lasts {seconds:.2f} s with {voice}, outside {MIN_SECONDS}-{MAX_SECONDS} s")
            name = f"audio/utt{i:02d}_{voice.replace('+', '-')}.flac"
            # espeak's loudest samples sit at full scale and resampling overshoots them a little:
            # clip, or the int16 conversion would wrap around.
            wave = np.clip(wave, -1.0, 1.0)
            sf.write(out_dir / name, wave, SAMPLING_RATE, format="FLAC", subtype="PCM_16", compression_level=1.0)
            rows.append(
                dict(
                    file_name=name,
                    text=sentence,
                    phonemes=phonemise(sentence, voice),
                    label=voice,
                    split="dev" if i >= DEV_FROM else "train",
                    seconds=seconds,
                )
            )
    return rows


def write_metadata(rows: list[dict], out_dir: Path) -> None:
    columns = ["file_name", "text", "phonemes", "label", "split"]
    with open(out_dir / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "demo", help="corpus folder (default: data/demo)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = build(args.out)
    write_metadata(rows, args.out)
    seconds = np.array([r["seconds"] for r in rows])
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    log.info(
        "wrote %d utterances to %s: %.1f s total, %.2f-%.2f s each, %.0f kB on disk",
        len(rows), args.out, seconds.sum(), seconds.min(), seconds.max(), size / 1024,
    )


if __name__ == "__main__":
    main()
