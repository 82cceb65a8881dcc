"""UNETR-style decoders: ViT token maps from four depths plus the input image -> full-resolution mask logits.

Two of them: `UNETRDecoder` (ours, `ModelConfig.decoder = "unetr"`, described here) and
`SeparableUNETRDecoder` (`"separable"`, the published FetalCLIPSEG decoder, described in its docstring).

Layout (Hatamizadeh et al. 2022, in 2D). With a G x G token grid (16 x 16 for ViT-L/14 at 224 px):

    deepest map (G)  ──────────────── bottleneck ─┐ up x2
    3rd map → 1 up-projection  (2G, 8f) ──── concat, res block ─┐ up x2
    2nd map → 2 up-projections (4G, 4f) ──────── concat, res block ─┐ up x2
    1st map → 3 up-projections (8G, 2f) ──────────── concat, res block ─┐ resize to the image size
    input image → res block (H, f) ──────────────────────── concat, res block → 1x1 conv → logits

The three token paths and the bottleneck use stride-2 transposed convolutions. 8G (128 px) is not a power
of two below 224 px, so the last step resizes bilinearly to the input size (a uniform rescale of the token
geometry; the published FetalCLIPSEG code instead shrinks the 16 x 16 token grids to 14 x 14 first, which
drops token resolution at every depth). The full-resolution image path restores edge detail.

Normalisation is InstanceNorm (affine), as in MONAI's UNETR. BatchNorm would depend on batch statistics
while training (frames of one sweep are nearly identical, so a batch's statistics are strongly biased) and
on running averages at inference, which then differ from what training saw; InstanceNorm computes the
same thing for a frame alone or in any batch, in train and eval mode, and keeps no buffers.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=True)


class ConvNormAct(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, act: bool = True):
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
            _norm(out_ch),
        ]
        if act:
            layers.append(nn.LeakyReLU(0.01, inplace=True))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """Two 3x3 conv-norm layers with a (1x1 projected when needed) identity shortcut."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = ConvNormAct(in_ch, out_ch)
        self.conv2 = ConvNormAct(out_ch, out_ch, act=False)
        self.shortcut = nn.Identity() if in_ch == out_ch else ConvNormAct(in_ch, out_ch, kernel_size=1, act=False)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class UpProjection(nn.Sequential):
    """Token map -> `steps` x2 upsamplings: a bare transposed conv, then (transposed conv, conv block) pairs."""

    def __init__(self, in_ch: int, out_ch: int, steps: int):
        layers: list[nn.Module] = [nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2, bias=False)]
        for _ in range(steps - 1):
            layers += [nn.ConvTranspose2d(out_ch, out_ch, 2, stride=2, bias=False), ConvNormAct(out_ch, out_ch)]
        super().__init__(*layers)


class UpBlock(nn.Module):
    """Upsample x2 (transposed conv) or to a given size (bilinear + 1x1), concat the skip, fuse."""

    def __init__(self, in_ch: int, out_ch: int, skip_ch: int, resize: bool = False):
        super().__init__()
        self.resize = resize
        self.up = (nn.Conv2d(in_ch, out_ch, 1, bias=False) if resize
                   else nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2, bias=False))
        self.fuse = ResBlock(out_ch + skip_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if self.resize:  # after the 1x1 conv (they commute), so the full-size tensor has fewer channels
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x, skip], dim=1))


class UNETRDecoder(nn.Module):
    """Four token maps of `width` channels (shallow to deep) + the network input -> `num_classes` logits."""

    def __init__(self, width: int, num_classes: int, filters: int = 32, in_channels: int = 3):
        super().__init__()
        f = filters
        self.image_path = ResBlock(in_channels, f)
        self.proj1 = UpProjection(width, 2 * f, steps=3)  # 8G
        self.proj2 = UpProjection(width, 4 * f, steps=2)  # 4G
        self.proj3 = UpProjection(width, 8 * f, steps=1)  # 2G
        self.up4 = UpBlock(width, 8 * f, skip_ch=8 * f)  # bottleneck G -> 2G
        self.up3 = UpBlock(8 * f, 4 * f, skip_ch=4 * f)  # 2G -> 4G
        self.up2 = UpBlock(4 * f, 2 * f, skip_ch=2 * f)  # 4G -> 8G
        self.up1 = UpBlock(2 * f, f, skip_ch=f, resize=True)  # 8G -> image size
        self.head = nn.Conv2d(f, num_classes, 1)

    def forward(self, image: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != 4:
            raise ValueError(f"the decoder takes 4 token maps, got {len(features)}")
        z1, z2, z3, z4 = features
        x = self.up4(z4, self.proj3(z3))
        x = self.up3(x, self.proj2(z2))
        x = self.up2(x, self.proj1(z1))
        x = self.up1(x, self.image_path(image))
        return self.head(x)


# ------------------------------------------------------------------------------------------ the published decoder

class SeparableConv(nn.Sequential):
    """Depthwise k x k conv, BatchNorm, ReLU, then pointwise 1 x 1 conv, BatchNorm, ReLU (convs with bias)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3):
        super().__init__(
            nn.Conv2d(in_ch, in_ch, kernel_size, padding=kernel_size // 2, groups=in_ch),
            nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True),
            nn.Conv2d(in_ch, out_ch, 1),
            nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
        )


class SeparableUpConv(nn.Sequential):
    """x2 depthwise transposed conv, then a SeparableConv."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.ConvTranspose2d(in_ch, in_ch, 2, stride=2, groups=in_ch), SeparableConv(in_ch, out_ch))


class SeparableUpsample(nn.Sequential):
    """x2 depthwise transposed conv, then a pointwise 1 x 1 conv; no normalisation (the end of a stage)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.ConvTranspose2d(in_ch, in_ch, 2, stride=2, groups=in_ch), nn.Conv2d(in_ch, out_ch, 1))


class SeparableUNETRDecoder(nn.Module):
    """The published FetalCLIPSEG decoder (a 2-D UNETR of depthwise-separable blocks), same shape and sizes.

    The four token maps are first resized bilinearly to image_size / 16 (14 x 14 at 224 px, as the published
    code does), so four x2 steps reach the image size:

        deepest map → upsample ───────────────┐ concat (2G', 16f) → 3 blocks → upsample
        3rd map → 1 up-conv (8f) ─────────────┘                                    │ concat (8f) → 2 blocks → upsample
        2nd map → 2 up-convs (4f) ─────────────────────────────────────────────────┘        │ concat → 2 blocks → upsample
        1st map → 3 up-convs (2f) ──────────────────────────────────────────────────────────┘          │
        input image → 2 blocks (f) ──────────────────────────────────────── concat (2f) → 2 blocks → 1x1 → logits

    BatchNorm, not InstanceNorm: it is what the published weights were trained with (statistics of the batch
    while training, running averages at inference). The output has `num_classes` channels for our softmax
    post-processing where the published head had one sigmoid channel (2-class softmax = sigmoid of the
    logit difference: the same family of masks, f + 1 more parameters).
    """

    def __init__(self, width: int, num_classes: int, filters: int = 32, in_channels: int = 3,
                 image_size: int = 224):
        super().__init__()
        if image_size % 16:
            raise ValueError(f"the separable decoder needs an image size divisible by 16, got {image_size}")
        self.grid = image_size // 16
        f = filters
        self.image_path = nn.Sequential(SeparableConv(in_channels, f), SeparableConv(f, f))
        self.proj1 = nn.Sequential(SeparableUpConv(width, 8 * f), SeparableUpConv(8 * f, 4 * f),
                                   SeparableUpConv(4 * f, 2 * f))
        self.proj2 = nn.Sequential(SeparableUpConv(width, 8 * f), SeparableUpConv(8 * f, 4 * f))
        self.proj3 = SeparableUpConv(width, 8 * f)
        self.bottleneck = SeparableUpsample(width, 8 * f)
        self.stage3 = nn.Sequential(SeparableConv(16 * f, 8 * f), SeparableConv(8 * f, 8 * f),
                                    SeparableConv(8 * f, 8 * f), SeparableUpsample(8 * f, 4 * f))
        self.stage2 = nn.Sequential(SeparableConv(8 * f, 4 * f), SeparableConv(4 * f, 4 * f),
                                    SeparableUpsample(4 * f, 2 * f))
        self.stage1 = nn.Sequential(SeparableConv(4 * f, 2 * f), SeparableConv(2 * f, 2 * f),
                                    SeparableUpsample(2 * f, f))
        self.head = nn.Sequential(SeparableConv(2 * f, f), SeparableConv(f, f), nn.Conv2d(f, num_classes, 1))

    def forward(self, image: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != 4:
            raise ValueError(f"the decoder takes 4 token maps, got {len(features)}")
        z1, z2, z3, z4 = (F.interpolate(z, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
                          for z in features)
        x = self.stage3(torch.cat([self.proj3(z3), self.bottleneck(z4)], dim=1))
        x = self.stage2(torch.cat([self.proj2(z2), x], dim=1))
        x = self.stage1(torch.cat([self.proj1(z1), x], dim=1))
        return self.head(torch.cat([self.image_path(image), x], dim=1))
