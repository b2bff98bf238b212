"""Downstream training paradigms: linear / MLP head on a frozen encoder, or fine-tuning.

Frozen-encoder probes train on features extracted once (memoised per encoder state and image tensor);
`finetune` with `trainable: last_stage` memoises the activations entering the last stage and trains that
stage + the head, which is what "fine-tune the top of the encoder" costs on a CPU; `trainable: all` trains
everything with random-crop/flip augmentation on batches.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from securetl import guard
from securetl.interfaces import LabeledSet, Model, RunContext
from securetl.numerics import Numerics, rand, randint
from securetl.progress import bar_disabled

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- memoised forward passes
def _fingerprint(module: nn.Module) -> tuple:
    """Cheap identity of an encoder's current weights (changes whenever training touched it); one host
    read for all tensors, not one per tensor."""
    with torch.no_grad():
        sums = [t.double().abs().sum() for t in (*module.parameters(), *module.buffers())]
        return tuple(torch.stack(sums).cpu().tolist()) if sums else ()


# (encoder weights, images) -> output. An entry holds its images tensor: keyed on the data pointer alone, a
# later sweep job's images could land at a freed address (the allocator reuses them) and hit a stale entry.
_MEMO: dict[tuple, list] = {}  # key -> [images, output (device or host), host copy or None]
_MEMO_MAX = 16


@torch.no_grad()
def batched_forward(
    fn,
    images: Tensor,
    where: Numerics | torch.device | RunContext,
    batch: int = 512,
    desc: str | None = None,
    progress: bool = False,
    keep_on_device: bool | str = False,
    transform=None,
) -> Tensor:
    """Apply `fn` to uint8 or float images in batches under the run's precision, results as fp32 on the
    CPU, or left on the device with `keep_on_device` (True; or "fit": if all outputs fit the device's
    resident budget, judged from the first batch). The inputs are made resident once and the outputs
    copied back once, so the device never waits on the host between batches. `transform` (a trigger) runs
    on each float batch first, in fp32: a frequency trigger's DCT in bf16 would lose the trigger."""
    num = as_numerics(where)
    src = num.resident(images)
    outs = []
    keep = keep_on_device
    # one autocast region for the whole pass (it keeps its weight casts for the region), the trigger
    # excepted
    with num.autocast():
        for i in tqdm(range(0, len(images), batch), desc=desc, disable=bar_disabled(progress), leave=False):
            xb = num.batch(src[i : i + batch])
            if transform is not None:
                with num.full_precision():
                    xb = transform(xb)
            out = fn(xb).float()
            if keep == "fit":
                keep = num.fits(out.numel() * out.element_size() * len(images) / max(1, len(xb)))
            outs.append(out if keep else out.cpu())
    out = torch.cat(outs) if outs else torch.empty(0, device=num.device if keep else "cpu")
    return out if keep else out.cpu()


def as_numerics(where: Numerics | torch.device | RunContext) -> Numerics:
    """The numerics of a run context, or the default policy for a bare device."""
    if isinstance(where, Numerics):
        return where
    if isinstance(where, RunContext):
        return where.num
    return Numerics.resolve(where)


def memo_forward(
    encoder: nn.Module, images: Tensor, ctx: RunContext, stop: int | None = None, on_device: bool = False
) -> Tensor:
    """Features (stop=None) or the activation after `stop` stages, memoised on (encoder state, images).

    A GPU run keeps them on the device when they fit: `on_device=True` returns that copy (a training loop
    then reads it in place; else a host copy, made once), the default returns them on the host."""
    key = (_fingerprint(encoder), images.data_ptr(), tuple(images.shape), images.stride(), images.dtype, stop)
    if key not in _MEMO:
        was_training = encoder.training
        ctx.num.module(encoder.eval())
        fn = encoder if stop is None else (lambda x: encoder.forward_until(x, stop))
        out = batched_forward(
            fn,
            images,
            ctx,
            desc="features",
            progress=ctx.progress and len(images) > 5000,
            keep_on_device="fit" if ctx.num.cuda else False,
        )
        _MEMO[key] = [images, out, None]
        encoder.train(was_training)
        while len(_MEMO) > _MEMO_MAX:
            _MEMO.pop(next(iter(_MEMO)))
    entry = _MEMO[key]
    if on_device or entry[1].device.type == "cpu":
        return entry[1]
    if entry[2] is None:
        entry[2] = entry[1].cpu()
    return entry[2]


def clear_memo() -> None:
    _MEMO.clear()


def trainable_copy(module: nn.Module) -> nn.Module:
    """A copy whose parameters take gradients (the pipeline hands out encoders frozen)."""
    module = copy.deepcopy(module)
    for p in module.parameters():
        p.requires_grad_(True)
    return module


# --------------------------------------------------------------------------- heads
class Standardize(nn.Module):
    """Fixed feature standardisation (statistics of the training features), so one lr fits every encoder."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clamp_min(1e-6).clone())

    def forward(self, f: Tensor) -> Tensor:
        return (f - self.mean) / self.std


def make_head(kind: str, feats: Tensor, num_classes: int, hidden: int) -> nn.Module:
    std = Standardize(feats.mean(0), feats.std(0))
    d = feats.shape[1]
    if kind == "mlp":
        return nn.Sequential(std, nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
    return nn.Sequential(std, nn.Linear(d, num_classes))


def flip_crop(x: Tensor, pad: int = 4, g: torch.Generator | None = None) -> Tensor:
    """Per-sample random crop (with reflection padding) and horizontal flip on a batch."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    # drawn on the generator's device (the same draws as always on CPU; no host copy on a GPU)
    dx = randint(0, 2 * pad + 1, n, g, x.device)
    dy = randint(0, 2 * pad + 1, n, g, x.device)
    rows = dy.view(n, 1) + torch.arange(h, device=x.device)
    cols = dx.view(n, 1) + torch.arange(w, device=x.device)
    out = xp[
        torch.arange(n, device=x.device).view(n, 1, 1, 1),
        torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1),
        rows.view(n, 1, h, 1),
        cols.view(n, 1, 1, w),
    ]
    flip = (rand(n, g, x.device) < 0.5).view(n, 1, 1, 1)
    return torch.where(flip, out.flip(-1), out)


class _Tail(nn.Module):
    """Last encoder stage + head, trained on memoised activations."""

    def __init__(self, encoder: nn.Module, start: int, head: nn.Module) -> None:
        super().__init__()
        self.stages = nn.ModuleList(encoder.stages[start:])
        self.head = head

    def features(self, h: Tensor) -> Tensor:
        """The head's input: the trainable stages' pooled output."""
        for s in self.stages:
            h = s(h)
        return h.mean(dim=(2, 3)) if h.dim() == 4 else h

    def forward(self, h: Tensor) -> Tensor:
        return self.head(self.features(h))


# --------------------------------------------------------------------------- the probe
class Probe:
    """How the downstream model is trained. Config keys (conf/probe/*.yaml):

    kind: linear | mlp | finetune; epochs, lr, batch_size, weight_decay; hidden (MLP width);
    head: linear | mlp (the head used by `finetune`); trainable: last_stage | last2 | all (finetune: the
    encoder's top one or two stages, trained on memoised activations, or everything);
    augment: random crop + flip during `finetune` with trainable=all; optimizer: adam | sgd (momentum 0.9).
    """

    def __init__(
        self,
        kind: Literal["linear", "mlp", "finetune"] = "linear",
        epochs: int = 30,
        lr: float = 1e-3,
        batch_size: int = 256,
        weight_decay: float = 0.0,
        hidden: int = 256,
        head: Literal["linear", "mlp"] = "linear",
        trainable: Literal["last_stage", "last2", "all"] = "last_stage",
        encoder_lr: float | None = None,
        augment: bool = True,
        optimizer: Literal["adam", "sgd"] = "adam",
    ) -> None:
        if kind not in ("linear", "mlp", "finetune"):
            raise ValueError(f"probe.kind={kind!r}; choose linear, mlp or finetune")
        if trainable not in ("last_stage", "last2", "all"):
            raise ValueError(f"probe.trainable={trainable!r}; choose last_stage, last2 or all")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"probe.optimizer={optimizer!r}; choose adam or sgd")
        self.kind, self.epochs, self.lr, self.batch_size = kind, epochs, lr, batch_size
        self.weight_decay, self.hidden, self.head, self.trainable = weight_decay, hidden, head, trainable
        self.encoder_lr = lr if encoder_lr is None else encoder_lr
        self.augment, self.optimizer = augment, optimizer

    @property
    def frozen(self) -> bool:
        return self.kind != "finetune"

    # ------------------------------------------------------------------ public
    def fit(self, encoder: nn.Module, train: LabeledSet, ctx: RunContext, epochs: int | None = None) -> Model:
        """Train a downstream model on `train`; the given encoder is not modified (a copy is trained)."""
        if len(train) == 0:
            raise ValueError("cannot train a probe on an empty training set")
        epochs = self.epochs if epochs is None else epochs
        g = ctx.generator(salt=17)
        torch.manual_seed(ctx.seed)
        if self.frozen:
            feats = memo_forward(encoder, train.x, ctx, on_device=True)
            head = ctx.num.module(make_head(self.kind, feats, ctx.num_classes, self.hidden))
            self._train_loop(
                head, feats, train.y, ctx, epochs, g, [{"params": head.parameters(), "lr": self.lr}]
            )
            return Model(encoder, head).eval()
        n_top = {"last_stage": 1, "last2": 2}.get(self.trainable)
        if n_top is not None and hasattr(encoder, "stages") and len(encoder.stages) > n_top:
            start = len(encoder.stages) - n_top
            # before the copy, so the memo hits; on a GPU the activations stay there
            acts = memo_forward(encoder, train.x, ctx, stop=start, on_device=True)
            encoder = trainable_copy(encoder)
            with torch.no_grad():
                feats = batched_forward(
                    lambda h: encoder.forward_from(h, start), acts, ctx, keep_on_device=True
                )
            head = make_head(self.head, feats, ctx.num_classes, self.hidden)
            tail = ctx.num.module(_Tail(encoder, start, head))
            groups = [
                {"params": tail.stages.parameters(), "lr": self.encoder_lr},
                {"params": head.parameters(), "lr": self.lr},
            ]
            self._train_loop(tail, acts, train.y, ctx, epochs, g, groups)
            for i, stage in enumerate(tail.stages):
                encoder.stages[start + i] = stage
            return Model(encoder, head).eval()
        # whole-encoder fine-tuning on images
        feats = memo_forward(encoder, train.x, ctx, on_device=True)
        encoder = trainable_copy(encoder)
        head = make_head(self.head, feats, ctx.num_classes, self.hidden)
        model = ctx.num.module(Model(encoder, head))
        groups = [
            {"params": encoder.parameters(), "lr": self.encoder_lr},
            {"params": head.parameters(), "lr": self.lr},
        ]
        self._train_loop(model, train.x, train.y, ctx, epochs, g, groups, images=True)
        return model.eval()

    # ------------------------------------------------------------------ internals
    def _train_loop(
        self,
        module: nn.Module,
        inputs: Tensor,
        y: Tensor,
        ctx: RunContext,
        epochs: int,
        g: torch.Generator,
        groups: list[dict],
        images: bool = False,
    ) -> None:
        train_loop(
            module,
            inputs,
            y,
            ctx,
            groups,
            epochs=epochs,
            batch_size=self.batch_size,
            g=g,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            augment=images and self.augment,
            desc=f"probe[{self.kind}]",
        )


LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
Schedule = Literal["cosine"] | Sequence[int] | None  # train_loop's learning-rate schedule


def cross_entropy_loss(module: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
    return F.cross_entropy(module(xb), yb)


def train_loop(
    module: nn.Module,
    inputs: Tensor,
    y: Tensor,
    ctx: RunContext,
    groups: list[dict],
    *,
    epochs: int,
    batch_size: int,
    g: torch.Generator,
    optimizer: Literal["adam", "sgd"] = "sgd",
    weight_decay: float = 0.0,
    augment: bool = False,
    loss_fn: LossFn = cross_entropy_loss,
    desc: str = "train",
    schedule: Schedule = None,
    on_epoch_end: Callable[[int], bool | None] | None = None,
) -> None:
    """Minibatch training of `module` on `inputs` (images, or memoised features/activations) and labels `y`:
    the probe's loop, shared by every defense that trains the probe's scope itself. `groups` are optimiser
    parameter groups (each with its `lr`); `loss_fn(module, xb, yb)` (default: CE of module(xb)) lets a method
    add its own terms; `augment` = crop + flip on image batches. Batches are drawn from `g`; the forward runs
    under the run's autocast. `schedule`, stepped once an epoch: None (constant lr), "cosine" (to 0 over the
    epochs: CosineAnnealingLR, T_max = epochs) or a list of epochs after which every lr is multiplied by 0.1
    (MultiStepLR). `on_epoch_end(epochs_done)` runs after each epoch and its schedule step (it may evaluate the
    module; training mode is restored after it); True stops the loop there. Leaves `module` in eval mode.
    Divergence (securetl.guard): a non-finite loss or parameter/buffer is checked once an epoch, before the
    schedule step and `on_epoch_end`; under `recover` the epoch is undone (the state it started from, lr x 0.1) or,
    after repeated triggers, the loop stops there. Recorded in ctx.diagnostics as `guard/<desc>`."""
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(groups, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer={optimizer!r}; choose sgd or adam")
    step_lr = _lr_schedule(opt, schedule, epochs)
    n = len(y)
    num = ctx.num
    # inputs on the device once (pinned host memory when they do not fit); the labels are small, and the loss needs
    # them where the logits are
    src, ys = num.resident(inputs), num.put(y)
    g_aug = num.generator(g)
    watch = guard.Watch(desc, module, opt, record=ctx.diagnostics)
    module.train()
    bar = tqdm(
        range(epochs), desc=desc, disable=bar_disabled(ctx.progress) or epochs * n < 200_000, leave=False
    )
    for epoch in bar:
        watch.begin()
        perm = torch.randperm(n, generator=g)
        # the order where each tensor lives, one copy an epoch: inputs too large for the device stay in pinned host
        # memory (num.resident), and a CUDA index into a host tensor raises. On CPU both are `perm` itself.
        perm_x = perm.to(src.device, non_blocking=True)
        perm_y = perm_x if ys.device == src.device else perm.to(ys.device, non_blocking=True)
        for s in range(0, n, batch_size):
            xb = num.batch(src[perm_x[s : s + batch_size]])
            if augment:
                xb = flip_crop(xb, g=g_aug)
            with num.autocast():
                loss = loss_fn(module, xb, ys[perm_y[s : s + batch_size]])
            watch.observe(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if watch.end(epoch + 1) == guard.STOP:
            break
        if step_lr is not None:
            step_lr(epoch + 1)
        if on_epoch_end is not None:
            if on_epoch_end(epoch + 1):
                break
            module.train()
    module.eval()


def _lr_schedule(opt: torch.optim.Optimizer, schedule: Schedule, epochs: int) -> Callable[[int], None] | None:
    """What train_loop calls after each epoch (with the epochs done) to step the learning rate; None: constant."""
    if schedule is None:
        return None
    if schedule == "cosine":
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
        return lambda _: cosine.step()
    if isinstance(schedule, str):
        raise ValueError(f"schedule={schedule!r}; choose cosine, a list of milestone epochs, or None")
    milestones = {int(m) for m in schedule}

    def step(done: int) -> None:
        # in place, as MultiStepLR's step: after epoch `done`, x 0.1 when it is a milestone
        if done in milestones:
            for group in opt.param_groups:
                group["lr"] *= 0.1

    return step


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, ctx: RunContext, transform=None, batch: int = 512) -> Tensor:
    """Predicted labels for uint8/float images, optionally transformed (e.g. a trigger) on the float batch."""
    ctx.num.module(model.eval())
    return batched_forward(lambda xb: model(xb).argmax(1), x, ctx, batch=batch, transform=transform).long()


def symmetric_ce(
    logits: Tensor, y: Tensor, alpha: float = 0.1, beta: float = 1.0, reduction: str = "mean"
) -> Tensor:
    """Symmetric cross-entropy (Wang et al., ICCV 2019), as DBD and ASD use it to rank samples by loss:
    alpha CE + beta RCE, where the reverse CE -sum_k p_k log q_k reads the softmax p (clamped to [1e-7, 1]) against
    the one-hot label q clamped to [1e-4, 1] (SCLBD/DBD model/loss.py). RCE is bounded, so a mislabelled sample's
    loss does not run off the way CE's does."""
    logits = logits.float()
    ce = F.cross_entropy(logits, y, reduction="none")
    p = logits.softmax(1).clamp(1e-7, 1.0)
    q = F.one_hot(y, logits.shape[1]).float().clamp(1e-4, 1.0)
    out = alpha * ce - beta * (p * q.log()).sum(1)
    if reduction == "mean":
        return out.mean()
    if reduction == "none":
        return out
    raise ValueError(f"reduction={reduction!r}; choose mean or none")


def sample_losses(
    logits: Tensor, y: Tensor, loss: str = "ce", alpha: float = 0.1, beta: float = 1.0
) -> Tensor:
    """Per-sample loss of logits: `ce`, or `sce` (symmetric CE with weights alpha, beta)."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "sce":
        return symmetric_ce(logits, y, alpha, beta, reduction="none")
    raise ValueError(f"loss={loss!r}; choose ce or sce")


@torch.no_grad()
def per_sample_loss(
    model: nn.Module,
    data: LabeledSet | tuple[Tensor, Tensor],
    where: RunContext | Numerics | torch.device,
    batch: int = 512,
    loss: str = "ce",
    alpha: float = 0.1,
    beta: float = 1.0,
) -> Tensor:
    """The loss of every sample under `model` (eval mode), on the host where selections happen. `data`: a
    LabeledSet of images, or (inputs, labels) for a module that reads memoised features/activations; `loss`: ce |
    sce (symmetric CE, weights alpha and beta). The forward runs in fp32 even where the run trains under bf16:
    these losses are ranked (ABL's lowest 1 %, DBD's and ASD's splits), and bf16 logits of 10-20 resolve only
    0.06-0.125, which reorders the samples near the split line. On CPU (always fp32) nothing changes."""
    x, y = (data.x, data.y) if isinstance(data, LabeledSet) else data
    num = as_numerics(where)
    num.module(model.eval())

    def full(xb: Tensor) -> Tensor:
        with num.full_precision():  # leaves batched_forward's autocast region for the model's forward
            return model(xb)

    logits = batched_forward(full, x, num, batch=batch, keep_on_device=True)
    return sample_losses(logits, num.put(y), loss, alpha, beta).cpu()
