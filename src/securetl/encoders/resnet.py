"""Encoders: a CIFAR-style ResNet-18 assembled from timm's pieces, or any `timm.create_model` name.

Every encoder maps images in [0, 1] to a flat feature vector and carries its own input normalisation,
so triggers, probes and defenses all work in [0, 1] pixel space. `stages` are exposed so that probes can
fine-tune only the last stage and T-Core can read representations at several depths.
"""

from __future__ import annotations

import timm
import torch
from timm.models.resnet import BasicBlock, make_blocks
from torch import Tensor, nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class Encoder(nn.Module):
    """A stack of stages followed by global pooling. `forward(x)` -> (N, feat_dim)."""

    def __init__(self, stages: list[nn.Module], feat_dim: int, mean=CIFAR_MEAN, std=CIFAR_STD) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.feat_dim = feat_dim
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def forward_from(self, h: Tensor, start: int) -> Tensor:
        """Run stages[start:] on an intermediate activation and pool (used by last-stage fine-tuning)."""
        for stage in self.stages[start:]:
            h = stage(h)
        return self.pool(h)

    def forward_until(self, x: Tensor, stop: int) -> Tensor:
        """Activation after stages[:stop] for images in [0, 1]."""
        h = self.normalize(x)
        for stage in self.stages[:stop]:
            h = stage(h)
        return h

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Every stage's output (the raw maps), for multi-layer representations."""
        h = self.normalize(x)
        outs = []
        for stage in self.stages:
            h = stage(h)
            outs.append(h)
        return outs

    @staticmethod
    def pool(h: Tensor) -> Tensor:
        return h.mean(dim=(2, 3)) if h.dim() == 4 else h

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_from(self.normalize(x), 0)


def cifar_resnet18(width: int = 64) -> Encoder:
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool (as in SimCLR/BadEncoder CIFAR code).

    Blocks come from timm; `width` scales every stage (64 = the standard ResNet-18, 512-d features).
    """
    if width < 4:
        raise ValueError(f"encoder.width must be >= 4, got {width}")
    stage_args, _ = make_blocks(
        (BasicBlock,) * 4,
        channels=(width, 2 * width, 4 * width, 8 * width),
        block_repeats=(2, 2, 2, 2),
        inplanes=width,
    )
    layers = [m for _, m in stage_args]
    stem = nn.Sequential(
        nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
    )
    return Encoder([stem, *layers], feat_dim=8 * width)


class _TimmStage(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        feats = self.model.forward_features(x)
        return self.model.forward_head(feats, pre_logits=True)


def timm_encoder(name: str, pretrained: bool = False, img_size: int | None = None, **kwargs) -> Encoder:
    """Any timm model as a single-stage encoder (e.g. `vit_tiny_patch16_224` with img_size=32)."""
    if pretrained:
        raise ValueError(
            "encoder.pretrained=true would download weights at run time, which this suite never does; "
            "load a local file with encoder.checkpoint=PATH instead"
        )
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    cfg = model.pretrained_cfg or {}
    mean = tuple(cfg.get("mean", CIFAR_MEAN))
    std = tuple(cfg.get("std", CIFAR_STD))
    return Encoder([_TimmStage(model)], feat_dim=model.num_features, mean=mean, std=std)


def build_encoder(arch: str = "cifar_resnet18", width: int = 64, **timm_kwargs) -> Encoder:
    """Encoder from config keys `arch` (cifar_resnet18 or a timm name) and `width`."""
    if arch == "cifar_resnet18":
        return cifar_resnet18(width)
    if arch not in timm.list_models():
        raise ValueError(f"encoder.arch={arch!r} is neither 'cifar_resnet18' nor a timm model name")
    return timm_encoder(arch, **timm_kwargs)
