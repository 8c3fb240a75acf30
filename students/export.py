"""Export the student encoder as a plain Hugging Face model folder, and upload that folder.

The folder holds config.json (native model_type), model.safetensors, preprocessor_config.json
(Wav2Vec2FeatureExtractor) and a README.md model card: `AutoModel`, `AutoModelForCTC` and
`AutoModelForAudioClassification` load it with no custom code. The export is reloaded with
plain `AutoModel` and checked key by key before it is returned.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData
from transformers import AutoModel, PreTrainedModel, Wav2Vec2FeatureExtractor

__all__ = ["EXPORT_FILES", "export_student", "push_to_hub"]

EXPORT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")
SAMPLING_RATE = 16000
_TAGS = ["audio", "speech", "feature-extraction", "distillation", "fusion-distill"]
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
    make_feature_extractor(encoder.config.feat_extract_norm).save_pretrained(out)
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


def make_feature_extractor(feat_extract_norm: str) -> Wav2Vec2FeatureExtractor:
    """The preprocessor that DistillStudent's normalisation reproduces.

    Following the wav2vec2 convention, group-norm models are fed without an attention mask
    (they were trained on unpadded crops); layer-norm models use it.
    """
    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLING_RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=feat_extract_norm == "layer",
    )


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
        _usage_section(card_data.get("repo_id") or "path/to/this/folder", encoder.config.feat_extract_norm),
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
        f"- Conv front-end: {list(config.conv_dim)} channels, `feat_extract_norm={config.feat_extract_norm}`; "
        f"{SAMPLING_RATE // 320} frames per second of 16 kHz audio"
    )


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


def _usage_section(model_id: str, feat_extract_norm: str) -> str:
    mask_note = (
        "Batches: pass the feature extractor's `attention_mask` (layer-norm front-end, padding-invariant)."
        if feat_extract_norm == "layer"
        else "Batches: this group-norm model was trained without padding; prefer equal-length or single inputs."
    )
    return f"""## How to use

```python
import torch
from transformers import AutoModel, Wav2Vec2FeatureExtractor

model = AutoModel.from_pretrained("{model_id}")
feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained("{model_id}")
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
    feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(out)
    inputs = feature_extractor(audio.numpy(), sampling_rate=SAMPLING_RATE, return_tensors="pt")
    inputs["input_values"] = inputs["input_values"].to(model.dtype)
    with torch.no_grad():
        hidden = model.eval()(**inputs).last_hidden_state
    expected = (1, int(model._get_feat_extract_output_lengths(SAMPLING_RATE)), model.config.hidden_size)
    if tuple(hidden.shape) != expected or not torch.isfinite(hidden).all():
        raise RuntimeError(f"export_student: smoke test on {out} gave {tuple(hidden.shape)} (expected {expected}) or non-finite values")
