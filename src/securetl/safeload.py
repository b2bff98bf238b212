"""Reading pickle-based files from outside without running their code.

A pickle can name any importable callable (a "global") and call it while it is being read; that is how a
malicious checkpoint or data file runs code. `pickle_globals` lists the globals a file would import by
walking its opcodes with `pickletools` — nothing is unpickled — so a caller can refuse a file that needs
anything beyond plain data. Used for CIFAR's python-pickle batches (numpy arrays only) and to explain why
a checkpoint is refused.
"""

from __future__ import annotations

import pickletools
from pathlib import Path
from typing import BinaryIO

# What a pickle of numpy arrays / scalars needs (numpy 1.x and 2.x module names, protocols 0-5), plus
# `_codecs.encode`, which Python 3 uses to pickle bytes at protocol < 3. None of them can run user code.
NUMPY_GLOBALS = frozenset(
    f"{mod}.{name}"
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
) | frozenset(
    {
        "numpy.core.numeric._frombuffer",
        "numpy._core.numeric._frombuffer",
        "numpy.ndarray",
        "numpy.dtype",
        "_codecs.encode",
    }
)

UNKNOWN = "<a global computed at load time>"

_STRING_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}
# opcodes that leave the stack as it is
_NO_STACK_CHANGE = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP"}


def _scan_one(f: BinaryIO) -> list[str]:
    """Globals named by the next pickle in `f` (reads up to its STOP opcode)."""
    names: list[str] = []
    # `top` mirrors the two topmost stack items as far as they are known strings (None = anything else).
    # That is exact for the only question asked of it: what module/name a STACK_GLOBAL pops.
    top: list[str | None] = []
    memo: dict[int, str | None] = {}
    for op, arg, _pos in pickletools.genops(f):
        name = op.name
        if name in ("GLOBAL", "INST"):
            mod, _, attr = str(arg).partition(" ")
            names.append(f"{mod}.{attr}")
        elif name == "STACK_GLOBAL":
            mod, attr = (top[-2], top[-1]) if len(top) >= 2 else (None, None)
            names.append(f"{mod}.{attr}" if isinstance(mod, str) and isinstance(attr, str) else UNKNOWN)
        elif name in ("EXT1", "EXT2", "EXT4"):
            names.append(UNKNOWN)  # copyreg extension registry: a global by number

        if name == "MEMOIZE":
            memo[len(memo)] = top[-1] if top else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = top[-1] if top else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            top.append(memo.get(int(arg)))
        elif name in _STRING_OPS:
            top.append(arg if isinstance(arg, str) else None)
        elif name not in _NO_STACK_CHANGE:
            top.append(None)
        del top[:-2]
    return names


def pickle_globals(path: str | Path, max_pickles: int = 8) -> list[str]:
    """Every global the pickle(s) at the start of `path` would import, without unpickling anything.

    Reads consecutive pickles (PyTorch's legacy format stores several one after another, then raw bytes)
    until one does not parse. Raises ValueError if not even the first one does.
    """
    names: list[str] = []
    with open(path, "rb") as f:
        for i in range(max_pickles):
            try:
                names += _scan_one(f)
            except Exception as e:  # noqa: BLE001 — end of the pickled part, or not a pickle at all
                if i == 0:
                    raise ValueError(f"{path} is not a pickle ({type(e).__name__}: {e})") from e
                break
    return list(dict.fromkeys(names))


def unsafe_globals(path: str | Path, allowed: frozenset[str] | set[str]) -> list[str]:
    """The globals in `path` outside `allowed` (empty: the file is plain data of the allowed kinds)."""
    return [g for g in pickle_globals(path) if g not in allowed]
