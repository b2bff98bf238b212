"""SSL methods as small modules: each owns its heads and returns a loss for two views of a batch.

`SSLMethod.loss(v1, v2)` is all the shared trainer (securetl.ssl.trainer) needs. Methods with a momentum
(key / target) network update it in `after_step()`, which the trainer calls after every optimiser step,
and may read the length of the run in `begin(total_steps)` (BYOL's cosine EMA schedule). Momentum
networks are frozen copies (requires_grad=False), so the trainer's optimiser never sees them.

Every constructor keyword is a key of the encoder config's `method:` node.
"""

from __future__ import annotations

import copy
import inspect
import math

import torch
from torch import Tensor, nn

from securetl.ssl.losses import info_nce_queue, normalized_mse, nt_xent


def mlp(in_dim: int, hidden: int, out: int, bn: bool = True) -> nn.Sequential:
    """Linear-(BN)-ReLU-Linear projection/prediction head."""
    norm = [nn.BatchNorm1d(hidden)] if bn else []
    return nn.Sequential(nn.Linear(in_dim, hidden), *norm, nn.ReLU(inplace=True), nn.Linear(hidden, out))


def frozen_copy(module: nn.Module) -> nn.Module:
    """A momentum network: same weights, no gradients."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter."""
    t_params = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, o_params, alpha=1.0 - momentum)


class SSLMethod(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def loss(self, v1: Tensor, v2: Tensor) -> Tensor:
        raise NotImplementedError

    def begin(self, total_steps: int) -> None:
        """Called once before training with the number of optimiser steps to come."""

    def after_step(self) -> None:
        """Hook for momentum updates; SimCLR has none."""

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The optimiser's parameter groups: every trainable parameter, one weight decay (SimCLR, MoCo v2)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": weight_decay}]

    def lr_factor(self, step: int) -> float | None:
        """encoder.lr's factor for optimiser step `step` (0-based); None: the trainer leaves the rate alone."""
        return None


class SimCLR(SSLMethod):
    """Chen et al., ICML 2020: encoder + MLP projection head, NT-Xent between the two views."""

    def __init__(self, encoder: nn.Module, proj_dim: int = 128, temperature: float = 0.5) -> None:
        super().__init__(encoder)
        d = encoder.feat_dim
        self.head = mlp(d, d, proj_dim)
        self.temperature = temperature

    def loss(self, v1: Tensor, v2: Tensor) -> Tensor:
        return nt_xent(self.head(self.encoder(v1)), self.head(self.encoder(v2)), self.temperature)


class MoCoV2(SSLMethod):
    """MoCo v2 (Chen, Fan, Girshick & He, arXiv 2020): a query encoder trained by InfoNCE against a
    momentum key encoder's output (positive) and a queue of earlier keys (negatives); MLP head without BN.

    proj_dim: output of the head; temperature: InfoNCE T (0.2 in MoCo v2); queue_size: K negatives;
    momentum: m of the key encoder's EMA; symmetric: add the loss with the views swapped (common on
    CIFAR-scale data, off in the paper); key_bn_groups: the key batch is shuffled and run through the
    key encoder in this many groups, so BatchNorm statistics cannot leak which key matches which query
    (the single-device stand-in for MoCo's multi-GPU "shuffle BN").
    """

    def __init__(
        self,
        encoder: nn.Module,
        proj_dim: int = 128,
        temperature: float = 0.2,
        queue_size: int = 65536,
        momentum: float = 0.999,
        symmetric: bool = False,
        key_bn_groups: int = 4,
    ) -> None:
        super().__init__(encoder)
        if queue_size < 1 or not 0.0 <= momentum < 1.0 or key_bn_groups < 1:
            raise ValueError("encoder.method: need queue_size >= 1, 0 <= momentum < 1 and key_bn_groups >= 1")
        d = encoder.feat_dim
        self.head = mlp(d, d, proj_dim, bn=False)
        self.key_net = frozen_copy(nn.Sequential(encoder, self.head))
        self.temperature, self.momentum, self.symmetric = temperature, momentum, symmetric
        self.key_bn_groups = key_bn_groups
        queue = nn.functional.normalize(torch.randn(queue_size, proj_dim), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending: list[Tensor] = []
        self._ptr = 0  # host copy of queue_ptr: reading the buffer every step would stall a GPU

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ptr = int(self.queue_ptr)

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        """Normalised keys; the batch is shuffled and split so each group gets its own BN statistics."""
        n = len(x)
        groups = max(1, min(self.key_bn_groups, n // 2))
        perm = torch.randperm(n, device=x.device)
        parts = [(idx, self.key_net(x[idx])) for idx in perm.chunk(groups)]
        # the keys' dtype, not the images': under bf16 autocast the key network answers in bf16
        out = torch.empty(n, self.queue.shape[1], device=x.device, dtype=parts[0][1].dtype)
        for idx, k in parts:
            out[idx] = k
        return nn.functional.normalize(out, dim=1)

    def _one_way(self, vq: Tensor, vk: Tensor) -> Tensor:
        q = self.head(self.encoder(vq))
        k = self.keys(vk)
        self._pending.append(k)
        return info_nce_queue(q, k, self.queue, self.temperature)

    def loss(self, v1: Tensor, v2: Tensor) -> Tensor:
        self._pending = []
        if self.symmetric:
            return 0.5 * (self._one_way(v1, v2) + self._one_way(v2, v1))
        return self._one_way(v1, v2)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        size = self.queue.shape[0]
        keys = keys[-size:]
        idx = (self._ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self._ptr = (self._ptr + len(keys)) % size
        self.queue_ptr.fill_(self._ptr)

    def after_step(self) -> None:
        # keys are enqueued only after backward: the loss graph still holds the old queue
        ema_update(self.key_net, nn.Sequential(self.encoder, self.head), self.momentum)
        if self._pending:
            self.enqueue(torch.cat(self._pending))
            self._pending = []


class BYOL(SSLMethod):
    """BYOL (Grill et al., NeurIPS 2020): an online encoder+projector+predictor regresses the output of an
    EMA target encoder+projector with the normalised MSE 2 - 2cos, symmetrised over the two views.

    proj_dim / hidden_dim: projector and predictor sizes (256 / 4096 in the paper); tau: EMA rate at the
    start; tau_schedule: "cosine" raises tau to 1 over training as in the paper, "constant" keeps it.
    lr_warmup: share of the run over which the learning rate rises linearly from 0 (the paper: 10 of 1000
    epochs); lr_schedule: "cosine" then decays it to 0 (the paper), "constant" keeps it;
    decay_bias_and_norm: False keeps weight decay off biases and BatchNorm parameters (the paper excludes
    them from weight decay and LARS adaptation).
    """

    def __init__(
        self,
        encoder: nn.Module,
        proj_dim: int = 256,
        hidden_dim: int = 4096,
        tau: float = 0.996,
        tau_schedule: str = "cosine",
        lr_warmup: float = 0.0,
        lr_schedule: str = "constant",
        decay_bias_and_norm: bool = True,
    ) -> None:
        super().__init__(encoder)
        if not 0.0 <= tau < 1.0:
            raise ValueError(f"encoder.method.tau={tau} must lie in [0, 1)")
        if tau_schedule not in ("cosine", "constant"):
            raise ValueError(f"encoder.method.tau_schedule={tau_schedule!r}; choose cosine or constant")
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"encoder.method.lr_schedule={lr_schedule!r}; choose cosine or constant")
        if not 0.0 <= lr_warmup < 1.0:
            raise ValueError(f"encoder.method.lr_warmup={lr_warmup} must lie in [0, 1) (a share of the run)")
        d = encoder.feat_dim
        self.projector = mlp(d, hidden_dim, proj_dim)
        self.predictor = mlp(proj_dim, hidden_dim, proj_dim)
        self.target = frozen_copy(nn.Sequential(encoder, self.projector))
        self.tau0, self.tau, self.tau_schedule = tau, tau, tau_schedule
        self.lr_warmup, self.lr_schedule = lr_warmup, lr_schedule
        self.decay_bias_and_norm = decay_bias_and_norm
        self.step, self.total_steps = 0, 0

    def loss(self, v1: Tensor, v2: Tensor) -> Tensor:
        p1 = self.predictor(self.projector(self.encoder(v1)))
        p2 = self.predictor(self.projector(self.encoder(v2)))
        with torch.no_grad():
            t1, t2 = self.target(v1), self.target(v2)
        return normalized_mse(p1, t2) + normalized_mse(p2, t1)

    def begin(self, total_steps: int) -> None:
        self.step, self.total_steps = 0, max(1, int(total_steps))

    def after_step(self) -> None:
        ema_update(self.target, nn.Sequential(self.encoder, self.projector), self.tau)
        self.step += 1
        if self.tau_schedule == "cosine" and self.total_steps:
            progress = min(1.0, self.step / self.total_steps)
            self.tau = 1 - (1 - self.tau0) * (math.cos(math.pi * progress) + 1) / 2

    def param_groups(self, weight_decay: float) -> list[dict]:
        if self.decay_bias_and_norm:
            return super().param_groups(weight_decay)
        params = [p for p in self.parameters() if p.requires_grad]
        # biases and BatchNorm scales/shifts are the 1-d parameters
        return [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]

    def lr_factor(self, step: int) -> float | None:
        if self.lr_warmup == 0 and self.lr_schedule == "constant":
            return None
        warm = int(self.lr_warmup * self.total_steps)
        if step < warm:
            return (step + 1) / warm
        if self.lr_schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, self.total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


SSL_METHODS: dict[str, type[SSLMethod]] = {"simclr": SimCLR, "mocov2": MoCoV2, "byol": BYOL}


def check_method(name: str, kwargs: dict) -> None:
    """Raise ValueError, before any training, if `encoder.ssl` is unknown or `encoder.method` has a key
    that method does not take (e.g. a MoCo `queue_size` left in a BYOL config)."""
    if name not in SSL_METHODS:
        raise ValueError(f"encoder.ssl={name!r} is unknown; choose from {sorted(SSL_METHODS)}")
    params = inspect.signature(SSL_METHODS[name]).parameters
    unknown = sorted(set(kwargs) - set(params) - {"encoder"})
    if unknown:
        accepted = sorted(set(params) - {"encoder"})
        raise ValueError(f"encoder.method keys {unknown} do not fit encoder.ssl={name} (it takes {accepted})")


def build_method(name: str, encoder: nn.Module, **kwargs) -> SSLMethod:
    check_method(name, kwargs)
    return SSL_METHODS[name](encoder, **kwargs)
