"""A run never uses weights other than the ones it was given: where they are looked up, and what a checkpoint
must pass before the network is built from it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from algorithm.__main__ import main
from algorithm.config import ModelConfig
from algorithm.errors import WeightsError
from algorithm.model import CheckpointError, load_checkpoint
from algorithm.model import encoder as encoder_module
from conftest import case_from_array

REPO = Path(__file__).resolve().parents[1]
EXIT_WEIGHTS = 3


@pytest.fixture
def case(tmp_path) -> Path:
    return case_from_array(tmp_path / "in", np.random.default_rng(0).integers(0, 120, (6, 16, 16), dtype=np.uint8))


def run(case: Path, output: Path, *extra: str) -> int:
    return main(["--input", str(case), "--output", str(output), "--device", "cpu", "--quiet", *extra])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


def outputs(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.fixture
def mounts(tmp_path, monkeypatch):
    """Point the model folder and the bundled-weights folder at test folders (neither exists yet)."""
    model, bundled = tmp_path / "opt-ml-model", tmp_path / "bundled"
    monkeypatch.setattr("algorithm.weights_location.MODEL_MOUNT", model)
    monkeypatch.setattr("algorithm.weights_location.BUNDLED", bundled)
    return model, bundled


# --------------------------------------------------------------------------------------------- lookup

@pytest.mark.parametrize("contents, needle", [
    (["model.pt"], "found: model.pt"),
    (["weights/model.pth", "README.txt"], "found: README.txt, weights/model.pth"),
    ([], "it is empty"),
])
def test_model_folder_without_a_checkpoint_is_exit_3_naming_what_is_there(case, tmp_path, mounts, random_weights,
                                                                            capsys, contents, needle):
    """An existing /opt/ml/model that yields no checkpoint never falls back to the demo weights."""
    model, bundled = mounts
    bundled.mkdir()
    shutil.copy(random_weights, bundled / "demo.safetensors")
    model.mkdir()
    for name in contents:
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_bytes(b"not ours")
    assert run(case, tmp_path / "out") == EXIT_WEIGHTS
    message = one_error_line(capsys)
    assert str(model) in message and needle in message, message
    assert outputs(tmp_path / "out") == []


@pytest.mark.parametrize("kind", ["broken_link", "file"])
def test_model_folder_that_is_not_a_folder_is_exit_3(case, tmp_path, mounts, random_weights, capsys, kind):
    model, bundled = mounts
    bundled.mkdir()
    shutil.copy(random_weights, bundled / "demo.safetensors")
    if kind == "broken_link":
        model.symlink_to(tmp_path / "nowhere")
    else:
        model.write_bytes(b"x")
    assert run(case, tmp_path / "out") == EXIT_WEIGHTS
    assert "not a folder" in one_error_line(capsys)


def test_checkpoint_with_another_case_of_suffix_is_used(case, tmp_path, mounts, random_weights):
    model, bundled = mounts
    model.mkdir()
    shutil.copy(random_weights, model / "model.SafeTensors")
    assert run(case, tmp_path / "out") == 0
    result = json.loads((tmp_path / "out" / "fetalclipseg" / "result.json").read_text())
    assert result["checkpoint"]["weights"] == str(model / "model.SafeTensors")


def test_corrupt_checkpoint_in_the_model_folder_is_exit_3_not_a_fall_back(case, tmp_path, mounts, random_weights,
                                                                           capsys):
    model, bundled = mounts
    bundled.mkdir()
    shutil.copy(random_weights, bundled / "demo.safetensors")
    model.mkdir()
    (model / "model.safetensors").write_bytes(random_weights.read_bytes()[:4000])
    assert run(case, tmp_path / "out") == EXIT_WEIGHTS
    assert "model.safetensors" in one_error_line(capsys)
    assert outputs(tmp_path / "out") == []


def test_demo_weights_only_without_a_model_folder_and_loudly(case, tmp_path, mounts, random_weights, caplog):
    _, bundled = mounts
    bundled.mkdir()
    shutil.copy(random_weights, bundled / "demo.safetensors")
    assert run(case, tmp_path / "out") == 0
    warnings = " | ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "bundled demo weights" in warnings and "not for clinical use" in warnings, warnings


def test_no_model_folder_and_no_demo_weights_is_exit_3(case, tmp_path, mounts, capsys):
    """The submission image ships no demo weights: without a model tarball it must fail, not guess."""
    model, bundled = mounts
    bundled.mkdir()
    assert run(case, tmp_path / "out") == EXIT_WEIGHTS
    message = one_error_line(capsys)
    assert "no weights" in message and str(model) in message


@pytest.mark.parametrize("names", [[], ["a.safetensors", "b.safetensors"]])
def test_weights_folder_must_hold_exactly_one_checkpoint(case, tmp_path, random_weights, capsys, names):
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    for name in names:
        shutil.copy(random_weights, folder / name)
    assert run(case, tmp_path / "out", "--weights", str(folder)) == EXIT_WEIGHTS
    message = one_error_line(capsys)
    assert str(folder) in message and ("notes.txt" in message if not names else "2 .safetensors" in message)


def test_one_weights_error_class():
    assert encoder_module.WeightsError is WeightsError and issubclass(CheckpointError, WeightsError)
    assert WeightsError("x").exit_code == EXIT_WEIGHTS and isinstance(WeightsError("x"), ValueError)


# ------------------------------------------------------------------------------------ checkpoint content

def rewritten(source: Path, target: Path, tensors=None, config=None, **metadata: str) -> Path:
    """`source` saved again with changed tensors, model_config entries or metadata."""
    with safe_open(str(source), framework="pt") as fh:
        meta = dict(fh.metadata())
    state = load_file(str(source)) if tensors is None else tensors
    if config is not None:
        meta["model_config"] = json.dumps({**json.loads(meta["model_config"]), **config})
    meta.update(metadata)
    save_file({k: v.contiguous() for k, v in state.items()}, str(target), metadata=meta)
    return target


@pytest.mark.parametrize("damage, needle", [
    ("nan", "NaN or infinite"),
    ("inf_one", "NaN or infinite"),
    ("int8", "I8"),
    ("float16", "F16"),
    ("layers_text", "layers='twelve'"),
    ("layers_bool", "layers='True'"),
    ("heads_zero", "heads='0'"),
    ("skip_layers", "skip_layers"),
    ("frame_classes", "frame_classes"),
    ("decoder_name", "decoder='transformer'"),
    ("classifier", "frame classifier"),
    ("dropout_nan", "lora_dropout"),
    ("config_not_object", "JSON object"),
    ("nested_extra", "invalid metadata"),
])
def test_checkpoint_that_cannot_be_trusted_is_exit_3(case, tmp_path, random_weights, capsys, damage, needle):
    state = load_file(str(random_weights))
    path = tmp_path / f"{damage}.safetensors"
    if damage == "nan":
        rewritten(random_weights, path, {k: torch.full_like(v, float("nan")) for k, v in state.items()})
    elif damage == "inf_one":
        name = sorted(state)[3]
        state[name] = state[name].clone().view(-1).index_fill(0, torch.tensor([0]), float("inf")).view_as(state[name])
        rewritten(random_weights, path, state)
    elif damage in ("int8", "float16"):
        dtype = torch.int8 if damage == "int8" else torch.float16
        rewritten(random_weights, path, {k: v.to(dtype) for k, v in state.items()})
    elif damage == "layers_text":
        rewritten(random_weights, path, config={"layers": "twelve"})
    elif damage == "layers_bool":
        rewritten(random_weights, path, config={"layers": True})
    elif damage == "heads_zero":
        rewritten(random_weights, path, config={"heads": 0})
    elif damage == "skip_layers":
        rewritten(random_weights, path, config={"skip_layers": [4, 3, 2, 1]})
    elif damage == "frame_classes":
        rewritten(random_weights, path, config={"frame_classes": 5})
    elif damage == "decoder_name":
        rewritten(random_weights, path, config={"decoder": "transformer"})
    elif damage == "classifier":  # what training's paper-cls / probe modes save: valid, but cannot select a frame
        rewritten(random_weights, path, config={"decoder": "none", "frame_classes": 1, "frame_head": "linear"})
    elif damage == "dropout_nan":
        with safe_open(str(random_weights), framework="pt") as fh:
            text = fh.metadata()["model_config"].replace('"lora_dropout": 0.1', '"lora_dropout": NaN')
        rewritten(random_weights, path, model_config=text)
    elif damage == "config_not_object":
        rewritten(random_weights, path, model_config="[1, 2]")
    elif damage == "nested_extra":
        rewritten(random_weights, path, extra="[" * 100_000 + "]" * 100_000)
    assert run(case, tmp_path / "out", "--weights", str(path)) == EXIT_WEIGHTS
    message = one_error_line(capsys)
    assert path.name in message and needle in message, message
    assert outputs(tmp_path / "out") == []


_HUGE_CONFIG_PROBE = """
import sys
import peft, torch  # what building the network imports (about 1.1 GiB peak on its own)
from algorithm.model import CheckpointError, load_checkpoint
from algorithm.run import peak_memory_gib
print(f"peak {peak_memory_gib():.3f}")
try:
    load_checkpoint(sys.argv[1])
except CheckpointError as error:
    print("refused:", str(error)[:300])
print(f"peak {peak_memory_gib():.3f}")
"""


def test_large_declared_config_with_few_tensors_is_refused_before_allocation(tmp_path, random_weights):
    """A file declaring FetalCLIP's ViT-L (1.2 GB of weights) and holding the small model's tensors is
    refused from its header: the network it declares is never allocated (measured in a fresh process)."""
    full = {k: v for k, v in ModelConfig().to_dict().items()}
    path = rewritten(random_weights, tmp_path / "huge.safetensors", config=full)
    completed = subprocess.run([sys.executable, "-c", _HUGE_CONFIG_PROBE, str(path)], cwd=REPO,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = completed.stdout.strip().splitlines()
    before, after = float(lines[0].split()[1]), float(lines[-1].split()[1])
    assert lines[1].startswith("refused:") and "do not match its config" in lines[1], lines
    assert after - before < 0.3, f"peak {before} -> {after} GiB: the declared network was allocated"


def test_valid_checkpoint_still_loads_exactly(random_weights):
    model, info = load_checkpoint(random_weights)
    state = load_file(str(random_weights))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


# ----------------------------------------------------------------------------------------- no pickles

def _torch_load_calls(root: Path) -> list[tuple[Path, int, bool]]:
    """Every `torch.load(...)` call in the repository's Python files: (file, line, weights_only=True given)."""
    import ast

    found = []
    for path in sorted(root.rglob("*.py")):
        if any(part.startswith(".") or part in ("build", "runs") for part in path.relative_to(root).parts):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                found.append((path.relative_to(root), node.lineno, safe))
    return found


def test_the_inference_package_never_unpickles():
    calls = _torch_load_calls(REPO / "algorithm")
    assert calls and all(safe for _, _, safe in calls), calls


def test_nothing_in_the_repository_unpickles():
    unsafe = [(str(path), line) for path, line, safe in _torch_load_calls(REPO) if not safe]
    assert unsafe == []
