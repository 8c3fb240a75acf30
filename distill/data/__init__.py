"""Stage data: audio decoding (audio.py), sources (sources.py: hub id, folder, manifest) and the
padding-free training / eval batches (loader.py)."""

from .audio import BadAudio, SkipCounter, crop_length, decode_audio
from .loader import LengthBucketSampler, make_eval_batches, make_train_dataloader, rank_share
from .sources import DataError, load_audio_dataset

__all__ = [
    "BadAudio", "SkipCounter", "crop_length", "decode_audio", "DataError", "load_audio_dataset",
    "LengthBucketSampler", "make_train_dataloader", "make_eval_batches", "rank_share",
]
