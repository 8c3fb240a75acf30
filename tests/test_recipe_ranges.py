"""Every numeric recipe field is range-checked where the recipe loads (issue 19).

The walk sets each numeric field of the schema to 0, -1 and a huge value (and floats to nan and
inf) in process; one CLI case checks what the user sees: exit 2 and one stderr line.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path

import pytest

from distill.config import RecipeConfig, RecipeError, load_recipe
from distill.recipe_ranges import RANGES, numeric_fields

REPO = Path(__file__).resolve().parent.parent
HUGE = {int: 10**12, float: 1e30}

# Written out, not derived from RANGES: the values of the walk that a recipe may hold. Every
# other value of the walk must be refused in one line.
ACCEPTED = {
    ("teacher.target_layers", 0),  # the front-end output is a layer too
    ("student.init_from_upstream", 0),
    ("data.min_duration_in_seconds", 0.0),
    ("data.dataloader_num_workers", 0),
    ("loss.cos_weight", 0.0),  # L1 only
    ("training.seed", 0),
    ("training.weight_decay", 0.0),
    ("training.warmup_steps", 0),
    ("training.save_total_limit", 0),  # keep every checkpoint
    ("training.convergence_min_slope", 0.0),
}
# List fields: how many entries the demo recipe needs (the tiny preset has 7 conv layers).
LIST_LENGTH = {"student.conv_dim": 7}


def _hint(key: str):
    section, name = key.split(".")
    return typing.get_type_hints(typing.get_type_hints(RecipeConfig)[section])[name]


def _kind(key: str) -> type:
    hint = _hint(key)
    while typing.get_args(hint):  # Optional[list[int]] -> list[int] -> int
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _walk():
    for key in numeric_fields(RecipeConfig):
        kind = _kind(key)
        values = [kind(0), kind(-1), HUGE[kind]] + ([float("nan"), float("inf")] if kind is float else [])
        for value in values:
            yield key, value


def _override(key: str, value) -> str:
    text = str(value) if isinstance(value, float) and not math.isfinite(value) else json.dumps(value)
    if "list" in str(_hint(key)):
        return f"{key}=[{', '.join([text] * LIST_LENGTH.get(key, 1))}]"
    return f"{key}={text}"


def test_every_numeric_schema_field_has_a_range():
    walked = numeric_fields(RecipeConfig)
    assert set(walked) == set(RANGES), "a numeric recipe field without an allowed range (distill/recipe_ranges.py)"
    # The walk really covers the schema: count the int/float fields by hand for two sections.
    training = [f.name for f in fields(typing.get_type_hints(RecipeConfig)["training"])]
    in_training = {k.split(".")[1] for k in walked if k.startswith("training.")}
    assert {"per_device_train_batch_size", "learning_rate", "max_grad_norm", "seed"} <= in_training
    assert "mixed_precision" in training and "training.mixed_precision" not in walked and "data.streaming" not in walked
    assert len(walked) == 34


@pytest.mark.parametrize("key,value", list(_walk()), ids=[f"{k}={v}" for k, v in _walk()])
def test_each_numeric_field_at_zero_minus_one_and_huge(key, value):
    override = _override(key, value)
    if (key, value) in ACCEPTED or (key, value) in {(k, float(v)) for k, v in ACCEPTED}:
        load_recipe("demo", [override])
        return
    with pytest.raises(RecipeError) as err:
        load_recipe("demo", [override])
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(str(REPO / "recipes" / "demo.yaml") + ": ")
    assert f"{key}=" in message and "expected" in message, message


@pytest.mark.parametrize("override,message", [
    ("teacher.target_layers=[1,4]",
     "teacher.target_layers=[1, 4]: entry 4 out of range, expected >= 0 and <= 3 (the fused teacher has 4 aligned layers"),
    ("teacher.projection_dim=177", "teacher.projection_dim=177, expected >= 1 and <= 176 (the concatenated width of the 3 upstreams)"),
    ("student.init_from_upstream=3", "student.init_from_upstream=3, expected >= 0 and <= 2"),
    ("training.per_device_train_batch_size=0", "training.per_device_train_batch_size=0, expected >= 1 and <= 65536"),
    ("training.seed=4294967296", "training.seed=4294967296, expected >= 0 and <= 4294967295"),
    ("data.sampling_rate=8000", "data.sampling_rate=8000, expected 16000"),
    ("data.min_duration_in_seconds=20", "data.min_duration_in_seconds=20.0 is above data.max_duration_in_seconds=10.0"),
    ("student.num_attention_heads=3", "not divisible"),
    ("teacher.projection_dim=null", "teacher.projection_dim=null, expected >= 1 (target_mode=chconv projects"),
])
def test_values_checked_against_the_teacher_student_and_each_other(override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe("demo", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_layer_to_layer_indices_are_checked_against_the_student():
    with pytest.raises(RecipeError, match=r"student.student_layers=\[1, 3, 2\]: entry 3 out of range, expected >= 0 and <= 2"):
        load_recipe("demo", ["student.head_mode=layer_to_layer", "student.student_layers=[1,3,2]"])
    assert load_recipe("demo", ["student.head_mode=layer_to_layer", "student.student_layers=[1,2,2]"]).student.student_layers == [1, 2, 2]
    with pytest.raises(RecipeError, match=r"student.student_layers=\[1, 2, 2\], expected null with student.head_mode=predict \(only layer_to_layer"):
        load_recipe("demo", ["student.student_layers=[1,2,2]"])


def test_local_upstream_folders_are_read_and_hub_ids_left_to_the_teacher_build(tmp_path):
    folder = tmp_path / "up"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "whisper", "encoder_layers": 4, "d_model": 32}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"teacher: {{upstreams: [{folder}], projection_dim: 16}}\nstudent: {{preset: tiny}}\ndata: {{dataset_name: x}}\n")
    assert load_recipe(recipe, ["teacher.target_layers=[4]"]).teacher.target_layers == [4]
    with pytest.raises(RecipeError, match=r"entry 5 out of range, expected >= 0 and <= 4 \(the fused teacher has 5 aligned layers"):
        load_recipe(recipe, ["teacher.target_layers=[5]"])
    with pytest.raises(RecipeError, match=r"teacher.projection_dim=33, expected >= 1 and <= 32"):
        load_recipe(recipe, ["teacher.projection_dim=33"])
    # Not a folder here: a hub id, whose layer count needs a download; the teacher build checks it.
    assert load_recipe(recipe, ["teacher.upstreams=[org/model]", "teacher.target_layers=[50]"]).teacher.target_layers == [50]


@pytest.mark.slow
def test_the_cli_exits_2_with_one_line_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "distill", "train", "demo", "--output-dir", str(run),
                             "training.per_device_train_batch_size=0"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"fusion-distill train: error: {REPO / 'recipes' / 'demo.yaml'}: training.per_device_train_batch_size=0, expected >= 1 and <= 65536"
    ]
    assert not run.exists()
