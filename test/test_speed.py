"""The speed benchmark's quick mode, LoRA merging, the paper-style reference path, CPU bf16.

No timing thresholds here: the speed targets live in the benchmark's printed numbers.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.speed import ReferenceNetwork, activation_bytes_per_frame, main as benchmark_main
from algorithm.config import Config, ModelConfig
from algorithm.model.fetalclipseg import build_model
from algorithm.network import Network
from algorithm.search import FrameScores, FrameSearch

CPU = torch.device("cpu")


def small_model(seed: int = 0) -> torch.nn.Module:
    """Small FetalCLIPSEG with non-zero LoRA updates (peft starts lora_B at zero, which would make merging
    trivially exact)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig.small()).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def frames(n: int = 4, seed: int = 0) -> np.ndarray:
    """Ultrasound-like uint8 frames: a bright disc on speckle, different on every frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:120, :160]
    out = rng.gamma(2.0, 20.0, (n, 120, 160))
    for i in range(n):
        out[i][(yy - 60) ** 2 + (xx - 70 - 4 * i) ** 2 < (25 + 3 * i) ** 2] += 80
    return np.clip(out, 0, 255).astype(np.uint8)


def test_merging_lora_keeps_the_outputs():
    model = small_model()
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        before = model(x)
    model.merge_lora()
    assert not any("lora_" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after.mask_logits, before.mask_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after.frame_logits, before.frame_logits, atol=1e-4, rtol=1e-4)


def test_network_merges_lora_and_scores_like_the_unmerged_model():
    stack = frames(6)
    results = {}
    for merge in (False, True):
        config = Config(model=ModelConfig.small()).replace(device="cpu", merge_lora=merge, precision="fp32",
                                                           lazy_decoder="off", batch_size=4)
        network = Network(small_model(), config)
        assert network.describe()["lora_merged"] is merge
        scores = FrameScores.empty(len(stack))
        FrameSearch.for_network(network).score_frames(stack, network, np.arange(len(stack)), scores)
        results[merge] = scores
    np.testing.assert_allclose(results[True].probabilities, results[False].probabilities, atol=1e-4)
    np.testing.assert_allclose(results[True].mask_fractions, results[False].mask_fractions, atol=2e-3)


def test_reference_path_hooks_give_the_models_outputs():
    """The benchmark's reference (forward hooks on the blocks of `visual(x)`) computes what
    `FetalCLIPSeg.forward` (open_clip's `forward_intermediates`) computes."""
    model = small_model()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
        reference = ReferenceNetwork(model, Config(model=ModelConfig.small()), CPU, batch_size=2)
        mask_logits, frame_logits = reference.forward(x)
    reference.close()
    torch.testing.assert_close(mask_logits, expected.mask_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(frame_logits, expected.frame_logits, atol=1e-5, rtol=1e-5)


def test_cpu_bf16_encoder_stays_close_to_fp32():
    stack = frames(4)
    probabilities = {}
    for precision in ("fp32", "bf16"):
        config = Config(model=ModelConfig.small()).replace(device="cpu", precision=precision,
                                                           lazy_decoder="off")
        network = Network(small_model(), config)
        assert network.precision == precision
        scores = FrameScores.empty(len(stack))
        FrameSearch.for_network(network).score_frames(stack, network, np.arange(len(stack)), scores)
        probabilities[precision] = scores.probabilities
    np.testing.assert_allclose(probabilities["bf16"], probabilities["fp32"], atol=0.05)


def test_activation_estimate_is_positive_and_scales_with_the_model():
    per_frame = activation_bytes_per_frame(build_model(ModelConfig.small()).eval(), ModelConfig.small(), batch=1)
    assert 1e6 < per_frame < 1e9


def test_quick_benchmark_writes_its_report(tmp_path):
    out = tmp_path / "benchmark.json"
    assert benchmark_main(["--quick", "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("device", "config", "reference_seconds", "seconds", "speedup_vs_reference",
                "same_frame_as_reference", "frames", "frames_encoded", "stages", "extrapolated", "memory"):
        assert key in report, key
    assert report["config"] == "small" and report["device"] == "cpu"
    assert isinstance(report["speedup_vs_reference"], float) and report["speedup_vs_reference"] > 0
    assert isinstance(report["same_frame_as_reference"], bool)
    assert report["extrapolated"] is False
    assert 0 < report["frames_encoded"] <= report["frames"]
    stages = {row["stage"] for row in report["stages"]}
    assert {"read", "preprocess", "encode", "decode", "select", "postprocess", "write"} <= stages
    assert report["seconds"] == pytest.approx(sum(row["seconds"] for row in report["stages"]), abs=0.01)
