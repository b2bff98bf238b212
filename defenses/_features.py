"""Shared machinery (BASELINES.md section 3): the model trained on D and its representations, and the part of the
downstream model a probe trains, for the defenses that train it themselves (CT, ASSET).

`reference_model`  M0: the probe trained on all of D (what `defense=none` would deploy).
`features`         M0's representation of images, memoised: the encoder's output (the penultimate layer:
                   the frozen encoder under a linear/MLP probe, the fine-tuned encoder under probe=finetune),
                   or the logits. Extends securetl.probe.memo_forward (keyed on the encoder's weights).
`Scope`            what a probe trains and what enters it: a head on frozen features, or the encoder's top
                   stages + a head on the memoised activations that enter them.

Every forward pass runs on `ctx.device`; what comes back is a CPU float tensor, so that selections (sorting,
thresholds) happen on the host and are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from securetl.interfaces import LabeledSet, Model, RunContext
from securetl.probe import Probe, _Tail, batched_forward, make_head, memo_forward, trainable_copy


def reference_model(encoder: nn.Module, train: LabeledSet, probe: Probe, ctx: RunContext) -> Model:
    """M0: the probe trained on all of D, from the same initialisation as the final model."""
    return probe.fit(encoder, train, ctx)


def features(model: Model, images: Tensor, ctx: RunContext, layer: str = "encoder") -> Tensor:
    """(N, D) CPU features of `images` under `model`: `encoder` (the head's input) or `logits`."""
    if layer == "encoder":
        return memo_forward(model.encoder, images, ctx)
    if layer == "logits":
        model.eval().to(ctx.device)
        return batched_forward(model, images, ctx.device)
    raise ValueError(f"layer={layer!r}; choose encoder or logits")


@dataclass
class Scope:
    """The trainable part of the downstream model under a probe: `start` is the first trainable encoder stage
    (None: a head on frozen features). `inputs` are what enters it, memoised on the host."""

    encoder: nn.Module
    start: int | None
    inputs: Tensor
    head_kind: str
    hidden: int

    @classmethod
    def of(cls, encoder: nn.Module, probe: Probe, x: Tensor, ctx: RunContext) -> Scope:
        """The scope `probe` trains. finetune with trainable=all is treated as every stage trained on the
        normalised images (no augmentation: the memoised-input loop of the other modes)."""
        if probe.frozen:
            return cls(encoder, None, memo_forward(encoder, x, ctx), probe.kind, probe.hidden)
        n_top = {"last_stage": 1, "last2": 2}.get(probe.trainable)
        n = len(encoder.stages)
        start = n - n_top if n_top is not None and n > n_top else 0
        return cls(encoder, start, memo_forward(encoder, x, ctx, stop=start), probe.head, probe.hidden)

    def inputs_for(self, x: Tensor, ctx: RunContext) -> Tensor:
        """What enters the scope for other images (e.g. the clean reserve), memoised the same way."""
        return memo_forward(self.encoder, x, ctx, stop=self.start)

    def module(self, num_classes: int, ctx: RunContext) -> nn.Module:
        """A fresh trainable module on `ctx.device`: a new head (standardised on the training features) on the
        received encoder's top stages (a copy; the encoder itself is not touched)."""
        if self.start is None:
            return make_head(self.head_kind, self.inputs, num_classes, self.hidden).to(ctx.device)
        enc = trainable_copy(self.encoder)
        with torch.no_grad():
            enc.eval().to(ctx.device)
            f = batched_forward(lambda h: enc.forward_from(h, self.start), self.inputs, ctx.device)
        head = make_head(self.head_kind, f, num_classes, self.hidden)
        return _Tail(enc, self.start, head).to(ctx.device)

    @staticmethod
    @torch.no_grad()
    def penultimate(module: nn.Module, inputs: Tensor, device: torch.device, batch: int = 512) -> Tensor:
        """The head's input under `module` (the pooled output of the last stage, or the frozen features), CPU."""
        module.eval().to(device)
        if isinstance(module, _Tail):
            return batched_forward(module.features, inputs, device, batch=batch)
        return inputs.float().clone()

    @staticmethod
    @torch.no_grad()
    def logits(module: nn.Module, inputs: Tensor, device: torch.device, batch: int = 512) -> Tensor:
        module.eval().to(device)
        return batched_forward(module, inputs, device, batch=batch)
