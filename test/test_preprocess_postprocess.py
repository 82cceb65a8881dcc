"""Preprocessing geometry and mask post-processing on drawn masks."""
import cv2
import numpy as np
import pytest
import torch

from algorithm.config import CLIP_MEAN, CLIP_STD
from algorithm.postprocess import abdomen_probability, clean_mask, largest_component
from algorithm.preprocess import SquarePad, pad_to_square, preprocess_frames, upsample_to_frame


def test_square_pad_centres_the_frame():
    geometry = SquarePad(562, 744)
    assert (geometry.side, geometry.top, geometry.left) == (744, 91, 0)
    frames = torch.ones(2, 562, 744)
    square = pad_to_square(frames)
    assert square.shape == (2, 744, 744)
    assert square[:, :91].sum() == 0 and square[:, 91 + 562:].sum() == 0
    assert square[:, 91:91 + 562].min() == 1
    assert torch.equal(geometry.crop(square), frames)


def test_preprocess_shapes_range_and_normalisation():
    frames = np.zeros((3, 562, 744), dtype=np.uint8)
    frames[1] = 255
    x = preprocess_frames(frames, 224)
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32
    black = [(0.0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    white = [(1.0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(x[0, :, 100, 100], torch.tensor(black), atol=1e-5)
    assert torch.allclose(x[1, :, 112, 112], torch.tensor(white), atol=1e-5)
    # the padding rows of a white frame stay black
    assert torch.allclose(x[1, :, 2, 112], torch.tensor(black), atol=1e-5)


def test_upsample_inverts_the_geometry():
    # A disc drawn on the original frame, preprocessed and upsampled back, lands where it started.
    frame = np.zeros((562, 744), dtype=np.uint8)
    cv2.circle(frame, (500, 300), 80, 255, -1)
    network = preprocess_frames(frame[None], 224)[:, :1]
    back = upsample_to_frame(network, 562, 744)[0, 0].numpy()
    recovered = back > back.mean()
    iou = (recovered & (frame > 0)).sum() / (recovered | (frame > 0)).sum()
    assert iou > 0.9


def test_abdomen_probability_has_frame_shape():
    probability = abdomen_probability(torch.rand(224, 224, dtype=torch.float16), 562, 744)
    assert probability.shape == (562, 744) and probability.dtype == np.float32


def test_clean_mask_keeps_largest_component_fills_holes_and_respects_fov():
    probability = np.zeros((200, 300), dtype=np.float32)
    cv2.ellipse(probability, (150, 100), (80, 50), 0, 0, 360, 1.0, -1)
    cv2.circle(probability, (150, 100), 15, 0.0, -1)  # a hole (the stomach bubble missed)
    cv2.circle(probability, (20, 20), 8, 1.0, -1)  # a stray blob
    fov = np.ones((200, 300), dtype=bool)
    fov[:, 220:] = False
    mask = clean_mask(probability, fov, 0.5)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert mask[100, 150] == 1  # hole filled
    assert mask[20, 20] == 0  # blob removed
    assert mask[:, 220:].sum() == 0  # outside the FOV
    assert mask[100, 210] == 1


def test_clean_mask_empty_when_nothing_passes_threshold():
    assert clean_mask(np.full((50, 50), 0.2, dtype=np.float32), None, 0.5).sum() == 0


def test_largest_component_single_component_unchanged():
    mask = np.zeros((30, 30), dtype=bool)
    mask[5:10, 5:10] = True
    assert np.array_equal(largest_component(mask), mask)
