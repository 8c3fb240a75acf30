from pathlib import Path

import pytest

from distill.config import RecipeError, load_recipe
from distill.shipped import recipes_dir

ALL_RECIPES = sorted(recipes_dir().glob("*.yaml"))


@pytest.mark.parametrize("recipe", ALL_RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(recipe):
    cfg = load_recipe(recipe)
    assert cfg.teacher.upstreams and cfg.data.dataset_name
    assert cfg.training.max_steps > 0


def test_demo_resolves_by_name_and_overrides_are_typed():
    cfg = load_recipe("demo", ["training.max_steps=7", "teacher.fusion=hconv", "data.streaming=true"])
    assert cfg.training.max_steps == 7 and isinstance(cfg.training.max_steps, int)
    assert cfg.teacher.fusion == "hconv" and cfg.data.streaming is True


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BASE = "teacher: {upstreams: [a]}\nstudent: {preset: tiny}\ndata: {dataset_name: d}\n"


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        (BASE + "training: {max_stepz: 3}\n", [], r"training\.max_stepz"),
        (BASE + "training: {max_steps: lots}\n", [], r"training\.max_steps"),
        ("teacher: {upstreams: [a]}\nstudent: {}\n", [], r"missing required key\(s\): data"),
        (BASE, ["training.learning_rate=fast"], r"training\.learning_rate"),
        (BASE, ["nosuch.key=1"], r"nosuch"),
        (BASE, ["training.max_steps"], r"expected section\.key=value"),
        (BASE.replace("[a]}", "[a], fusion: magic}"), [], r"teacher\.fusion='magic', expected one of"),
        (BASE.replace("[a]", "[]"), [], r"teacher\.upstreams is empty"),
        (BASE.replace("[a]}", "[a], projection_fit: supervised}"), [], r"needs teacher\.pretrained"),
        (BASE + "teacher: {upstreams: [b]}\n", [], r"r\.yaml: not valid YAML: .*duplicate key.* line 4"),
    ],
)
def test_bad_recipes_are_one_line_errors(tmp_path, text, overrides, message):
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(_write(tmp_path, text), overrides)
    assert "\n" not in str(err.value)


def test_unknown_recipe_name_lists_shipped():
    with pytest.raises(RecipeError, match="demo"):
        load_recipe("no_such_recipe")


# Transformer layers of the hub upstreams the shipped recipes name (from their model cards).
HUB_LAYERS = {"microsoft/wavlm-base-plus": 12, "facebook/hubert-base-ls960": 12, "openai/whisper-small": 12}


@pytest.mark.parametrize("recipe", ALL_RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_name_real_presets_and_reachable_target_layers(recipe):
    from distill.build import student_config
    from students import ARCHS

    cfg = load_recipe(recipe)
    assert type(student_config(cfg)) is ARCHS[cfg.student.arch]  # model_type "wav2vec2-bert" for arch wav2vec2_bert
    layers = [
        HUB_LAYERS[u] if isinstance(u, str) else u["config"].get("num_hidden_layers", u["config"].get("encoder_layers"))
        for u in cfg.teacher.upstreams
    ]
    aligned = max(layers) + 1  # layer 0 is the front-end output
    assert cfg.teacher.target_layers and max(cfg.teacher.target_layers) < aligned
