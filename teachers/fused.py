"""The fused teacher: N frozen upstreams -> aligned, normalised, fused per-layer targets.

Pipeline for a batch of 16 kHz waveforms:
1. every upstream returns its hidden states (L_i + 1, B, T_i, D_i), never seeing padding;
2. layers are interpolated to the largest count L, frames to the requested per-item count;
3. each upstream is layer-normalised over D (no affine) so feature scales combine fairly;
4. the N models are concatenated on features: `features()` -> (L, B, T, sum D_i);
5. `project()` gives Z (L, B, T, D_f) by the target mode: `chconv` a Linear(sum D_i -> D_f)
   fitted by PCA or supervised training, `concat` the concatenation itself, `average` the mean
   over upstreams (equal widths);
6. targets are Z at `target_layer_ids`, optionally plus the interface output over Z.

Fusion names the interface over Z: `weighted_sum` -> WeightedSum; `hconv`, `chconv`,
`add_hconv` -> HConv. `chconv` (CHConv = projection + HConv) requires target_mode `chconv`;
`add_hconv` (AddHConv = sum + HConv) requires target_mode `average`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .align import WAV2VEC_RECEPTIVE_FIELD, align_frames, align_layers
from .inputs import FrameSpec, Waveforms, as_waveform_list, frame_mask, iter_batches, resolve_frame_counts
from .interfaces import HConv, WeightedSum
from .pca import BALANCES, LOW_RETENTION, CovarianceAccumulator, retained_variance
from .upstream import SAMPLING_RATE, Upstream, UpstreamOutput, WhisperUpstream, load_upstream, resolve_dtype

__all__ = ["canonical_spec", "read_saved_config", "FusedTeacher", "TeacherOutput", "CONFIG_NAME", "WEIGHTS_NAME", "CHOICES"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "fused_teacher.json"
WEIGHTS_NAME = "fusion.safetensors"
# The allowed values of each string setting; distill's recipe check reads the same table.
CHOICES = {
    "fusion": ("weighted_sum", "hconv", "chconv", "add_hconv"),
    "projection_fit": ("pca", "supervised", "none"),
    "target_mode": ("chconv", "concat", "average"),
    "projection_balance": BALANCES,
    "position_reference": ("none", "silence"),
}
_DEFAULTS = dict(
    fusion="chconv", projection_dim=768, projection_fit="pca", target_layers=None, normalize=True,
    dtype="float32", target_mode="chconv", include_interface_output=False, projection_balance="none",
    position_reference="none",
)
_RECIPE_ONLY = ("pretrained", "pca_max_utterances")  # recipe keys that are not teacher structure
# Keys that define what the saved fusion weights mean; a pretrained folder must agree on them.
_WEIGHT_KEYS = ("fusion", "projection_dim", "target_mode", "normalize")


@dataclass
class TeacherOutput:
    """Distillation targets for a batch.

    layers: (K, B, T, D_f) float32 fused features at `target_layer_ids`; zeros beyond lengths.
    lengths: (B,) int64 valid frames per utterance.
    output: (B, T, D_out) interface output, or None unless include_interface_output.
    """

    layers: torch.Tensor
    lengths: torch.Tensor
    output: Optional[torch.Tensor] = None

    @property
    def frame_mask(self) -> torch.Tensor:
        """(B, T) bool, True on valid frames."""
        return frame_mask(self.lengths, self.layers.shape[2], self.layers.device)


class FusedTeacher(nn.Module):
    """Frozen upstreams plus the fusion (projection and interface) that turns them into targets.

    `fitted` says whether the weights the targets depend on are trained: `fit_pca` or a
    supervised fitter (which sets it) must run before `targets` when a projection is used.
    """

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        fusion: str = "chconv",
        projection_dim: Optional[int] = 768,
        projection_fit: str = "pca",
        target_layers: Optional[Sequence[int]] = None,
        normalize: bool = True,
        target_mode: str = "chconv",
        include_interface_output: bool = False,
        specs: Optional[Sequence[Any]] = None,
        projection_balance: str = "none",
        position_reference: str = "none",
    ):
        super().__init__()
        _check_settings(fusion, projection_fit, target_mode, include_interface_output, projection_balance, position_reference)
        # silence: Whisper upstreams subtract their silent-window response (WhisperUpstream), so
        # targets do not depend on where an utterance sits in the 30 s window; others have no
        # absolute positions and are unchanged.
        self.position_reference = position_reference
        for upstream in upstreams:
            if isinstance(upstream, WhisperUpstream):
                upstream.subtract_silence = position_reference == "silence"
        self.upstreams = nn.ModuleList(upstreams)
        self.specs = [canonical_spec(s) for s in specs] if specs is not None else [u.name for u in upstreams]
        self.dims = [u.hidden_size for u in upstreams]
        self.num_aligned_layers = max(u.num_layers + 1 for u in upstreams)
        self.fusion, self.projection_fit, self.target_mode = fusion, projection_fit, target_mode
        self.projection_dim, self.normalize = projection_dim, bool(normalize)
        self.include_interface_output = bool(include_interface_output)
        self.projection_balance = projection_balance
        # What fit_pca measured (per-upstream retained variance); saved and loaded with the weights.
        self.projection_report: Optional[dict] = None
        self.target_dim = self._resolve_target_dim()
        self.target_layer_ids = _target_layer_ids(target_layers, self.num_aligned_layers)
        # Fixed seed: an unfitted teacher is the same in every process (hashes, tests).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.projection = nn.Linear(sum(self.dims), self.target_dim) if target_mode == "chconv" else None
            interface = WeightedSum if fusion == "weighted_sum" else HConv
            self.interface = interface(self.num_aligned_layers, self.target_dim)
        # Nothing to fit without a projection, unless the targets include a trainable HConv output.
        self.fitted = self.projection is None and not (self.include_interface_output and fusion != "weighted_sum")

    # ----------------------------------------------------------------- construction
    def _resolve_target_dim(self) -> int:
        names = [u.name for u in self.upstreams]
        if self.target_mode == "concat":
            return sum(self.dims)
        if self.target_mode == "average":
            if len(set(self.dims)) > 1:
                raise ValueError(f"FusedTeacher: target_mode=average needs equal widths, got {dict(zip(names, self.dims))}")
            return self.dims[0]
        if not self.projection_dim or self.projection_dim > sum(self.dims):
            raise ValueError(
                f"FusedTeacher: projection_dim={self.projection_dim} must be in 1..{sum(self.dims)} "
                f"(the concatenated width of {', '.join(names)})"
            )
        return int(self.projection_dim)

    @classmethod
    def from_config(cls, config: Any, progress: Optional[Callable[[str], None]] = None) -> "FusedTeacher":
        """Build from the recipe's `teacher:` section (a mapping or a dataclass).

        `pretrained` (a folder from save_pretrained) loads fitted fusion weights; the upstream
        specs of `config` are used, so moved model folders still work. `progress` receives one
        line per upstream; without it a tqdm bar is shown on an interactive stderr.
        """
        cfg = _plain(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config)
        if not isinstance(cfg, dict) or not cfg.get("upstreams"):
            raise ValueError("FusedTeacher.from_config: expected a mapping with a non-empty 'upstreams' list")
        pretrained = cfg.get("pretrained")
        unknown = sorted(set(cfg) - set(_DEFAULTS) - {"upstreams", *_RECIPE_ONLY})
        if unknown:
            raise ValueError(f"FusedTeacher.from_config: unknown key(s) {', '.join(unknown)}; expected {', '.join(_DEFAULTS)}")
        settings = {**_DEFAULTS, **{k: v for k, v in cfg.items() if k in _DEFAULTS}}
        dtype = resolve_dtype(settings.pop("dtype"))
        # Fail on a bad recipe before spending minutes loading upstreams.
        _check_settings(settings["fusion"], settings["projection_fit"], settings["target_mode"],
                        settings["include_interface_output"], settings["projection_balance"],
                        settings["position_reference"])
        upstreams = _load_upstreams(cfg["upstreams"], dtype, progress)
        teacher = cls(upstreams, specs=cfg["upstreams"], **settings)
        if pretrained:
            teacher.load_fusion(pretrained)
        return teacher

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], progress: Optional[Callable[[str], None]] = None) -> "FusedTeacher":
        """Load a teacher written by `save_pretrained` (upstreams are loaded from their specs)."""
        saved = _read_saved(folder)
        teacher = cls.from_config(saved["config"], progress=progress)
        teacher.load_fusion(folder)
        return teacher

    # ----------------------------------------------------------------- describing
    @property
    def projection_parameters(self) -> int:
        return 0 if self.projection is None else sum(p.numel() for p in self.projection.parameters())

    @property
    def device(self) -> torch.device:
        return self.upstreams[0].device

    @property
    def min_samples(self) -> int:
        """Shortest audio every upstream accepts that also gives one frame on the wav2vec grid."""
        return max(WAV2VEC_RECEPTIVE_FIELD, *(u.min_samples for u in self.upstreams))

    @property
    def config(self) -> dict:
        """JSON-able description: upstream specs (hub id, absolute folder or config) + fusion."""
        return {
            "upstreams": list(self.specs),
            "fusion": self.fusion,
            "projection_dim": self.projection_dim,
            "projection_fit": self.projection_fit,
            "target_layers": list(self.target_layer_ids),
            "normalize": self.normalize,
            "dtype": "bfloat16" if self.upstreams[0].dtype == torch.bfloat16 else "float32",
            "target_mode": self.target_mode,
            "include_interface_output": self.include_interface_output,
            "projection_balance": self.projection_balance,
            # Only when set: teachers saved (and target caches hashed) before the option existed keep their hash.
            **({"position_reference": self.position_reference} if self.position_reference != "none" else {}),
        }

    def fusion_state_dict(self) -> dict[str, torch.Tensor]:
        """Projection and interface weights (what save_pretrained writes), on the CPU."""
        modules = {"projection": self.projection, "interface": self.interface}
        return {
            f"{prefix}.{key}": value.detach().cpu().contiguous()
            for prefix, module in modules.items() if module is not None
            for key, value in module.state_dict().items()
        }

    def config_hash(self) -> str:
        """sha256 of the canonical JSON config and the fusion weights; stable across processes."""
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True, separators=(",", ":")).encode())
        for key, value in sorted(self.fusion_state_dict().items()):
            digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.float().numpy().tobytes())
        return digest.hexdigest()

    # ----------------------------------------------------------------- computing
    def features(
        self, waveforms: Waveforms, sampling_rate: int = SAMPLING_RATE, num_frames: FrameSpec = None,
        lengths: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligned, normalised concatenation (L, B, T, sum D_i) and frame lengths (B,)."""
        waves = as_waveform_list(waveforms, sampling_rate, lengths)
        frames = resolve_frame_counts(num_frames, [w.numel() for w in waves])
        return self._fuse([upstream(waves) for upstream in self.upstreams], frames)

    def _fuse(self, outputs: list[UpstreamOutput], frames: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        for out in outputs:
            hidden = align_layers(out.hidden_states, self.num_aligned_layers)
            hidden, frame_lengths = align_frames(hidden, out.lengths, frames)
            if self.normalize:
                hidden = F.layer_norm(hidden, hidden.shape[-1:])
            parts.append(hidden)
        mask = frame_mask(frame_lengths, parts[0].shape[2], parts[0].device)
        return torch.cat(parts, dim=-1) * mask[None, :, :, None], frame_lengths

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(L, B, T, sum D_i) -> Z (L, B, T, D_f) by the target mode."""
        if self.target_mode == "chconv":
            return self.projection(features)
        if self.target_mode == "average":
            return features.unflatten(-1, (len(self.dims), self.dims[0])).mean(dim=-2)
        return features

    def targets(
        self, waveforms: Waveforms, sampling_rate: int = SAMPLING_RATE, num_frames: FrameSpec = None,
        lengths: Optional[torch.Tensor] = None,
    ) -> TeacherOutput:
        """Targets for a list of 1-D waveforms or a padded (B, S) batch with sample `lengths`.

        num_frames: None -> the wav2vec grid of each item; an int; one int per item; or a
        callable num_samples -> frames (the student's grid).
        """
        if not self.fitted:
            raise RuntimeError(
                f"FusedTeacher: the fusion weights ({self.projection_fit} fit) are not fitted; run fit_pca(...), "
                "a supervised fit, or load a fitted teacher (from_pretrained / pretrained=)"
            )
        with torch.no_grad():
            features, frame_lengths = self.features(waveforms, sampling_rate, num_frames, lengths)
            z = self.project(features)
            mask = frame_mask(frame_lengths, z.shape[2], z.device)
            z = z * mask[None, :, :, None]  # the projection bias would fill padded frames
            output = self.interface(z) * mask[:, :, None] if self.include_interface_output else None
            layers = z[list(self.target_layer_ids)]
        return TeacherOutput(layers=layers, lengths=frame_lengths, output=output)

    forward = targets

    def fit_pca(
        self, waveforms: Iterable[Any], max_frames: Optional[int] = None, batch_size: int = 8,
        sampling_rate: int = SAMPLING_RATE,
    ) -> float:
        """Fit the projection to the top principal directions of the normalised concatenated
        features (every aligned layer pooled), streaming the audio, balanced between upstreams by
        `projection_balance` (teachers/pca.py). Stops after `max_frames` time frames.

        Returns the share of the concatenation's variance the projection keeps. Per upstream, the
        share of that upstream's own variance kept is in `projection_report` (saved with the
        teacher) and logged; an upstream below LOW_RETENTION (50%) is named in a warning.
        """
        if self.projection is None:
            raise ValueError(f"FusedTeacher.fit_pca: target_mode={self.target_mode} has no projection to fit")
        stats, seen = CovarianceAccumulator(sum(self.dims)), 0
        for batch in iter_batches(waveforms, batch_size):
            features, frame_lengths = self.features(batch, sampling_rate)
            for b, n in enumerate(frame_lengths.tolist()):
                n = n if max_frames is None else min(n, max_frames - seen)
                stats.update(features[:, b, :n].reshape(-1, features.shape[-1]))
                seen += n
            if max_frames is not None and seen >= max_frames:
                break
        weight, bias = stats.principal_projection(self.target_dim, self.dims, self.projection_balance)
        with torch.no_grad():
            self.projection.weight.copy_(weight)
            self.projection.bias.copy_(bias)
        # Under projection_fit=supervised PCA is only an initialisation; training still has to run.
        self.fitted = self.fitted or self.projection_fit == "pca"
        self.projection_report = self._projection_report(stats, weight)
        _log_projection_report(self.projection_report)
        return self.projection_report["explained_variance"]

    def _projection_report(self, stats: CovarianceAccumulator, weight: torch.Tensor) -> dict:
        covariance = stats.covariance().cpu()
        kept, total = retained_variance(covariance, weight, self.dims)
        variances = [float(b.sum()) for b in torch.split(torch.diagonal(covariance), self.dims)]
        rows = [{"upstream": u.name, "width": d, "variance_share": v / max(sum(variances), 1e-300), "kept": k}
                for u, d, v, k in zip(self.upstreams, self.dims, variances, kept)]
        return {"fit": "pca", "balance": self.projection_balance, "projection_dim": self.target_dim,
                "frames": stats.count, "explained_variance": total, "threshold": LOW_RETENTION, "upstreams": rows}

    # ----------------------------------------------------------------- saving
    def save_pretrained(self, folder: Union[str, Path]) -> Path:
        """Write fused_teacher.json (config) and fusion.safetensors (projection + interface)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        record = {"format": "fusion-distill/fused-teacher", "version": 1, "fitted": self.fitted, "config": self.config,
                  "projection_report": self.projection_report}
        (folder / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        save_file(self.fusion_state_dict(), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        return folder

    def load_fusion(self, folder: Union[str, Path]) -> None:
        """Load projection and interface weights saved by save_pretrained; shapes must match."""
        saved = _read_saved(folder)
        clashes = [k for k in _WEIGHT_KEYS if saved["config"].get(k) != self.config[k]]
        if clashes:
            diff = ", ".join(f"{k}: saved {saved['config'].get(k)!r} vs {self.config[k]!r}" for k in clashes)
            raise ValueError(f"FusedTeacher: {folder} was fitted for another fusion ({diff})")
        weights, expected = load_file(str(Path(folder) / WEIGHTS_NAME)), self.fusion_state_dict()
        wrong = sorted(k for k in set(weights) | set(expected) if k not in weights or k not in expected
                       or weights[k].shape != expected[k].shape)
        if wrong:
            raise ValueError(f"FusedTeacher: {folder}/{WEIGHTS_NAME} does not match this teacher at {', '.join(wrong)}")
        for prefix, module in (("projection", self.projection), ("interface", self.interface)):
            if module is not None:
                module.load_state_dict({k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")})
        self.fitted = bool(saved.get("fitted", True))
        self.projection_report = saved.get("projection_report")


def _log_projection_report(report: dict) -> None:
    parts = ", ".join(f"{_short(row['upstream'])} {row['kept']:.1%}" for row in report["upstreams"])
    logger.info("PCA projection (balance %s) to %d dims keeps %.1f%% of the variance; per upstream: %s",
                report["balance"], report["projection_dim"], 100 * report["explained_variance"], parts)
    for index, row in enumerate(report["upstreams"]):
        if row["kept"] < report["threshold"]:
            logger.warning("PCA projection keeps only %.1f%% of upstream %d (%s)'s own variance (< %.0f%%); its "
                           "features may be squeezed out: try teacher.projection_balance=equal_variance or split, "
                           "or a larger projection_dim", 100 * row["kept"], index, row["upstream"],
                           100 * report["threshold"])


def _short(name: str) -> str:
    # Saved specs hold local folders as absolute paths; their last part names them in a log line.
    return Path(name).name if Path(name).is_absolute() else name


def _check_settings(fusion: str, projection_fit: str, target_mode: str, include_interface_output: bool,
                    projection_balance: str = "none", position_reference: str = "none") -> None:
    settings = dict(fusion=fusion, projection_fit=projection_fit, target_mode=target_mode,
                    projection_balance=projection_balance, position_reference=position_reference)
    for key, value in settings.items():
        if value not in CHOICES[key]:
            raise ValueError(f"FusedTeacher: {key}={value!r}, expected one of {', '.join(CHOICES[key])}")
    if fusion == "chconv" and target_mode != "chconv":
        raise ValueError("FusedTeacher: fusion=chconv projects the concatenation, use target_mode=chconv (or fusion=hconv)")
    if fusion == "add_hconv" and target_mode != "average":
        raise ValueError("FusedTeacher: fusion=add_hconv sums the upstreams, use target_mode=average")
    if target_mode == "chconv" and projection_fit == "none":
        raise ValueError("FusedTeacher: target_mode=chconv needs a fitted projection, use projection_fit=pca|supervised")
    if include_interface_output and fusion != "weighted_sum" and projection_fit != "supervised":
        raise ValueError(
            f"FusedTeacher: include_interface_output with fusion={fusion} needs projection_fit=supervised "
            "(PCA does not train the HConv)"
        )


def read_saved_config(folder: Union[str, Path]) -> dict:
    """The config a FusedTeacher folder was saved with (upstream specs, fusion...), no model loaded."""
    return _read_saved(folder)["config"]


def _read_saved(folder: Union[str, Path]) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"FusedTeacher: {path} not found, expected a folder written by save_pretrained")
    return json.loads(path.read_text())


def _load_upstreams(specs: Sequence[Any], dtype: torch.dtype, progress: Optional[Callable[[str], None]]) -> list[Upstream]:
    if progress is not None:
        loaded = []
        for i, spec in enumerate(specs):
            progress(f"loading upstream {i + 1}/{len(specs)}: {_spec_name(spec)}")
            loaded.append(load_upstream(spec, dtype))
        return loaded
    from tqdm.auto import tqdm

    return [load_upstream(s, dtype) for s in tqdm(specs, desc="loading upstreams", unit="model", disable=None)]


def _spec_name(spec: Any) -> str:
    from .custom import is_custom_spec, spec_name

    if is_custom_spec(spec):
        return spec_name(spec)
    return f"{spec['config'].get('model_type')}(random-init)" if isinstance(spec, dict) and "config" in spec else str(spec)


def canonical_spec(spec: Any) -> Any:
    """An upstream spec as saved: JSON-able; local folders absolute."""
    # Local folders become absolute so a saved teacher loads from any working directory.
    if isinstance(spec, (str, Path)):
        return str(Path(spec).resolve()) if Path(spec).is_dir() else str(spec)
    return json.loads(json.dumps(_plain(spec)))


def _plain(value: Any) -> Any:
    """Nested mappings/sequences (OmegaConf containers, tuples) -> dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _target_layer_ids(target_layers: Optional[Sequence[int]], num_layers: int) -> tuple[int, ...]:
    if target_layers is None:
        # DistilHuBERT's 4/8/12 of 13: three evenly spaced layers, never the front-end output.
        return tuple(sorted({max(1, round(k * (num_layers - 1) / 3)) for k in (1, 2, 3)}))
    ids = tuple(int(i) for i in target_layers)
    if not ids or any(not 0 <= i < num_layers for i in ids):
        raise ValueError(f"FusedTeacher: target_layers={list(ids)}, expected indices in 0..{num_layers - 1}")
    return ids
