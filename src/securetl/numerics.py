"""Where and how a run computes: device, precision, memory format, determinism, CPU threads.

One object decides every device-placement and precision question, so that training and inference loops
say `num.module(m)`, `num.batch(x)`, `with num.autocast():` instead of scattering `.to()`s and dtype
choices. The policy (config keys `device`, `precision`, `deterministic`, `threads` in conf/run.yaml):

  CPU   fp32, contiguous (NCHW) tensors, deterministic algorithms, `threads` intra-op threads: bit-for-bit
        the numbers every committed table was made with. `precision` is ignored (recorded as fp32).
  CUDA  `precision: auto` = bf16 autocast (weights and optimiser state stay fp32), channels_last for conv
        nets, uint8 datasets resident on the device when they fit (else pinned host memory and
        non-blocking copies), augmentation random numbers drawn on the device, cudnn.benchmark unless
        `deterministic: true` (then deterministic kernels, slower).

A row records `Numerics.record()`: results made under different numerics are not bit-comparable, and the
table tool says so when one cell mixes them.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
# share of the device's free memory a dataset may take when made resident; the rest is for training
RESIDENT_SHARE = 0.25


@dataclass(frozen=True)
class Numerics:
    device: torch.device
    precision: str = "fp32"  # effective: fp32 | bf16
    deterministic: bool = True
    threads: int | None = None  # None: leave torch's setting alone (library use, tests)

    @classmethod
    def resolve(
        cls,
        device: torch.device | str,
        precision: str = "auto",
        deterministic: bool = False,
        threads: int | None = None,
    ) -> Numerics:
        """The effective policy for `device`: CPU is always fp32 and deterministic."""
        device = torch.device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}; choose one of {', '.join(PRECISIONS)}")
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads={threads} must be >= 1")
        if device.type != "cuda":
            return cls(device, "fp32", True, threads)
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision=bf16 but this GPU has no bf16 support; use precision=fp32")
        eff = "bf16" if precision == "auto" and torch.cuda.is_bf16_supported() else precision
        return cls(device, "fp32" if eff == "auto" else eff, bool(deterministic), threads)

    # ------------------------------------------------------------------ process-wide switches
    def apply_global(self) -> None:
        """Threads, determinism and cuDNN autotuning for this process (called once per run)."""
        if self.threads is not None:
            torch.set_num_threads(int(self.threads))
        if self.device.type == "cuda":
            if self.deterministic:
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = not self.deterministic
            torch.backends.cuda.matmul.allow_tf32 = not self.deterministic
            torch.backends.cudnn.allow_tf32 = not self.deterministic
        torch.use_deterministic_algorithms(self.deterministic, warn_only=True)

    def record(self) -> dict[str, object]:
        """What a row stores about how it was computed."""
        return {
            "device": self.device.type,
            "precision": self.precision,
            "deterministic": self.deterministic,
            "threads": self.threads if self.threads is not None else torch.get_num_threads(),
            "channels_last": self.channels_last,
        }

    # ------------------------------------------------------------------ per-loop helpers
    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def channels_last(self) -> bool:
        return self.cuda

    def autocast(self):
        """bf16 autocast on CUDA when the policy says so; nothing on CPU."""
        if self.precision == "bf16" and self.cuda:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def full_precision(self):
        """fp32 inside an autocast region (a trigger, whose arithmetic bf16 would change)."""
        if self.precision == "bf16" and self.cuda:
            return torch.autocast(device_type="cuda", enabled=False)
        return nullcontext()

    def module(self, m: nn.Module) -> nn.Module:
        """`m` on the device (in place, as `.to` does), channels_last on CUDA."""
        if self.channels_last:
            return m.to(self.device, memory_format=torch.channels_last)
        return m.to(self.device)

    def batch(self, x: Tensor) -> Tensor:
        """A batch of images (uint8 or float in [0, 1], anywhere) as float [0, 1] on the device. Left in
        NCHW: a trigger or augmentation may reshape it, and a conv whose weights are channels_last turns
        its input to channels_last itself."""
        x = x.to(self.device, non_blocking=True)
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x

    def put(self, t: Tensor) -> Tensor:
        """Any tensor (labels, activations, indices) on the device."""
        return t.to(self.device, non_blocking=True)

    def resident(self, x: Tensor) -> Tensor:
        """`x` kept on the device when it fits in RESIDENT_SHARE of the free memory (memoised per tensor,
        so a loop that asks every epoch copies once); otherwise pinned host memory for async copies. On
        CPU, `x` itself."""
        if not self.cuda or x.device == self.device:
            return x
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, str(self.device))
        hit = _RESIDENT.get(key)
        if hit is not None and hit[0] is x:
            _RESIDENT.move_to_end(key)
            return hit[1]
        need = x.numel() * x.element_size()
        if self.fits(need):
            log.debug("resident on %s: %.1f MiB", self.device, need / 2**20)
            out = x.to(self.device, non_blocking=True)
        else:
            log.info("%.1f MiB does not fit %s: pinned host memory instead", need / 2**20, self.device)
            out = x.pin_memory()
        _RESIDENT[key] = (x, out)  # holding x keeps its address from being reused by another tensor
        while len(_RESIDENT) > _RESIDENT_MAX:
            _RESIDENT.popitem(last=False)
        return out

    def fits(self, nbytes: float) -> bool:
        """Whether `nbytes` more may live on the device (RESIDENT_SHARE of its free memory); False on CPU."""
        return self.cuda and nbytes <= RESIDENT_SHARE * torch.cuda.mem_get_info(self.device)[0]

    def generator(self, g: torch.Generator) -> torch.Generator:
        """The generator for random numbers drawn per batch (augmentation): `g` itself on CPU, so CPU runs
        draw exactly what they always drew; on CUDA a device generator seeded from `g`, so the draws
        happen where the batch is, with no host round trip."""
        if not self.cuda:
            return g
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        return torch.Generator(device=self.device).manual_seed(seed)


_RESIDENT: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()
_RESIDENT_MAX = 8


def clear_resident() -> None:
    _RESIDENT.clear()


def take(x: Tensor, idx: Tensor) -> Tensor:
    """x[idx] with the index (or boolean mask) moved to x's device first: selections are made on the host,
    the data they select may live on the GPU."""
    return x[idx.to(x.device)]


def rand(n: int, g: torch.Generator | None, device: torch.device | str) -> Tensor:
    """n uniform numbers drawn on the generator's device (CPU when g is None) and placed on `device`."""
    where = g.device if g is not None else torch.device("cpu")
    return torch.rand(n, generator=g, device=where).to(device, non_blocking=True)


def randint(lo: int, hi: int, n: int, g: torch.Generator | None, device: torch.device | str) -> Tensor:
    where = g.device if g is not None else torch.device("cpu")
    return torch.randint(lo, hi, (n,), generator=g, device=where).to(device, non_blocking=True)
