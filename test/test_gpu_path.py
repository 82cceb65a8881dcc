"""The CUDA path's logic, exercised on the CPU: padded batches (one shape per network part), decode decisions
taken once per call, matrix weights cast once, device honesty in the CLI, and `tools/gpu_check.py --quick`.

What needs a GPU (CUDA kernels, speed, memory) is `tools/gpu_check.py`'s job on a GPU machine.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from algorithm import runtime, search
from algorithm.__main__ import main as cli_main
from algorithm.config import Config, ModelConfig
from algorithm.model.fetalclipseg import build_model
from algorithm.network import Network
from algorithm.runtime import cast_matmul_weights
from algorithm.search import FrameScores, FrameSearch

REPO = Path(__file__).resolve().parents[1]
SMALL = ModelConfig.small()


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(SMALL).eval()


def stack_of(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:96, :128]
    frames = rng.gamma(2.0, 20.0, (n, 96, 128))
    for i in range(n):
        frames[i][(yy - 48) ** 2 + (xx - 60 - 2 * i) ** 2 < (20 + i) ** 2] += 90
    return np.clip(frames, 0, 255).astype(np.uint8)


def network(batch_size: int = 4, **overrides) -> Network:
    config = Config(model=SMALL).replace(**{"device": "cpu", "precision": "fp32", "batch_size": batch_size,
                                            **overrides})
    return Network(small_model(), config)


def shapes_seen(module: torch.nn.Module) -> list[int]:
    """Batch sizes of every call of `module` (a forward pre-hook)."""
    seen: list[int] = []
    module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    return seen


def scored(net: Network, stack: np.ndarray, frames: np.ndarray | None = None) -> FrameScores:
    scores = FrameScores.empty(len(stack))
    FrameSearch.for_network(net).score_frames(stack, net, np.arange(len(stack)) if frames is None else frames,
                                              scores)
    return scores


def assert_same_scores(a: FrameScores, b: FrameScores) -> None:
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(a.mask_fractions, b.mask_fractions, atol=1e-5, equal_nan=True)
    assert sorted(a.abdomen_maps) == sorted(b.abdomen_maps)


@pytest.mark.parametrize("lazy", ["on", "off"])
def test_padded_batches_give_the_network_one_shape_and_the_same_scores(lazy):
    """CUDA pads the last batch (10 frames at batch 4: 4, 4, 2 + 2 repeats), so cuDNN autotuning and
    torch.compile never meet a new shape inside a case; the padding must not change any frame's result."""
    stack = stack_of(10)
    plain = network(lazy_decoder=lazy)
    reference = scored(plain, stack)
    padded = network(lazy_decoder=lazy)
    padded.pad_batches = True
    encoder_batches = shapes_seen(padded.model.encoder)
    decoder_batches = shapes_seen(padded.model.decoder)
    result = scored(padded, stack)
    assert set(encoder_batches) == {4} and len(encoder_batches) == 3
    assert decoder_batches and set(decoder_batches) == {4}
    assert_same_scores(result, reference)
    # a call of fewer frames than a batch (the coarse search's refinement rounds) is padded too
    encoder_batches.clear()
    scored(padded, stack, np.array([3]))
    assert encoder_batches == [4]


def test_deciding_once_per_call_decodes_the_same_frames_as_deciding_per_batch(monkeypatch):
    """The lazy decoder on CUDA holds every frame's decoder inputs and decides once, after the last batch (one
    host synchronisation per call); on the CPU it decides after every batch. Same decisions, same results."""
    stack = stack_of(14)
    per_batch = network()
    assert per_batch.waiting_limit == per_batch.batch_size
    once = network()
    once.waiting_limit = 10**9
    copies = []
    original = search.copy_probabilities

    def counting(encoded, scores):
        copies.append(len(encoded))
        original(encoded, scores)

    monkeypatch.setattr(search, "copy_probabilities", counting)
    reference = scored(per_batch, stack)
    per_batch_copies = [c for c in copies if c]
    copies.clear()
    result = scored(once, stack)
    assert [c for c in copies if c] == [4]  # all 4 batches' frame-head results in one copy
    assert len(per_batch_copies) == 4  # one per batch
    assert_same_scores(result, reference)
    assert result.decoded.sum() == reference.decoded.sum()


def test_matrix_weights_are_cast_once_and_norms_stay_fp32():
    model = small_model()
    model.merge_lora()
    visual = model.encoder.visual
    cast = cast_matmul_weights(model.encoder, torch.bfloat16)
    assert cast > 0.9 * sum(p.numel() for p in model.encoder.parameters())  # nearly all weights are matmul
    block = visual.transformer.resblocks[0]
    assert block.mlp.c_fc.weight.dtype == torch.bfloat16
    assert block.attn.in_proj_weight.dtype == torch.bfloat16 and block.attn.out_proj.weight.dtype == torch.bfloat16
    assert visual.conv1.weight.dtype == torch.bfloat16 and visual.proj.dtype == torch.bfloat16
    assert block.ln_1.weight.dtype == torch.float32 and visual.ln_post.weight.dtype == torch.float32
    assert visual.positional_embedding.dtype == torch.float32 and visual.class_embedding.dtype == torch.float32
    assert cast_matmul_weights(model.encoder, torch.bfloat16) == 0  # nothing left to cast


def weight_copies_per_forward(encoder: torch.nn.Module, x: torch.Tensor) -> int:
    """Number of dtype conversions of tensors shaped like one of the encoder's 2-D matrix weights during one
    forward pass under bf16 autocast in inference mode (autocast's cast cache does not hold there). The
    positional embedding, which open_clip casts to the activations' type itself, is not a matrix weight."""
    from torch.profiler import ProfilerActivity, profile

    weight_shapes = {tuple(p.shape) for name, p in encoder.named_parameters()
                     if p.ndim == 2 and "embedding" not in name}  # linear, attention and projection weights
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            encoder(x)
    return sum(1 for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes
               and tuple(e.input_shapes[0]) in weight_shapes)


def test_autocast_re_casts_fp32_weights_on_every_call_but_not_weights_cast_at_load():
    model = small_model()
    model.merge_lora()
    encoder = model.encoder.eval().requires_grad_(False)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected = encoder(x)
    assert weight_copies_per_forward(encoder, x) > 0
    cast_matmul_weights(encoder, torch.bfloat16)
    assert weight_copies_per_forward(encoder, x) == 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        features, embedding = encoder(x)
    for got, want in zip(features, expected.features):
        assert (got.float() - want).norm() / want.norm() < 0.05
    assert (embedding.float() - expected.embedding).norm() / expected.embedding.norm() < 0.05


def test_network_describes_its_runtime_and_refuses_fp16_on_the_cpu():
    p = network(batch_size=0)
    assert p.batch_size == Config().inference.cpu_batch_size
    assert p.runtime["device"] == "cpu" and p.runtime["precision"] == "fp32" and p.runtime["batch_size"] == 32
    assert p.describe()["runtime"] == p.runtime
    with pytest.raises(runtime.DeviceError, match="fp16 needs a CUDA GPU"):
        network(precision="fp16")


# ------------------------------------------------------------------------------------------ the CLI

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "algorithm", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch has no usable GPU")
def test_cli_device_cuda_without_a_gpu_is_one_error_line(small_case, random_weights, tmp_path):
    completed = run_cli("--input", str(small_case[0]), "--output", str(tmp_path / "out"), "--weights",
                        str(random_weights), "--device", "cuda")
    assert completed.returncode == 5
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --device cuda asked for, but no usable CUDA GPU: " +
                      ("no NVIDIA GPU is visible" if not runtime.nvidia_gpu_visible() else runtime.cuda_unusable_reason())]
    assert "Traceback" not in completed.stderr
    assert not any((tmp_path / "out").rglob("*.*"))


def test_cli_fp16_on_the_cpu_is_one_error_line(small_case, random_weights, tmp_path):
    completed = run_cli("--input", str(small_case[0]), "--output", str(tmp_path / "out"), "--weights",
                        str(random_weights), "--device", "cpu", "--precision", "fp16")
    assert completed.returncode == 5
    assert completed.stderr.strip().splitlines()[-1] == "error: fp16 needs a CUDA GPU; on the CPU use auto, fp32 or bf16"


def test_cli_cpu_fallback_beside_a_visible_gpu_warns_and_records_why(small_case, random_weights, tmp_path,
                                                                      monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "nvidia_gpu_visible", lambda: True)
    monkeypatch.setattr(runtime, "nvidia_driver_version", lambda: "535.183.01")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    out = tmp_path / "out"
    assert cli_main(["--input", str(small_case[0]), "--output", str(out), "--weights", str(random_weights),
                     "--precision", "fp32", "--quiet"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "NVIDIA" in r.getMessage()]
    assert len(warnings) == 1
    assert "NVIDIA driver 535.183.01 is older than this CUDA 13.0 build" in warnings[0]
    result = json.loads((out / "fetalclipseg" / "result.json").read_text())
    assert result["runtime"]["device"] == "cpu" and result["runtime"]["precision"] == "fp32"
    assert result["runtime"]["device_warning"] == warnings[0]
    assert result["runtime"]["torch"] == torch.__version__ and result["runtime"]["cuda"] == "13.0"


# ------------------------------------------------------------------------------------------ gpu_check

@pytest.mark.slow
def test_gpu_check_quick_on_the_cpu_passes_and_reports_the_policy(tmp_path):
    report_path = tmp_path / "gpu_check.json"
    completed = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu", "--quick", "--json",
                                str(report_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["policy"] == {"7.5": "fp16", "8.0": "bf16", "9.0": "bf16"}
    assert report["checks"] and all(report["checks"].values()), report["checks"]
    assert {"policy", "cpu_reference_finite", "cpu_bf16_same_frame"} <= set(report["checks"])
    assert report["device"] == "cpu" and report["mode"] == "quick"
