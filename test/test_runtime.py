"""The one precision policy: native bf16 only from compute capability 8.0, fp16 below, fp32 on request."""
from __future__ import annotations

import pytest
import torch

from algorithm.runtime import autocast, choose_precision, needs_grad_scaling


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
