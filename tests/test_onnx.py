"""ONNX deployment: export beside the HF files, int8, parity against PyTorch, card, CLI, probes, cost.

One demo-shaped student (the demo recipe's tiny HuBERT) is exported once per module through the
run path (`export_run(..., onnx=True, quantize="int8")`), with parity checked on demo utterances.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason='needs the onnx extra: pip install -e ".[onnx]"')
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import AutoModel, Wav2Vec2FeatureExtractor  # noqa: E402

import students.export as export_module  # noqa: E402
from distill.build import student_config  # noqa: E402
from distill.cli import main  # noqa: E402
from distill.config import load_recipe  # noqa: E402
from distill.data.loader import load_audio_dataset, make_eval_batches  # noqa: E402
from distill.evaluation.suite import STUDENT, STUDENT_ONNX_FP32, STUDENT_ONNX_INT8, evaluate, format_report  # noqa: E402
from distill.export import export_run  # noqa: E402
from distill.evaluation.extractors import hf_encoder_extractor, onnx_extractor  # noqa: E402
from students import DistillStudent, ParityError, PredictionHeads, add_onnx, build_student, check_parity  # noqa: E402
from students.export import EXPORT_FILES  # noqa: E402
from students.onnx import FP32_TOLERANCE, INT8_MIN_COSINE, onnx_output_names  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
ONNX_FILES = ("model.onnx", "model_int8.onnx", "onnx_parity.json")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(exported folder inside a run, the PyTorch encoder it came from, the recipe)."""
    run = tmp_path_factory.mktemp("onnx") / "run"
    cfg = load_recipe("demo", [f"training.output_dir={run}", f"data.dataset_name={DEMO}"])
    run.mkdir(parents=True)
    OmegaConf.save(OmegaConf.structured(cfg), run / "recipe.yaml")
    torch.manual_seed(0)
    encoder = build_student(student_config(cfg))
    student = DistillStudent(encoder, PredictionHeads(encoder.config.hidden_size, 24, 2))
    folder = export_run(run, run / "student", student=student, onnx=True, quantize="int8")
    return folder, encoder.eval(), cfg


def _demo_waves(cfg, split: str, count: int) -> list[torch.Tensor]:
    batches = make_eval_batches(load_audio_dataset(cfg.data, split), cfg.data, 1, count)
    return [b["waveforms"][0] for b in batches if b["ids"]]


def test_graphs_sit_beside_the_hf_files_with_dynamic_axes(exported):
    folder, encoder, _ = exported
    assert sorted(p.name for p in folder.iterdir()) == sorted(EXPORT_FILES + ONNX_FILES)
    for name in ("model.onnx", "model_int8.onnx"):
        graph = onnx.load(str(folder / name))
        inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
        assert list(inputs) == ["input_values", "attention_mask"]
        assert all(isinstance(d, str) for dims in inputs.values() for d in dims), inputs  # batch and time symbolic
        assert [o.name for o in graph.graph.output] == onnx_output_names(encoder.config.num_hidden_layers)
    ops = {node.op_type for node in onnx.load(str(folder / "model_int8.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops  # really quantised, not a copy


def test_parity_figures_meet_the_bars(exported):
    folder, _, _ = exported
    reports = json.loads((folder / "onnx_parity.json").read_text())
    fp32, int8 = reports["model.onnx"], reports["model_int8.onnx"]
    figures = {name: [(o["name"], o["max_abs"], round(o["mean_cosine"], 5)) for o in r["outputs"]] for name, r in reports.items()}
    print("parity:", figures)
    assert len(fp32["outputs"]) == 4 and fp32["passed"] and int8["passed"]
    assert all(o["max_abs"] <= FP32_TOLERANCE for o in fp32["outputs"]), figures
    assert all(o["mean_cosine"] >= INT8_MIN_COSINE for o in int8["outputs"]), figures
    assert int8["max_abs"] > fp32["max_abs"]  # int8 is lossy: the comparison sees a difference
    # Real demo utterances of several lengths, alone and as one padded batch (layer-norm student).
    assert fp32["source"] == f"{DEMO} [dev]" and len(set(fp32["lengths"])) == 4 and fp32["padded_batch"]


def test_user_path_matches_pytorch_on_other_utterances(exported):
    """What a user does: the folder's feature extractor pads a batch, ONNX Runtime runs it."""
    folder, _, cfg = exported
    waves = [w.numpy() for w in _demo_waves(cfg, "train", 3)]
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder)
    inputs = extractor(waves, sampling_rate=16000, padding=True, return_tensors="np")
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(inputs["input_values"]), attention_mask=torch.from_numpy(inputs["attention_mask"]),
                    output_hidden_states=True)
    expected = [ref.last_hidden_state, *ref.hidden_states]
    frames = model._get_feat_extract_output_lengths(torch.tensor([len(w) for w in waves])).tolist()
    feeds = {"input_values": inputs["input_values"].astype(np.float32), "attention_mask": inputs["attention_mask"].astype(np.int64)}
    for name in ("model.onnx", "model_int8.onnx"):
        got = ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"]).run(None, feeds)
        for e, a in zip(expected, got):
            for b, n in enumerate(frames):
                diff = float((e[b, :n] - torch.from_numpy(a[b, :n])).abs().max())
                cosine = float(torch.nn.functional.cosine_similarity(e[b, :n], torch.from_numpy(a[b, :n]), dim=-1).mean())
                if name == "model.onnx":
                    assert diff <= FP32_TOLERANCE, (name, b, diff)
                else:
                    assert cosine >= INT8_MIN_COSINE, (name, b, cosine)


def test_card_lists_files_shows_figures_and_its_code_runs(exported):
    folder, _, _ = exported
    card = (folder / "README.md").read_text()
    reports = json.loads((folder / "onnx_parity.json").read_text())
    for name in EXPORT_FILES + ONNX_FILES:
        assert f"| `{name}` |" in card, name
    for name, r in reports.items():
        assert f"| `{name}` | {r['max_abs']:.2e} | {r['mean_cosine']:.5f} |" in card
    assert card.count("## Files") == 1 and card.count("## ONNX Runtime") == 1
    block = re.search(r"## ONNX Runtime.*?```python\n(.*?)```", card, re.S).group(1)
    script = block.replace("path/to/this/folder", str(folder)) + (
        "\nassert last_hidden_state.shape == (1, 49, 32), last_hidden_state.shape\n"
        "assert len(hidden_states) == 3\n"
        "assert not any(n.split('.')[0] in ('students', 'teachers', 'distill') for n in __import__('sys').modules)\n"
        "print('ONNX-USER-OK')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ONNX-USER-OK" in result.stdout, result.stderr[-2000:]


def test_export_refuses_a_graph_that_differs_from_pytorch(exported, tmp_path, monkeypatch):
    folder, encoder, cfg = exported
    broken = onnx.load(str(folder / "model.onnx"))
    weight = max(broken.graph.initializer, key=lambda t: onnx.numpy_helper.to_array(t).size)
    array = onnx.numpy_helper.to_array(weight).copy()
    array.flat[0] += 0.5  # one weight off: the kind of error a faulty exporter makes
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    monkeypatch.setattr(export_module, "export_onnx", lambda _encoder, path: (onnx.save(broken, str(path)), Path(path))[1])
    target = tmp_path / "student"
    target.mkdir()
    waves = _demo_waves(cfg, "dev", 2)
    with pytest.raises(ParityError, match=r"ONNX export refused: fp32 graph differs from PyTorch by \S+ \(> 0\.0001\)") as err:
        add_onnx(target, encoder, waves, "demo dev")
    assert "\n" not in str(err.value) and not (target / "model.onnx").exists()
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    report = check_parity(encoder, tmp_path / "broken.onnx", waves, tolerance=FP32_TOLERANCE)
    assert not report.passed and report.max_abs > FP32_TOLERANCE


@pytest.mark.slow
def test_cli_exports_onnx_from_a_student_folder(exported, tmp_path, capsys):
    folder, _, _ = exported
    out = tmp_path / "copy"
    assert main(["export", str(folder), str(out), "--onnx", "--parity-data", str(DEMO)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORT_FILES + ("model.onnx", "onnx_parity.json"))
    assert re.search(r"model\.onnx: max abs \S+, mean cosine 1\.0000\d vs PyTorch \(4 utterances, .*demo \[dev\]\)", printed), printed
    assert "model_int8.onnx" not in (out / "README.md").read_text()  # not asked for: not listed
    assert json.loads((out / "onnx_parity.json").read_text())["model.onnx"]["passed"]


def test_cli_onnx_without_the_extra_is_one_line(monkeypatch, tmp_path, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as err:
        main(["export", str(tmp_path), str(tmp_path / "out"), "--onnx"])
    message = str(err.value)
    assert "\n" not in message and 'pip install -e ".[onnx]"' in message and "onnxruntime" in message
    assert main(["export", str(tmp_path), str(tmp_path / "out"), "--quantize", "int8"]) == 2
    assert "add --onnx" in capsys.readouterr().err


def test_onnx_extractor_gives_the_pytorch_features(exported):
    folder, encoder, cfg = exported
    batch = next(make_eval_batches(load_audio_dataset(cfg.data, "dev"), cfg.data, 3, 3))
    expected, frames = hf_encoder_extractor(AutoModel.from_pretrained(folder))(batch["waveforms"], batch["lengths"])
    got, got_frames = onnx_extractor(folder / "model.onnx")(batch["waveforms"], batch["lengths"])
    assert got.shape == expected.shape == (encoder.config.num_hidden_layers + 1, 3, int(frames.max()), 32)
    assert torch.equal(got_frames, frames)
    assert float((got - expected).abs().max()) <= FP32_TOLERANCE


def test_evaluate_student_folder_probes_and_costs_int8(exported):
    folder, _, _ = exported
    result = evaluate(folder, probe_tasks=("classification:label",), probe_steps=3, max_items=4, batch_size=2,
                      cost_seconds=1.0, cost_repeats=1, device="cpu")
    rows = result["probes"]["tasks"]["classification:label"]["rows"]
    assert [r["model"] for r in rows] == [STUDENT, STUDENT_ONNX_INT8]
    assert all(0.0 <= r["score"] <= 1.0 and r["num_dev"] == 4 for r in rows)
    cost = {r["name"]: r for r in result["cost"]["rows"]}
    assert list(cost) == [STUDENT, STUDENT_ONNX_FP32, STUDENT_ONNX_INT8]
    assert cost[STUDENT]["gflops"] > 0 and cost[STUDENT_ONNX_INT8]["gflops"] == pytest.approx(cost[STUDENT]["gflops"])
    assert cost[STUDENT_ONNX_FP32]["params"] == cost[STUDENT]["params"]
    assert all(r["latency_ms_median"] > 0 for r in cost.values())
    assert STUDENT_ONNX_INT8 in format_report(result)
