"""Coarse-to-fine frame search and the lazy decoder, on the small config.

The frame choice is checked with `training.speed.LabelOracle`, a stand-in network that answers from a
replica case's ground truth (blurred along time, with logit noise), because a randomly initialised network
has no abdomen to find; the real small network (random weights) checks the bookkeeping.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from training.speed import LabelOracle
from algorithm.config import FRAME_NONE, Config, ModelConfig
from algorithm.model.fetalclipseg import build_model
from algorithm.network import Network
from algorithm.predict import CaseResult, predict
from algorithm.search import FrameSearch, resolve_coarse_stride
from algorithm.select import NO_FRAME, nan_moving_average, sweep_bounds

SMALL = ModelConfig.small()


@pytest.fixture(scope="module")
def replica():
    from training.data.replica import generate_case

    return generate_case(5003, frames_per_sweep=48)


def run(model, stack: np.ndarray, **overrides) -> CaseResult:
    settings = {"device": "cpu", "precision": "fp32", **overrides}
    return predict(stack, Network(model, Config(model=SMALL).replace(**settings)))


@pytest.fixture(scope="module")
def oracle(replica) -> LabelOracle:
    """Stateless across networks (no parameters, fp32), so one serves every test."""
    return LabelOracle(replica.image, replica.mask, SMALL.image_size, noise=0.5, seed=0)


def dense_tier(result, frame: int, config) -> int:
    """Tier of `frame` in a dense scan's result, as `select` computes it."""
    smoothed = result.selection.smoothed_probabilities[frame]
    p_abdomen = smoothed[1] + smoothed[2]
    big = result.scores.mask_fractions[frame] >= config.min_mask_fraction
    if big and smoothed[2] >= config.min_quality_probability:
        return 2
    return 1 if big and p_abdomen >= config.min_quality_probability else FRAME_NONE


def test_coarse_search_finds_the_dense_frame_with_far_fewer_frames(replica, oracle):
    dense = run(oracle, replica.image, coarse_stride=1)
    # 48-frame sweeps compress the runs (a median optimal run of 8 real frames becomes ~3): stride 3 here
    # is what stride 8 is on 140-frame sweeps.
    coarse = run(oracle, replica.image, coarse_stride=3)
    assert dense.frame != NO_FRAME
    assert coarse.frame == dense.frame
    assert coarse.frames_encoded < 0.6 * dense.frames_encoded
    assert coarse.search["coarse_stride"] == 3 and coarse.search["refine_rounds"]


def test_lazy_decoder_keeps_the_choice_and_decodes_few_frames(replica, oracle):
    full = run(oracle, replica.image, coarse_stride=1, lazy_decoder="off")
    lazy = run(oracle, replica.image, coarse_stride=1, lazy_decoder="on")
    assert lazy.frame == full.frame
    assert full.frames_decoded == full.frames_encoded
    assert lazy.frames_decoded < 0.3 * lazy.frames_encoded
    # every frame that can be chosen was decoded
    chosen = lazy.selection.smoothed_probabilities
    choosable = (chosen[:, 1] + chosen[:, 2]) >= lazy_config().min_quality_probability
    assert not (choosable & ~lazy.scores.decoded).any()
    np.testing.assert_allclose(lazy.scores.mask_fractions[lazy.scores.decoded],
                               full.scores.mask_fractions[lazy.scores.decoded])


def lazy_config():
    return Config(model=SMALL).inference


def test_coarse_search_with_the_small_network(replica):
    """Random weights: no abdomen to find, but the search must encode far fewer frames, score them exactly
    as the dense scan does, and return a frame that the dense scan also ranks as a candidate."""
    tiny = dataclasses.replace(SMALL, decoder_filters=4)  # the full-resolution decoder dominates on a CPU
    torch.manual_seed(0)
    weights = build_model(tiny).state_dict()

    def model():
        m = build_model(tiny)
        m.load_state_dict(weights)
        return m

    stack = replica.image[:72]  # quick: the first 72 frames, split into 6 sweeps of 12 by `select`
    dense = run(model(), stack, coarse_stride=1, lazy_decoder="off")
    coarse = run(model(), stack, coarse_stride=4, refine_radius=2, lazy_decoder="off")
    assert coarse.frames_encoded < dense.frames_encoded
    both = coarse.scores.scored
    np.testing.assert_allclose(coarse.scores.probabilities[both], dense.scores.probabilities[both], atol=1e-4)
    if coarse.frame == NO_FRAME:
        assert dense.frame == NO_FRAME or coarse.selection.candidates
    else:
        chosen_tier = next(c.tier for c in coarse.selection.candidates if c.frame == coarse.frame)
        assert dense_tier(dense, coarse.frame, lazy_config()) == chosen_tier


def test_coarse_frames_skip_lift_off_and_cover_every_sweep():
    config = Config(model=SMALL).replace(device="cpu")
    search = FrameSearch.for_network(Network(build_model(SMALL), config))
    n = 60
    candidates = np.array([f for f in range(n) if f not in (0, 1, 2, 30)])  # lift-off frames left out
    coarse = search.coarse_frames(candidates, n, stride=4)
    assert set(coarse) <= set(candidates)
    for start, stop in sweep_bounds(n, config.inference.sweeps):
        assert ((coarse >= start) & (coarse < stop)).any()
    assert len(coarse) <= len(candidates) // 4 + config.inference.sweeps


def test_auto_stride_is_dense_on_cuda_and_coarse_on_the_cpu_for_wide_encoders():
    inference = Config().inference
    assert inference.coarse_stride == 0  # auto
    assert resolve_coarse_stride(inference, torch.device("cuda")) == 1
    assert resolve_coarse_stride(inference, torch.device("cpu")) == inference.cpu_coarse_stride > 1
    full, small = ModelConfig(), ModelConfig.small()
    assert resolve_coarse_stride(inference, torch.device("cpu"), full.width) == inference.cpu_coarse_stride
    assert resolve_coarse_stride(inference, torch.device("cpu"), small.width) == 1
    network = Network(build_model(small), Config(model=small).replace(device="cpu"))
    assert FrameSearch.for_network(network).coarse_stride == 1
    explicit = Config().replace(coarse_stride=3).inference
    assert resolve_coarse_stride(explicit, torch.device("cuda")) == 3


def test_smoothing_of_coarse_scores_ignores_unscored_frames():
    """What the refinement relies on: NaN frames do not drag a scored frame's smoothed value down."""
    values = np.array([np.nan, 0.9, np.nan, np.nan, 0.2])
    smoothed = nan_moving_average(values, 3)
    assert smoothed[1] == pytest.approx(0.9)
    assert smoothed[3] == pytest.approx(0.2)
