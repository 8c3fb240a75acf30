"""Export the student encoder as a plain Hugging Face model folder, and upload that folder.

The folder holds config.json (native model_type), model.safetensors, preprocessor_config.json
(Wav2Vec2FeatureExtractor for raw-waveform students, SeamlessM4TFeatureExtractor for log-mel
ones: students.frontend.make_feature_extractor) and a README.md model card: `AutoModel`,
`AutoModelForCTC` and `AutoModelForAudioClassification` load it with no custom code. The
export is reloaded with plain `AutoModel` and checked key by key before it is returned.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData
from transformers import AutoFeatureExtractor, AutoModel, PreTrainedModel

from .frontend import input_names, is_log_mel, make_feature_extractor, num_frames, padding_invariant

from .onnx import (FP32_TOLERANCE, INT8_FILE, INT8_MIN_COSINE, ONNX_FILE, PARITY_FILE, ParityError, ParityReport,
                   check_parity, export_onnx, quantize_int8, require_onnx, write_parity)

__all__ = ["EXPORT_FILES", "export_student", "push_to_hub", "add_onnx", "files_section", "onnx_section"]

EXPORT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")
SAMPLING_RATE = 16000
_DEFAULT_MODEL_ID = "path/to/this/folder"  # in code blocks when the card names no hub repo
logger = logging.getLogger(__name__)
_TAGS = ["audio", "speech", "feature-extraction", "distillation", "fusion-distill"]
_FILE_NOTES = {
    "config.json": "model configuration (native `model_type`: `AutoModel` loads it)",
    "model.safetensors": "PyTorch weights",
    "preprocessor_config.json": "feature extractor settings (`AutoFeatureExtractor` loads them)",
    "README.md": "this card",
    ONNX_FILE: "ONNX graph, fp32: runs under ONNX Runtime without PyTorch",
    INT8_FILE: "ONNX graph, dynamic int8 (int8 MatMul weights; convolutions stay fp32)",
    PARITY_FILE: "ONNX vs PyTorch parity figures (the table below), machine-readable",
}
# Card blocks the ONNX step rewrites in place; HTML comments do not render on the Hub.
_FILES_BLOCK = ("<!-- fusion-distill:files -->", "<!-- /fusion-distill:files -->")
_ONNX_BLOCK = ("<!-- fusion-distill:onnx -->", "<!-- /fusion-distill:onnx -->")
# card_data keys with their own place in the card; any other key is listed under "Details".
_CARD_KEYS = ("teachers", "fusion", "target_layers", "dataset", "steps", "final_losses", "metrics", "recipe", "repo_id", "license", "model_name")


def export_student(encoder: PreTrainedModel, out_dir: str | Path, card_data: Mapping[str, Any] | None = None) -> Path:
    """Write the encoder (heads are not part of it) as a stock HF folder and verify the reload.

    Args:
        encoder: the student's stock encoder (`DistillStudent.encoder`, unwrapped from Accelerate).
        out_dir: folder to write; created if needed.
        card_data: facts for the model card: teachers (list), fusion, target_layers, dataset,
            steps, final_losses (dict), metrics (dict), recipe (YAML str or dict), and optionally
            repo_id, license, model_name. Other keys are listed as details. The parameter count
            is computed from the encoder.
    Returns:
        The folder.
    """
    if not isinstance(encoder, PreTrainedModel):
        raise TypeError(
            f"export_student: expected a transformers PreTrainedModel (the student's .encoder), got {type(encoder).__name__}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out)
    make_feature_extractor(encoder.config).save_pretrained(out)
    make_model_card(encoder, dict(card_data or {})).save(out / "README.md")
    _verify_export(out, encoder)
    return out


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload fusion-distill student",
) -> str:
    """Create the model repo if needed and upload `folder` (an `export_student` output) as is.

    Returns:
        The repository URL.
    """
    folder = Path(folder)
    missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"push_to_hub: {folder} lacks {', '.join(missing)}; run export_student first")
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    # RepoUrl carries the namespaced id, also when repo_id was given without a namespace.
    api.upload_folder(repo_id=url.repo_id, folder_path=folder, commit_message=commit_message, repo_type="model")
    return str(url)


def make_model_card(encoder: PreTrainedModel, card_data: dict[str, Any]) -> ModelCard:
    """A huggingface_hub ModelCard: metadata, distillation facts, loading and fine-tuning code."""
    metadata = ModelCardData(
        library_name="transformers",
        tags=list(_TAGS),
        license=card_data.get("license"),
        datasets=_hub_dataset(card_data.get("dataset")),
        model_name=card_data.get("model_name"),
    )
    sections = [
        _overview(encoder, card_data),
        _distillation_section(card_data),
        _usage_section(card_data.get("repo_id") or _DEFAULT_MODEL_ID, _batching_note(encoder.config)),
        files_section(EXPORT_FILES),
        _recipe_section(card_data.get("recipe")),
    ]
    body = "\n\n".join(section for section in sections if section)
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{body}\n")


def _hub_dataset(dataset: Any) -> list[str] | None:
    # Only a hub id belongs in the metadata; local folders and manifests are named in the text.
    if isinstance(dataset, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", dataset) and not Path(dataset).exists():
        return [dataset]
    return None


def _overview(encoder: PreTrainedModel, card_data: dict[str, Any]) -> str:
    config = encoder.config
    title = card_data.get("model_name") or card_data.get("repo_id") or f"fusion-distill {config.model_type} student"
    params = sum(p.numel() for p in encoder.parameters())
    return (
        f"# {title}\n\n"
        f"A compact speech encoder distilled with fusion-distill from a fused ensemble of speech foundation "
        f"models. It is a stock `{type(encoder).__name__}` (model_type `{config.model_type}`): it loads with "
        "plain transformers, no custom code.\n\n"
        f"- Parameters: {params:,} ({params / 1e6:.2f}M)\n"
        f"- Layers: {config.num_hidden_layers}, hidden size {config.hidden_size}, "
        f"{config.num_attention_heads} heads, FFN {config.intermediate_size}\n"
        f"- {_front_end(config)}; {SAMPLING_RATE // 320} frames per second of 16 kHz audio"
    )


def _front_end(config: Any) -> str:
    if is_log_mel(config):
        return (f"Log-mel front-end: 80 Kaldi filterbanks every 10 ms stacked by two (`SeamlessM4TFeatureExtractor`), "
                f"Conformer layers with `{config.position_embeddings_type}` positions and depthwise kernel "
                f"{config.conv_depthwise_kernel_size}")
    return f"Conv front-end: {list(config.conv_dim)} channels, `feat_extract_norm={config.feat_extract_norm}`"


def _batching_note(config: Any) -> str:
    if is_log_mel(config):
        return ("Batches: pass the feature extractor's `attention_mask` (features are normalised per utterance, "
                "padding is masked). Distillation counted a final half-filled 20 ms frame as valid, which the "
                "extractor's mask leaves out; the features are the same.")
    if config.feat_extract_norm == "layer":
        return "Batches: pass the feature extractor's `attention_mask` (layer-norm front-end, padding-invariant)."
    return "Batches: this group-norm model was trained without padding; prefer equal-length or single inputs."


def _distillation_section(card_data: dict[str, Any]) -> str:
    lines = ["## Distillation"]
    teachers = card_data.get("teachers")
    if teachers:
        lines.append("\nTeachers (fused):\n")
        lines += [f"- {_describe(teacher)}" for teacher in teachers]
        lines.append("")
    facts = [("Fusion", "fusion"), ("Target layers", "target_layers"), ("Dataset", "dataset"), ("Training steps", "steps")]
    lines += [f"- {label}: {_describe(card_data[key])}" for label, key in facts if card_data.get(key) is not None]
    for title, key in (("Final losses", "final_losses"), ("Metrics", "metrics")):
        if card_data.get(key):
            lines += [f"\n### {title}\n", "| name | value |", "|---|---|"]
            lines += [f"| {name} | {_number(value)} |" for name, value in card_data[key].items()]
    details = {k: v for k, v in card_data.items() if k not in _CARD_KEYS and k != "params"}
    if details:
        lines.append("\n### Details\n")
        lines += [f"- {key}: {_describe(value)}" for key, value in details.items()]
    return "\n".join(lines) if len(lines) > 1 else ""


def _usage_section(model_id: str, mask_note: str) -> str:
    return f"""## How to use

```python
import torch
from transformers import AutoFeatureExtractor, AutoModel

model = AutoModel.from_pretrained("{model_id}")
feature_extractor = AutoFeatureExtractor.from_pretrained("{model_id}")
audio = torch.randn(16000).numpy()  # 1 s of mono 16 kHz audio
inputs = feature_extractor(audio, sampling_rate=16000, return_tensors="pt")
with torch.no_grad():
    outputs = model(**inputs, output_hidden_states=True)
features = outputs.last_hidden_state  # (batch, frames, hidden)
```

{mask_note}

## How to fine-tune

SpecAugment is off in the saved config (distillation does not mask its inputs); turn it on for
fine-tuning as below.

```python
from transformers import AutoModelForAudioClassification, AutoModelForCTC

# Speech recognition: the CTC head is new; vocab_size is your tokenizer's size.
ctc = AutoModelForCTC.from_pretrained(
    "{model_id}", vocab_size=32, ctc_loss_reduction="mean", apply_spec_augment=True, mask_time_prob=0.05
)
# Utterance classification (keyword spotting, speaker, emotion, ...): the classifier head is new.
classifier = AutoModelForAudioClassification.from_pretrained("{model_id}", num_labels=5)
```"""


def files_section(names: Sequence[str]) -> str:
    """The card's "Files" table for `names` (known files described, others listed as is)."""
    rows = [f"| `{name}` | {_FILE_NOTES.get(name, '')} |" for name in names]
    return "\n".join([_FILES_BLOCK[0], "## Files\n", "| file | what |", "|---|---|", *rows, _FILES_BLOCK[1]])


def onnx_section(model_id: str, reports: Sequence[ParityReport], config: Any) -> str:
    """The card's ONNX part: how to run the graph with onnxruntime, and the parity figures."""
    fp32 = reports[0]
    first = input_names(config)[0]
    takes = ("`input_features` (batch, frames, 160; float32, the feature extractor's log-mel filterbanks, which "
             "are computed outside the graph) and `attention_mask` (batch, frames; int64)" if is_log_mel(config) else
             "`input_values` (batch, samples; float32, normalised by the feature extractor) and "
             "`attention_mask` (batch, samples; int64)")
    invariant = padding_invariant(config)
    lines = [
        _ONNX_BLOCK[0], "## ONNX Runtime\n",
        f"`{ONNX_FILE}` takes {takes} and returns `last_hidden_state` and `hidden_state_0` ... "
        "`hidden_state_L` (batch, frames, hidden), as `output_hidden_states=True` does in PyTorch. Batch and "
        "time are dynamic. No PyTorch needed: `pip install onnxruntime transformers`."
        + (f" `{INT8_FILE}` has the same inputs and outputs." if len(reports) > 1 else ""),
        "",
        _onnx_code(model_id, first),
        "",
        "Group-norm front-end: run utterances one by one (an all-ones mask)." if not invariant else
        "Batches: pad with the feature extractor and pass its `attention_mask`.",
        "\n### Parity with PyTorch\n",
        f"Every output compared with the PyTorch model on {len(fp32.lengths)} utterances ({fp32.source}; "
        f"{min(fp32.lengths) / 16000:.2f}-{max(fp32.lengths) / 16000:.2f} s), each alone"
        + (" and all in one zero-padded batch" if fp32.padded_batch else "") + ", valid frames only; "
        "cosine = mean per-frame cosine similarity.\n",
        "| file | max abs difference | mean cosine | worst output's cosine | check |",
        "|---|---:|---:|---:|---|",
    ]
    for r in reports:
        check = (f"max abs <= {r.tolerance:g}" if r.tolerance is not None else f"cosine >= {r.min_cosine:g}")
        lines.append(f"| `{r.file}` | {r.max_abs:.2e} | {r.mean_cosine:.5f} | {r.worst_cosine:.5f} | "
                     f"{check}: {'passed' if r.passed else 'FAILED'} |")
    lines.append(_ONNX_BLOCK[1])
    return "\n".join(lines)


def _onnx_code(model_id: str, first_input: str) -> str:
    local = model_id == _DEFAULT_MODEL_ID
    fetch = (f'onnx_path = "{model_id}/{ONNX_FILE}"' if local else
             f'onnx_path = hf_hub_download("{model_id}", "{ONNX_FILE}")  # or "{INT8_FILE}"')
    return f"""```python
import numpy as np
import onnxruntime as ort
{"" if local else "from huggingface_hub import hf_hub_download" + chr(10)}from transformers import AutoFeatureExtractor

{fetch}
session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
feature_extractor = AutoFeatureExtractor.from_pretrained("{model_id}")
audio = np.random.randn(16000).astype(np.float32)  # 1 s of mono 16 kHz audio
inputs = feature_extractor(audio, sampling_rate=16000, return_tensors="np", return_attention_mask=True)
last_hidden_state, *hidden_states = session.run(None, {{
    "{first_input}": inputs["{first_input}"].astype(np.float32),
    "attention_mask": inputs["attention_mask"].astype(np.int64),
}})
```"""


def add_onnx(
    folder: str | Path,
    encoder: PreTrainedModel,
    waveforms: Sequence[torch.Tensor],
    source: str,
    quantize: str | None = None,
    repo_id: str | None = None,
) -> list[ParityReport]:
    """Put `model.onnx` (and with quantize="int8" `model_int8.onnx`) beside an exported folder's
    HF files, check both against `encoder` on `waveforms` (raw 16 kHz, several lengths; `source`
    says where they come from), write onnx_parity.json and the card's Files and ONNX sections.

    Raises ParityError (one line) and leaves no graph behind when the fp32 graph is off by more
    than FP32_TOLERANCE on any output. An int8 graph below INT8_MIN_COSINE is kept and reported
    (a warning and "FAILED" in the card): its cost in task score is for the user to weigh.
    """
    require_onnx()
    if quantize not in (None, "int8"):
        raise ValueError(f"add_onnx: quantize={quantize!r}, expected None or 'int8'")
    folder = Path(folder)
    for stale in (ONNX_FILE, INT8_FILE, PARITY_FILE):  # a previous export's graphs must not outlive it
        (folder / stale).unlink(missing_ok=True)
    fp32_path = export_onnx(encoder, folder / ONNX_FILE)
    fp32 = check_parity(encoder, fp32_path, waveforms, source=source, tolerance=FP32_TOLERANCE)
    if not fp32.passed:
        fp32_path.unlink()  # never leave a wrong graph where push_to_hub would upload it
        raise ParityError(f"ONNX export refused: fp32 graph differs from PyTorch by {fp32.max_abs:.2e} "
                          f"(> {FP32_TOLERANCE:g}) on {len(fp32.lengths)} utterances ({source})")
    reports = [fp32]
    if quantize == "int8":
        int8 = check_parity(encoder, quantize_int8(fp32_path, folder / INT8_FILE), waveforms, source=source,
                            min_cosine=INT8_MIN_COSINE)
        if not int8.passed:
            logger.warning("int8 graph below cosine %g: %s", INT8_MIN_COSINE, int8.summary())
        reports.append(int8)
    write_parity(folder, reports)
    card_path = folder / "README.md"
    text = card_path.read_text() if card_path.is_file() else ""
    present = [name for name in _FILE_NOTES if (folder / name).is_file()]
    present += sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in _FILE_NOTES)
    blocks = files_section(present) + "\n\n" + onnx_section(repo_id or _DEFAULT_MODEL_ID, reports, encoder.config)
    card_path.write_text(_replace_blocks(text, blocks))
    return reports


def _replace_blocks(text: str, blocks: str) -> str:
    # Drop earlier Files/ONNX blocks and put the new ones where the Files block was (else at the end).
    at = text.find(_FILES_BLOCK[0])
    for begin, end in (_FILES_BLOCK, _ONNX_BLOCK):
        start = text.find(begin)
        if start >= 0 and text.find(end, start) >= 0:
            text = text[:start] + text[text.find(end, start) + len(end):]
    if at < 0 or at > len(text):
        return text.rstrip() + "\n\n" + blocks + "\n"
    return text[:at] + blocks + text[at:]


def _recipe_section(recipe: Any) -> str:
    if not recipe:
        return ""
    text = recipe if isinstance(recipe, str) else yaml.safe_dump(_jsonable(recipe), sort_keys=False)
    return f"## Recipe\n\n```yaml\n{text.rstrip()}\n```"


def _describe(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(_jsonable(value))


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _jsonable(value: Any) -> Any:
    # Round-trip through JSON so tuples, Paths and numpy scalars render as plain YAML/JSON.
    return json.loads(json.dumps(value, default=str))


def _verify_export(out: Path, encoder: PreTrainedModel) -> None:
    reloaded, info = AutoModel.from_pretrained(out, output_loading_info=True)
    problems = {key: list(info.get(key) or []) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {key: value[:5] for key, value in problems.items() if value}  # first few keep it one readable line
    if problems:
        raise RuntimeError(f"export_student: reloading {out} reported {problems}")
    if type(reloaded) is not type(encoder):
        raise RuntimeError(f"export_student: {out} reloads as {type(reloaded).__name__}, not {type(encoder).__name__}")
    _check_same_state(encoder.state_dict(), reloaded.state_dict(), out)
    _smoke_test(out, reloaded)


def _check_same_state(saved: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], out: Path) -> None:
    for key in sorted(set(saved) ^ set(loaded)):
        where = "missing from" if key in saved else "unexpected in"
        raise RuntimeError(f"export_student: {key} {where} the reloaded {out}")
    for key, tensor in saved.items():
        if not torch.equal(tensor.detach().cpu(), loaded[key].cpu()):
            raise RuntimeError(f"export_student: {key} differs after reloading {out}")


def _smoke_test(out: Path, model: PreTrainedModel) -> None:
    generator = torch.Generator().manual_seed(0)
    audio = torch.zeros(SAMPLING_RATE) + 1e-3 * torch.randn(SAMPLING_RATE, generator=generator)
    feature_extractor = AutoFeatureExtractor.from_pretrained(out)
    if type(feature_extractor) is not type(make_feature_extractor(model.config)):
        raise RuntimeError(f"export_student: {out} has a {type(feature_extractor).__name__}, not what the model reads")
    inputs = feature_extractor(audio.numpy(), sampling_rate=SAMPLING_RATE, return_tensors="pt")
    first = input_names(model)[0]
    inputs[first] = inputs[first].to(model.dtype)
    with torch.no_grad():
        hidden = model.eval()(**inputs).last_hidden_state
    expected = (1, int(num_frames(model.config, SAMPLING_RATE)), model.config.hidden_size)
    if tuple(hidden.shape) != expected or not torch.isfinite(hidden).all():
        raise RuntimeError(f"export_student: smoke test on {out} gave {tuple(hidden.shape)} (expected {expected}) or non-finite values")
