"""What a run says while it works: progress bars on a terminal only, and one log line per phase.

Progress bars redraw themselves with carriage returns: in a file (a redirected run, a SLURM or joblib log)
every redraw becomes a line of garbage, so `progress=true` shows them only where stderr is a terminal.
Logs are the way to follow a run there: the pipeline logs each of its phases (`phase`), and a defense's
phases are logged as it records what it decided (`DecisionLog`): T-Core's seed, clean subset, pool steps
and final pool each give a line with the time since the defense started.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

log = logging.getLogger("securetl")


def bars_enabled(progress: bool, stream: TextIO | None = None) -> bool:
    """Whether to draw progress bars: asked for, and stderr (or `stream`) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(progress) and stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def bar_disabled(progress: bool) -> bool:
    """tqdm's `disable=` for a bar shown when `progress` is on (see bars_enabled)."""
    return not bars_enabled(progress)


@contextmanager
def phase(name: str, timings: dict[str, float] | None = None, logger: logging.Logger = log) -> Iterator[None]:
    """Log `name ...` when a phase starts and `name: N s` when it ends (also on error), and put its
    duration into `timings[name]` (rounded to ms, as the rows hold it)."""
    logger.info("%s ...", name)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - t0
        if timings is not None:
            timings[name] = round(seconds, 3)
        logger.info("%s: %.1f s", name, seconds)


class DecisionLog(dict):
    """`Defense.decisions` that logs each index set a defense records (`*_idx`: a seed, a subset, a pool
    step, what it kept) with its size and the time since the defense started: a log line per phase of a
    multi-phase defense, without any change to the defense. Otherwise a plain dict."""

    def __init__(self, defense: str, *args: Any, logger: logging.Logger = log, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.defense, self.logger, self.t0 = defense, logger, time.perf_counter()

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        if str(key).endswith("_idx"):
            try:
                size = f"{len(value)} samples"
            except TypeError:
                size = "recorded"
            seconds = time.perf_counter() - self.t0
            self.logger.info("defense %s: %s %s (%.1f s)", self.defense, key[: -len("_idx")], size, seconds)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for k, v in dict(*args, **kwargs).items():
            self[k] = v


def summary(run_id: str, metrics: dict[str, Any]) -> str:
    """The line a run ends with: ACC, every ASR (one per trigger), and the kNN scores of the received
    encoder, in %."""
    parts = [f"ACC {100 * metrics['acc']:.2f}%"] if isinstance(metrics.get("acc"), int | float) else []
    for key, value in metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or key == "acc":
            continue
        if any(k.startswith(f"{key}/") for k in metrics):
            continue  # `asr` (`knn_asr`) repeats one of the per-trigger values, named by their trigger
        label = key.replace("knn_acc", "kNN ACC").replace("knn_asr", "kNN ASR").replace("asr", "ASR")
        parts.append(f"{label.replace('/', ' ')} {100 * value:.2f}%")
    return f"run {run_id}: " + "  ".join(parts)
