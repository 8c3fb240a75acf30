"""Stage cache-targets: run the fused teacher once and store its targets (writer.py); read them
back while training (reader.py, which also holds the format both sides share)."""

from .reader import DTYPES, CacheError, TargetCache, encode_targets
from .writer import cache_targets

__all__ = ["CacheError", "TargetCache", "DTYPES", "encode_targets", "cache_targets"]
