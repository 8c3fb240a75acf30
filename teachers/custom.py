"""Upstreams beyond transformers models: built-ins and the user's own frozen torch encoders.

Any frozen encoder joins a teacher as a subclass of `teachers.Upstream` that sets `frame_rate`
(frames per second at 16 kHz) and `min_samples`, passes its layer count and width to
`Upstream.__init__`, and implements `num_frames(num_samples)` and `_encode(waves)` (per
utterance, hidden states (num_layers + 1, T, width)). The base class freezes it, checks the input
and pads the batch; the teacher aligns its layers and frames to the others like any upstream.

A recipe names one by an upstream spec (a mapping):
- `{builtin: ge2e}` (optionally `weights: PATH`): a built-in, no opt-in needed;
- `{code: "package.module:factory", kwargs: {...}}`: `factory(**kwargs)` must return an Upstream.
  This imports and runs the user's Python code, so it is refused unless the caller trusts it
  (`fusion-distill --trust-upstream-code ...`, or `trust_upstream_code()` in Python), as
  transformers refuses `trust_remote_code` by default.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from .base import Upstream

__all__ = ["BUILTINS", "is_custom_spec", "load_custom_upstream", "trust_upstream_code", "spec_name"]

_TRUSTED = False


def _ge2e(name: str, weights: Any = None):
    from .ge2e import GE2EUpstream, load_ge2e

    return GE2EUpstream(load_ge2e(weights), name)


# name -> factory(display name, **spec options)
BUILTINS: dict[str, Callable[..., Any]] = {"ge2e": _ge2e}


def trust_upstream_code(trusted: bool = True) -> None:
    """Allow (or forbid again) upstream specs that import the user's code, for this process."""
    global _TRUSTED
    _TRUSTED = bool(trusted)


def is_custom_spec(spec: Any) -> bool:
    return isinstance(spec, dict) and ("builtin" in spec or "code" in spec)


def spec_name(spec: dict) -> str:
    """How logs and reports name a custom upstream: `ge2e`, `ge2e(/path)`, `pkg.mod:factory`."""
    if "builtin" in spec:
        return str(spec["builtin"]) + (f"({Path(str(spec['weights'])).name})" if spec.get("weights") else "")
    return str(spec["code"])


def load_custom_upstream(spec: dict):
    """The Upstream a `{builtin: ...}` or `{code: ...}` spec names (see module docstring)."""
    if "builtin" in spec:
        unknown = sorted(set(spec) - {"builtin", "weights"})
        if unknown or spec["builtin"] not in BUILTINS:
            raise ValueError(f"upstream spec {spec!r}: expected builtin one of {', '.join(BUILTINS)} "
                             f"with optional `weights`{'; unknown key(s) ' + ', '.join(unknown) if unknown else ''}")
        return BUILTINS[spec["builtin"]](spec_name(spec), spec.get("weights"))
    if not _TRUSTED:
        raise PermissionError(f"upstream spec code={spec['code']!r} imports and runs your Python code; "
                              "pass --trust-upstream-code (Python: teachers.trust_upstream_code()) if you trust it")
    module_name, _, attr = str(spec["code"]).partition(":")
    if not module_name or not attr:
        raise ValueError(f"upstream spec code={spec['code']!r}: expected 'package.module:factory'")
    factory = getattr(importlib.import_module(module_name), attr, None)
    if not callable(factory):
        raise ValueError(f"upstream spec code={spec['code']!r}: {module_name} has no callable {attr!r}")
    upstream = factory(**dict(spec.get("kwargs") or {}))
    if not isinstance(upstream, Upstream):
        raise TypeError(f"upstream spec code={spec['code']!r}: returned {type(upstream).__name__}, expected a teachers.Upstream")
    upstream.name = upstream.name or spec_name(spec)
    return upstream
