"""Divergence guard: no training loop goes on, or hands on its result, after its loss or its parameters turned
non-finite (issue 18: T-Core's gradient-ascent unlearning diverged, every logit became NaN, the masks came out NaN
and were read as "0 untrusted channels" while the run went on as if nothing had happened).

A loop watches the parameters its optimiser(s) update and its module's floating-point buffers (BN statistics):

    watch = Watch("tcore/unlearn", module, opt, unit="step")
    for each window (an epoch; a step where the loop reads the host anyway):
        watch.begin()                         # snapshot: a copy on the tensors' device, no host read
        ... watch.observe(loss) every step ... # a device-side flag: no host sync per step on a GPU
        if watch.end(step) == STOP: break      # one host read: was every loss, and is every watched tensor, finite?

On a trigger the run's policy decides:
  recover (default)  restore the last finite state (the window's start; after a non-finite loss, the start of the
                     last window that passed, since the window's first loss came from its start), clear the
                     optimiser's state (the momentum that carried it there), multiply every learning rate by
                     `shrink`, and go on with the next window; after `retries` triggers in one loop, restore and
                     stop that loop. A warning is logged.
  fail               raise DivergenceError: one line naming the phase and the step.
Every trigger is written into a diagnostics dict the row carries: `guard/<phase>` (a list of {unit, step, what,
action}) and `guard/<phase>/triggers` (a count). Keys per phase, so that records kept in different dicts of one
run (the defense's, its context's) never overwrite each other when the pipeline merges them.

Where the policy and the record come from: a `session` (T-Core opens one around its four phases with its
`divergence` key and its diagnostics), else the policy `recover` and the dict the loop is given (train_loop: its
context's diagnostics). With nothing diverging nothing changes: the snapshot and the checks only read tensors and
draw no random numbers, so a CPU run stays bit-identical.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

POLICIES = ("recover", "fail")
DEFAULT_POLICY = "recover"
OK, RETRY, STOP = "ok", "retry", "stop"
_BAD_LOSS = "non-finite loss"  # what `Watch.end` says: go on, went back (go on), went back and stop

# (policy, record) of the innermost session
_SESSION: ContextVar[tuple[str, dict | None]] = ContextVar("securetl_guard", default=(DEFAULT_POLICY, None))


class DivergenceError(FloatingPointError):
    """A training loop's loss or parameters became non-finite under policy `fail`."""


def check_policy(policy: str, where: str = "divergence") -> str:
    if policy not in POLICIES:
        raise ValueError(f"{where}={policy!r}; choose {' or '.join(POLICIES)}")
    return policy


@contextmanager
def session(policy: str | None = None, record: dict | None = None) -> Iterator[None]:
    """Within the block, every Watch uses `policy` (None: the enclosing one) and writes its triggers into
    `record` (None: the enclosing session's, else the dict the loop itself passes)."""
    outer_policy, outer_record = _SESSION.get()
    token = _SESSION.set(
        (
            outer_policy if policy is None else check_policy(policy),
            outer_record if record is None else record,
        )
    )
    try:
        yield
    finally:
        _SESSION.reset(token)


def current_policy() -> str:
    return _SESSION.get()[0]


def note(record: dict | None, phase: str, event: dict[str, Any]) -> None:
    """Append one trigger to `record` (a diagnostics dict; None: logged only)."""
    log.warning("%s: %s at %s %s -> %s", phase, event["what"], event["unit"], event["step"], event["action"])
    if record is None:
        return
    record.setdefault(f"guard/{phase}", []).append(dict(event))
    record[f"guard/{phase}/triggers"] = int(record.get(f"guard/{phase}/triggers", 0)) + 1


def _message(phase: str, unit: str, step: int | str, what: str) -> str:
    return (
        f"{phase}: {what} at {unit} {step} (divergence=fail stops the run; divergence=recover restores the "
        "last finite state and lowers the step)"
    )


def _unique(tensors: Iterable[Tensor]) -> list[Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen and t.is_floating_point():
            seen.add(id(t))
            out.append(t)
    return out


class Watch:
    """One training loop's guard: see the module docstring. `module` contributes its floating-point buffers (BN
    statistics move in train mode); the parameters are those of `opts`' parameter groups (plus `params`)."""

    def __init__(
        self,
        phase: str,
        module: nn.Module | None = None,
        opts: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] = (),
        params: Iterable[Tensor] = (),
        *,
        record: dict | None = None,
        unit: str = "epoch",
        retries: int = 3,
        shrink: float = 0.1,
    ) -> None:
        self.phase, self.unit, self.retries, self.shrink = phase, unit, int(retries), float(shrink)
        self.opts = [opts] if isinstance(opts, torch.optim.Optimizer) else list(opts)
        group_params = (p for opt in self.opts for g in opt.param_groups for p in g["params"])
        buffers = module.buffers() if module is not None else ()
        self.tensors = _unique([*group_params, *params, *buffers])
        policy, session_record = _SESSION.get()
        self.policy = policy
        self.record = session_record if session_record is not None else record
        self.triggers = 0
        self.stopped = False  # a STOP was returned: the loop should not go on
        self._snap: list[Tensor] | None = None  # the state at the current window's start
        self._prev: list[Tensor] | None = None  # the start of the last window that passed
        self._verified = False
        self._bad: Tensor | None = None
        self._observed = False

    # ------------------------------------------------------------------ the loop's calls
    @torch.no_grad()
    def begin(self) -> None:
        """Start a window: remember the current state. The previous window's start is kept while that window
        passed: its loss was seen finite, which the current state's has not been yet."""
        if self._verified:
            self._prev = self._snap
        self._snap = [t.detach().clone() for t in self.tensors]
        self._bad, self._observed, self._verified = None, False, False

    def observe(self, loss: Tensor) -> None:
        """Every step: fold `loss`'s finiteness into a flag on its device (no host read)."""
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad = bad if self._bad is None else self._bad | bad
        self._observed = True

    @property
    def pending(self) -> bool:
        """Steps observed since the last `begin` and not checked yet."""
        return self._observed

    def end(self, step: int | str) -> str:
        """Close the window after `step`: OK, RETRY (went back to the snapshot, lower step) or STOP (went back,
        stop the loop); raises DivergenceError under policy `fail`."""
        self._observed = False
        what = self._problem()
        if what is None:
            self._verified = True
            return OK
        self.triggers += 1
        if self.policy == "fail":
            note(self.record, self.phase, {"unit": self.unit, "step": step, "what": what, "action": "raised"})
            raise DivergenceError(_message(self.phase, self.unit, step, what))
        self._restore(loss_was_bad=what == _BAD_LOSS)
        stop = self.triggers > self.retries
        if not stop:
            for opt in self.opts:
                opt.state.clear()  # the momentum / moments that carried it there
                for group in opt.param_groups:
                    group["lr"] *= self.shrink
        action = "restored the last finite state; " + (
            "loop stopped" if stop else f"optimiser state cleared, lr x{self.shrink:g}"
        )
        note(self.record, self.phase, {"unit": self.unit, "step": step, "what": what, "action": action})
        self.stopped = stop
        return STOP if stop else RETRY

    # ------------------------------------------------------------------ internals
    @torch.no_grad()
    def _problem(self) -> str | None:
        """None when every observed loss and every watched tensor is finite; else what is not. One host read."""
        if not self.tensors and self._bad is None:
            return None
        dev = self.tensors[0].device if self.tensors else self._bad.device
        ones = torch.ones((), dtype=torch.bool, device=dev)
        # the max-norm of a tensor is finite exactly when every entry is (no overflow, unlike a sum); one fused
        # call over all tensors rather than a kernel or two per tensor
        norms = torch._foreach_norm(self.tensors, float("inf")) if self.tensors else []
        params_ok = torch.stack([v.to(dev) for v in norms]).isfinite().all() if norms else ones
        loss_ok = ~self._bad.to(dev) if self._bad is not None else ones
        params_ok, loss_ok = torch.stack([params_ok, loss_ok]).tolist()
        if loss_ok and params_ok:
            return None
        return _BAD_LOSS if not loss_ok else "non-finite parameters"

    @torch.no_grad()
    def _restore(self, loss_was_bad: bool) -> None:
        """Back to the last finite state. A non-finite loss may come from the window's first step, i.e. from the
        state the window started in (finite parameters, logits already overflowing: one ascent step before NaN):
        then the start of the last window that passed, if any."""
        if self._snap is None:
            raise RuntimeError(f"{self.phase}: Watch.end without Watch.begin")
        snap = self._prev if (loss_was_bad and self._prev is not None) else self._snap
        for t, s in zip(self.tensors, snap):
            t.copy_(s)


def require_finite(
    values: Tensor | Mapping[str, Tensor], phase: str, what: str, action: str, record: dict | None = None
) -> bool:
    """Whether every value (a loop's result: masks, scores) is finite. If not: under policy `fail` raise
    DivergenceError; under `recover` write the trigger, with the `action` the caller then takes, into the record
    (the session's, else `record`) and return False."""
    tensors = list(values.values()) if isinstance(values, Mapping) else [values]
    if all(bool(torch.isfinite(t).all()) for t in tensors):
        return True
    policy, session_record = _SESSION.get()
    record = session_record if session_record is not None else record
    bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors)
    msg = f"{bad} non-finite {what}"
    if policy == "fail":
        note(record, phase, {"unit": "result", "step": "-", "what": msg, "action": "raised"})
        raise DivergenceError(_message(phase, "result", "-", msg))
    note(record, phase, {"unit": "result", "step": "-", "what": msg, "action": action})
    return False


__all__ = [
    "DEFAULT_POLICY",
    "DivergenceError",
    "OK",
    "POLICIES",
    "RETRY",
    "STOP",
    "Watch",
    "check_policy",
    "current_policy",
    "note",
    "require_finite",
    "session",
]
