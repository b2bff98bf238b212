"""The small set of types every attack, defense and probe speaks.

Constructors take config values only (no I/O, no device work); methods take runtime objects.
Images are uint8 tensors (N, C, H, W) at rest and float tensors in [0, 1] when a model or trigger sees them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data containers
@dataclass
class LabeledSet:
    """Images kept as uint8 in memory (cheap to hold, cheap to index) with int64 labels."""

    x: Tensor  # (N, C, H, W) uint8
    y: Tensor  # (N,) int64

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8:
            raise TypeError(f"LabeledSet images must be uint8, got {self.x.dtype}")
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} images but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: Tensor) -> LabeledSet:
        return LabeledSet(self.x[idx], self.y[idx])

    def floats(self, idx: Tensor | slice | None = None) -> Tensor:
        x = self.x if idx is None else self.x[idx]
        return to_float(x)


def to_float(x: Tensor) -> Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def to_uint8(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255.0).round_().to(torch.uint8)


@dataclass
class Splits:
    """What a dataset provides: the downstream task, and (for SSL) the pre-training images."""

    name: str
    train: LabeledSet
    test: LabeledSet
    num_classes: int
    class_names: list[str]
    # Pre-training domain. Labels are kept because attacks on pre-training data (SSL-Backdoor,
    # CorruptEncoder, CTRL) assume the attacker can find target-category images; SSL never reads them.
    pretrain: LabeledSet | None = None
    # Downstream-domain images the attacker owns (BadEncoder's "reference inputs"); never in train/test.
    reference: LabeledSet | None = None
    # Object-free images of the pre-training domain (uint8 N x C x H x W), the scenes CorruptEncoder pastes
    # its objects on (the authors use Places365); None where the dataset has none.
    background: Tensor | None = None
    # The clean reserve: labelled downstream images, class-balanced, disjoint from train and test, the same
    # for every run of a dataset. Only a defense whose Knowledge.clean_fraction > 0 receives part of it
    # (RunContext.clean, handed over by the pipeline); synthetic data generate it, real datasets carve it
    # from the official test split.
    clean: LabeledSet | None = None


@dataclass
class Poisoned:
    """A (possibly) poisoned training set and the ground truth the pipeline keeps for diagnostics."""

    train: LabeledSet
    poison_idx: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    cover_idx: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


# --------------------------------------------------------------------------- run context
@dataclass
class RunContext:
    """Runtime objects a method may use: device, seed, the artifact cache, and a progress switch."""

    device: torch.device
    seed: int
    num_classes: int
    cache: Any = None  # securetl.cache.Cache
    progress: bool = True
    # the defense's share of the clean reserve (None unless its Knowledge.clean_fraction > 0); the pipeline
    # sets it on the context it hands to the defense only
    clean: LabeledSet | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    # how to compute on `device` (precision, channels_last, resident data): securetl.numerics.Numerics;
    # None = the default policy for the device
    numerics: Any = None

    def __post_init__(self) -> None:
        from securetl.numerics import Numerics

        self.device = torch.device(self.device)
        if self.numerics is None:
            self.numerics = Numerics.resolve(self.device)
        elif self.numerics.device != self.device:
            raise ValueError(
                f"RunContext: numerics are for {self.numerics.device}, the run is on {self.device}"
            )

    @property
    def num(self):
        """Shorthand: `ctx.num.batch(x)`, `ctx.num.module(m)`, `with ctx.num.autocast():`."""
        return self.numerics

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded from the run seed; `salt` keeps streams of different steps apart."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)


# --------------------------------------------------------------------------- triggers
class Trigger:
    """A backdoor trigger: a deterministic map on a float batch in [0, 1]; knows nothing about labels."""

    def apply(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return self.apply(x)

    def apply_uint8(self, x: Tensor, batch: int = 4096) -> Tensor:
        out = torch.empty_like(x)
        for i in range(0, len(x), batch):
            out[i : i + batch] = to_uint8(self.apply(to_float(x[i : i + batch])))
        return out


# --------------------------------------------------------------------------- attacks
class _TriggerAttack:
    """What every attack shares: a trigger, a target, and how its ASR is measured."""

    name: ClassVar[str] = "base"
    group: ClassVar[str] = "attack"  # the config group, for messages
    trigger: Trigger | None = None
    target: int | None = None
    asr_definition: ClassVar[str] = "non-target test samples"

    def validate(self, num_classes: int, sizes: Any = None) -> None:
        """Raise ValueError on settings that make no sense for this dataset (before any training).
        `sizes` (securetl.validate.DataSizes, when known): images per class of train / reference /
        pre-training, for attacks that need a number of images of some class."""
        if self.target is not None and not 0 <= self.target < num_classes:
            raise ValueError(f"{self.group}.target={self.target} but the dataset has {num_classes} classes")

    def apply_test(self, x: Tensor) -> Tensor:
        """The trigger used at test time (some attacks use a stronger one than in training)."""
        assert self.trigger is not None
        return self.trigger.apply(x)

    def asr_mask(self, y: Tensor) -> Tensor:
        """Which test samples count for ASR. Default: all whose true label is not the target."""
        return y != self.target


class DataAttack(_TriggerAttack):
    """Threat-2: poisons the downstream training set. `poison_rate` is a fraction of the WHOLE train set."""

    group = "data_attack"

    def poison(self, train: LabeledSet, generator: torch.Generator) -> Poisoned:
        raise NotImplementedError


class EncoderAttack(_TriggerAttack):
    """Threat-1: either fine-tunes a clean encoder (`implant`) or poisons its pre-training data."""

    group = "encoder_attack"
    kind: ClassVar[str] = "none"  # "finetune" | "pretrain_data" | "none"

    def implant(
        self, encoder: nn.Module, shadow: LabeledSet, ctx: RunContext, reference: LabeledSet | None = None
    ) -> nn.Module:
        """Fine-tune `encoder` with the attacker's shadow (pre-training) data and target-class references."""
        return encoder

    def poison_pretraining(
        self, pretrain: LabeledSet, generator: torch.Generator, background: Tensor | None = None
    ) -> LabeledSet | list[LabeledSet]:
        """The pre-training set SSL will see: one set, or a list of sets whose images differ in size (an
        attacker's uploads need not match the victim's images; the trainer crops each at its own aspect).
        `background`: object-free images of the pre-training domain (uint8, N x C x H x W) where the dataset
        has them, for attacks that compose poisons on a scene."""
        return pretrain


def pretraining_sets(poisoned: LabeledSet | list[LabeledSet]) -> list[LabeledSet]:
    """What `EncoderAttack.poison_pretraining` returned, as a list of sets."""
    return poisoned if isinstance(poisoned, list) else [poisoned]


class NoDataAttack(DataAttack):
    """Null object: the training set is returned untouched."""

    name = "none"

    def __init__(self) -> None:
        self.trigger = None
        self.target = None

    def poison(self, train: LabeledSet, generator: torch.Generator) -> Poisoned:
        return Poisoned(train)


class NoEncoderAttack(EncoderAttack):
    """Null object: the encoder is used as pre-trained."""

    name = "none"

    def __init__(self) -> None:
        self.trigger = None
        self.target = None


# --------------------------------------------------------------------------- model
class Model(nn.Module):
    """Encoder + head: images in [0, 1] -> logits. Evaluation has exactly one code path through this."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


# --------------------------------------------------------------------------- defenses
@dataclass(frozen=True)
class Knowledge:
    """What a defense is allowed to see. `reads_poison_idx` is never True: the pipeline does not hand it over."""

    clean_fraction: float = 0.0  # fraction of the train set the defender may assume clean (0 = none)
    needs_clean: bool = False  # the method cannot run without clean data: clean_fraction=0 is a ConfigError
    trains_encoder: bool = False
    reads_poison_idx: bool = False


class Defense:
    """Owns downstream training. Subclasses override `filter` (detection) and/or `repair` (removal),
    or `train` as a whole (methods such as T-Core that interleave both).

    The defense sees the encoder and the possibly-poisoned LabeledSet — never `poison_idx`.
    Whatever it decides it records in `self.decisions` (e.g. the indices it kept); the pipeline
    turns those into TPR/FPR/purity afterwards.
    """

    name: ClassVar[str] = "base"
    knowledge: Knowledge = Knowledge()  # the class's declaration; an instance may override clean_fraction
    # starts from M0, the probe trained on D (shared by a cell's methods and cached, so only the first run of a
    # sweep pays for it: a cost report charges it to every method that declares it)
    uses_reference_model: ClassVar[bool] = False

    def __init__(self, clean_fraction: float | None = None) -> None:
        """`clean_fraction` (config `defense.clean_fraction`): overrides the declared share of clean data."""
        self.decisions: dict[str, Any] = {}
        self.diagnostics: dict[str, Any] = {}
        if clean_fraction is not None:
            if not 0.0 <= float(clean_fraction) <= 1.0:
                raise ValueError(f"defense.clean_fraction={clean_fraction} must lie in [0, 1]")
            self.knowledge = replace(type(self).knowledge, clean_fraction=float(clean_fraction))

    def filter(self, encoder: nn.Module, train: LabeledSet, probe: Any, ctx: RunContext) -> Tensor:
        """Indices of `train` to keep. Default: all."""
        return torch.arange(len(train))

    def repair(self, encoder: nn.Module, train: LabeledSet, probe: Any, ctx: RunContext) -> nn.Module:
        """A (possibly) repaired encoder. Default: unchanged."""
        return encoder

    def train(self, encoder: nn.Module, train: LabeledSet, probe: Any, ctx: RunContext) -> Model:
        keep = self.filter(encoder, train, probe, ctx)
        self.decisions["kept_idx"] = keep
        kept = train.subset(keep)
        encoder = self.repair(encoder, kept, probe, ctx)
        return probe.fit(encoder, kept, ctx)


class NoDefense(Defense):
    """Null object: the plain probe on the data as given."""

    name = "none"
