"""The runtime: the one precision policy (native bf16 only from compute capability 8.0, fp16 below, fp32 on
request), device choice and its honesty about a CPU fallback, the batch size from free GPU memory."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from algorithm import runtime
from algorithm.runtime import (DeviceError, autocast, batch_size_for_memory, choose_precision, cuda_batch_plan,
                               cuda_memory_available, describe_runtime, needs_grad_scaling, nvidia_driver_version,
                               select_device)


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                  ((8, 6), "bf16"), ((9, 0), "bf16"), ((10, 0), "bf16")])
def test_auto_on_cuda_follows_the_compute_capability(capability, expected):
    assert choose_precision("auto", "cuda", capability=capability) == expected


def test_auto_on_a_t4_is_fp16_even_where_torch_claims_bf16(monkeypatch):
    # torch.cuda.is_bf16_supported() counts emulation and says True on a T4; the policy must not ask it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    assert choose_precision("auto", "cuda") == "fp16"


@pytest.mark.parametrize("requested", ["fp32", "fp16", "bf16"])
def test_an_explicit_choice_is_kept_on_cuda(requested):
    assert choose_precision(requested, "cuda", capability=(7, 5)) == requested


def test_cpu_auto_depends_on_bf16_units_and_fp16_is_refused():
    assert choose_precision("auto", "cpu", cpu_fast_bf16=True) == "bf16"
    assert choose_precision("auto", "cpu", cpu_fast_bf16=False) == "fp32"
    assert choose_precision("bf16", "cpu", cpu_fast_bf16=False) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        choose_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_precision("half", "cpu")


def test_grad_scaling_only_for_fp16_and_autocast_dtype():
    assert [needs_grad_scaling(p) for p in ("fp16", "bf16", "fp32")] == [True, False, False]
    with autocast("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


# ------------------------------------------------------------------------------------------ device choice

ALGORITHM = Path(__file__).resolve().parents[1] / "algorithm"


def test_nothing_in_algorithm_asks_torch_whether_bf16_is_supported():
    """`torch.cuda.is_bf16_supported()` counts emulation (True on a T4): no code of the algorithm may call it."""
    calls = []
    for path in sorted(ALGORITHM.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                    "is_bf16_supported":
                calls.append(f"{path.name}:{node.lineno}")
    assert calls == []


@pytest.fixture
def gpu_without_cuda(monkeypatch):
    """A machine whose NVIDIA GPU is visible (device nodes, driver 535) while torch cannot use it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "nvidia_gpu_visible", lambda: True)
    monkeypatch.setattr(runtime, "nvidia_driver_version", lambda: "535.183.01")
    monkeypatch.setattr(torch.version, "cuda", "13.0")


def test_auto_falls_back_to_the_cpu_saying_the_driver_is_too_old(gpu_without_cuda):
    choice = select_device("auto")
    assert choice.device.type == "cpu"
    assert "NVIDIA driver 535.183.01 is older than this CUDA 13.0 build" in choice.fallback
    assert "driver >= 580" in choice.fallback and "running on the CPU" in choice.fallback


def test_a_cuda_12_build_on_the_same_driver_gets_a_different_reason(gpu_without_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.6")  # 535 >= 525: the driver is not the cause
    assert "could not initialise CUDA with NVIDIA driver 535.183.01" in select_device("auto").fallback


def test_a_cpu_only_torch_is_named(gpu_without_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "is a CPU-only build" in select_device("auto").fallback


def test_auto_without_any_gpu_is_a_quiet_cpu_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "nvidia_gpu_visible", lambda: False)
    choice = select_device("auto")
    assert choice.device.type == "cpu" and choice.fallback is None


def test_explicit_cuda_without_a_usable_gpu_is_an_error(gpu_without_cuda, monkeypatch):
    with pytest.raises(DeviceError, match="--device cuda asked for, but no usable CUDA GPU: the NVIDIA driver "
                                          "535.183.01 is older"):
        select_device("cuda")
    monkeypatch.setattr(runtime, "nvidia_gpu_visible", lambda: False)
    with pytest.raises(DeviceError, match="no NVIDIA GPU is visible"):
        select_device("cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        select_device("tpu")


def test_cuda_is_taken_when_torch_can_use_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert select_device("auto").device == torch.device("cuda")
    assert select_device("cuda:0").device == torch.device("cuda:0")
    with pytest.raises(DeviceError, match="only 1 CUDA device"):
        select_device("cuda:1")


@pytest.mark.parametrize("text, version", [
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024\n"
     "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n", "535.183.01"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U16)\n",
     "580.65.06"),
    ("garbage\n", None),
])
def test_driver_version_is_read_from_the_kernel_module(tmp_path, monkeypatch, text, version):
    path = tmp_path / "version"
    path.write_text(text)
    monkeypatch.setattr(runtime, "NVIDIA_DRIVER_VERSION_FILE", path)
    assert nvidia_driver_version() == version
    monkeypatch.setattr(runtime, "NVIDIA_DRIVER_VERSION_FILE", tmp_path / "missing")
    assert nvidia_driver_version() is None


def test_the_runtime_description_of_a_cpu_run_carries_the_fallback_reason():
    info = describe_runtime(torch.device("cpu"), "fp32", fallback="why")
    assert info["device"] == "cpu" and info["precision"] == "fp32" and info["torch"] == torch.__version__
    assert info["compute_capability"] is None and info["device_warning"] == "why"
    assert info["threads"] == torch.get_num_threads()


# ------------------------------------------------------------------------------------------ batch size

GIB = 2**30


@pytest.mark.parametrize("available, per_frame, reserve, limit, expected", [
    (14 * GIB, 50 * 2**20, 2 * GIB, 64, 64),      # T4-sized memory, ViT-L-like activations: the cap
    (4 * GIB, 50 * 2**20, 2 * GIB, 64, 40),       # 2 GiB left: 40.96 frames -> 40 (a multiple of 8)
    (3 * GIB, 100 * 2**20, 2 * GIB, 64, 8),       # 10 frames -> 8
    (2 * GIB + 500 * 2**20, 100 * 2**20, 2 * GIB, 64, 5),  # fewer than 8 fit: kept as is
    (1 * GIB, 100 * 2**20, 2 * GIB, 64, 1),       # nothing fits: one frame at a time, never 0
    (130 * GIB, 50 * 2**20, 2 * GIB, 256, 256),   # an H200 with a higher cap
])
def test_batch_size_from_free_memory(available, per_frame, reserve, limit, expected):
    assert batch_size_for_memory(available, per_frame, reserve, limit=limit) == expected


def test_batch_size_needs_a_positive_frame_cost():
    with pytest.raises(ValueError):
        batch_size_for_memory(GIB, 0)


def test_batch_plan_keeps_the_decoder_inputs_of_a_whole_case_beside_the_batch():
    # 12 GiB, 60 MiB of activations and 2.3 MiB held per waiting frame (ViT-L, fp16 features)
    batch, waiting = cuda_batch_plan(12 * GIB, 60 * 2**20, 2.3 * 2**20, case_frames=840, limit=64)
    assert batch == 64
    assert waiting >= 840  # the whole case is decided at once: one host synchronisation
    batch, waiting = cuda_batch_plan(5 * GIB, 60 * 2**20, 2.3 * 2**20, case_frames=840, limit=64)
    assert batch == 48  # (5 GiB - 840 x 2.3 MiB) / 60 MiB = 52.5 -> 48
    assert waiting == int((5 * GIB - 48 * 60 * 2**20) * 0.5 // (2.3 * 2**20))
    assert cuda_batch_plan(5 * GIB, 60 * 2**20, 2.3 * 2**20, 840, given=16)[0] == 16
    assert cuda_batch_plan(5 * GIB, 60 * 2**20, 0.0, 840) == (64, 64)  # no lazy decoder: nothing waits


def test_available_memory_respects_a_per_process_cap(monkeypatch):
    """A T4-like run on a large GPU: 141 GiB card, capped at 15 GiB; 3 GiB allocated, 1 GiB cached free."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (130 * GIB, 141 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 4 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * GIB)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 15 / 141,
                        raising=False)
    assert cuda_memory_available(torch.device("cuda")) == pytest.approx(12 * GIB, rel=1e-9)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0, raising=False)
    assert cuda_memory_available(torch.device("cuda")) == 131 * GIB  # free + cached, under no cap


def test_the_runtime_description_of_a_gpu_names_it_and_its_capability(monkeypatch):
    from types import SimpleNamespace

    from algorithm.runtime import runtime_line

    t4 = SimpleNamespace(name="Tesla T4", major=7, minor=5, total_memory=15 * GIB + GIB // 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: t4)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.setattr(runtime, "nvidia_driver_version", lambda: "535.183.01")
    info = describe_runtime(torch.device("cuda"), choose_precision("auto", "cuda", capability=(7, 5)))
    assert info["device_name"] == "Tesla T4" and info["compute_capability"] == "7.5"
    assert info["precision"] == "fp16" and info["cuda"] == "12.6" and info["driver"] == "535.183.01"
    assert info["memory_gib"] == 15.5 and info["cudnn"] == 91002 and "device_warning" not in info
    assert runtime_line(info) == (f"cuda (Tesla T4, compute capability 7.5); torch {torch.__version__}, CUDA 12.6, "
                                  "driver 535.183.01; precision fp16")
