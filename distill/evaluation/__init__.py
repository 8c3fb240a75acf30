"""Stage evaluate: prediction similarity, SUPERB-style probes and cost of a student against its
fused teacher (suite.py), with the probe machinery (probe.py), metrics, cost and the report's
tables and plots. Names are imported on use (the suite loads transformers and ONNX helpers)."""

from importlib import import_module

__all__ = ["evaluate", "format_report", "DEFAULT_PROBE_TASKS", "run_probe", "run_probes", "ProbeTask", "measure_jobs"]

_HOME = {"evaluate": "suite", "format_report": "plots", "DEFAULT_PROBE_TASKS": "suite", "run_probe": "probe",
         "run_probes": "probe", "ProbeTask": "tasks", "measure_jobs": "cost"}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
