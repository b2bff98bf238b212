"""Load encoder weights from a file — safely, in the formats researchers have (`encoder.checkpoint=PATH`).

Formats read:
  * `.safetensors` (the suite's own cache format; never executes anything),
  * anything `torch.save` wrote that `torch.load(weights_only=True)` accepts: a plain state dict, or one
    wrapped as {"state_dict": ...} / {"model": ...} with extra entries (epoch, optimizer state, ...).

A pickle that needs more than tensors and plain containers (e.g. a __reduce__ that would call a function)
is refused with the list of what it would import; it is never unpickled with code execution. Benign extras
that released checkpoints carry (argparse.Namespace of the training arguments, numpy scalars) are allowed.

Key layouts understood (and remapped onto this suite's `Encoder`, keys `stages.N...`):
  * securetl:   `stages.0.0.weight`, ... (also under a wrapper prefix such as `encoder.`)
  * BadEncoder / DRUPE SimCLR (models/simclr_model.py of the BadEncoder release): the backbone is an
    nn.Sequential of torchvision ResNet-18 children without max-pool and fc — `f.f.0` conv1, `f.f.1` bn1,
    `f.f.3`..`f.f.6` layer1..layer4 — next to a projection head `g.*` (dropped),
  * torchvision ResNet naming (`conv1`, `bn1`, `layer1`..`layer4`, `fc` dropped), e.g. solo-learn `backbone.`,
  * plain timm model keys for timm encoders (`patch_embed.proj.weight`, ..., `head` dropped).
The wrapper prefix (`module.`, `f.f.`, `backbone.`, `encoder.`...) is found automatically; when two prefixes
both hold a complete encoder (MoCo's `encoder_q.`/`encoder_k.`), set `encoder.checkpoint_prefix`.
Anything else: a ConfigError listing the missing and unexpected keys.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from securetl.safeload import pickle_globals
from securetl.validate import ConfigError

log = logging.getLogger(__name__)

# Wrappers released checkpoints put around the state dict.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "encoder", "backbone")
# Heads that sit next to an encoder in a checkpoint and are not part of it.
HEAD = re.compile(r"^(g|fc|head|heads|projector|projection|projection_head|predictor|classifier|linear)\.")


def _benign_globals() -> list:
    """Types that released checkpoints carry next to the weights and that cannot run code when rebuilt."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    out: list = [
        argparse.Namespace,
        np.ndarray,
        np.dtype,
        core.multiarray.scalar,
        core.multiarray._reconstruct,
    ]
    out += [
        type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1")
    ]
    return out


def _global_names(objs: list) -> set[str]:
    names = set()
    for o in objs:
        names.add(f"{o.__module__}.{o.__qualname__}")
    names |= {"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}
    names |= {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"}
    return names


# what the pickled part of a (legacy, non-zip) torch.save file names to rebuild tensors and containers
_TENSOR_PLUMBING = re.compile(
    r"^(torch\._utils\._rebuild_\w+|torch\.\w*Storage|torch\.(device|Size|dtype)|collections\.OrderedDict)$"
)


def _refusal(p: Path, needs: list[str], detail: str = "") -> ConfigError:
    shown = ", ".join(needs[:6]) + (" ..." if len(needs) > 6 else "")
    return ConfigError(
        f"refusing to load encoder.checkpoint={p}: unpickling it would import {shown or 'objects beyond tensors'}, "
        "i.e. run code from the file rather than read weights. securetl only reads safetensors files or "
        "what torch.load(weights_only=True) accepts, and never executes a checkpoint."
        + (f" ({detail})" if detail else "")
        + "\nIf you trust where the file comes from, convert it once outside securetl, e.g.\n"
        '  python -c "import torch; from safetensors.torch import save_file; '
        f"c = torch.load('{p}', weights_only=False); sd = c.get('state_dict', c); "
        f"save_file({{k: v.contiguous() for k, v in sd.items() if hasattr(v, 'contiguous')}}, '{p.with_suffix('.safetensors')}')\"\n"
        f"and set encoder.checkpoint={p.with_suffix('.safetensors')}"
    )


def read_state(path: str | Path) -> dict[str, Tensor]:
    """The tensors in a checkpoint file, read without executing anything; wrappers removed."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"encoder.checkpoint={path}: no such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"encoder.checkpoint={p} is not a valid safetensors file ({e})") from e

    benign = _benign_globals()
    allowed = _global_names(benign)
    is_zip = zipfile.is_zipfile(p)
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    if is_zip and scan is not None:
        # torch's own scan of the pickled part (nothing is unpickled): names outside its weights-only allowlist
        try:
            needs = [g for g in scan(str(p)) if g not in allowed]
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                f"encoder.checkpoint={p} is a zip file but not a PyTorch checkpoint ({e})"
            ) from e
        if needs:
            raise _refusal(p, needs)
    try:
        allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; without it: tensors only
        with allow(benign) if allow is not None else contextlib.nullcontext():
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — the restricted unpickler said no; explain what the file wants
        reason = (
            f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
            if str(e).strip()
            else type(e).__name__
        )
        if is_zip:
            raise ConfigError(
                f"encoder.checkpoint={p} could not be read with torch.load(weights_only=True) ({reason})"
            ) from e
        try:
            needs = [g for g in pickle_globals(p) if g not in allowed and not _TENSOR_PLUMBING.match(g)]
        except ValueError:
            raise ConfigError(
                f"encoder.checkpoint={p} is neither a safetensors file nor a PyTorch checkpoint ({reason})"
            ) from e
        raise _refusal(p, needs, f"torch.load(weights_only=True) said {reason}") from e
    return _unwrap(obj, p)


def _is_state(d: object) -> bool:
    return isinstance(d, dict) and len(d) > 0 and all(isinstance(v, Tensor) for v in d.values())


def _unwrap(obj: object, p: Path) -> dict[str, Tensor]:
    if isinstance(obj, nn.Module):  # cannot happen with weights_only, kept for clarity
        return obj.state_dict()
    if not isinstance(obj, dict):
        raise ConfigError(f"encoder.checkpoint={p} holds a {type(obj).__name__}, not a state dict")
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, Tensor) for v in inner.values()):
            return _unwrap(inner, p)
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ConfigError(
            f"encoder.checkpoint={p} contains no tensors at its top level nor under {list(WRAPPER_KEYS)}; "
            f"top-level keys: {list(obj)[:10]}"
        )
    return tensors


# --------------------------------------------------------------------------- key layouts
def _badencoder(k: str) -> str | None:
    """BadEncoder SimCLRBase.f (nn.Sequential): 0 conv1, 1 bn1, 2 relu, 3-6 layer1-4, 7 avgpool."""
    m = re.match(r"^(\d+)\.(.*)$", k)
    if not m:
        return None
    i, rest = int(m[1]), m[2]
    if i in (0, 1):
        return f"stages.0.{i}.{rest}"
    if 3 <= i <= 6:
        return f"stages.{i - 2}.{rest}"
    return None


def _torchvision(k: str) -> str | None:
    if k.startswith("conv1."):
        return "stages.0.0." + k[len("conv1.") :]
    if k.startswith("bn1."):
        return "stages.0.1." + k[len("bn1.") :]
    m = re.match(r"^layer([1-4])\.(.*)$", k)
    return f"stages.{m[1]}.{m[2]}" if m else None


def _timm(k: str) -> str | None:
    return "stages.0.model." + k


LAYOUTS: dict[str, tuple[Callable[[str], str | None], str]] = {
    # name: (key map, anchor = a stripped key that must exist for a prefix to be a candidate)
    "securetl": (lambda k: k, ""),
    "badencoder-simclr": (_badencoder, "3.0.conv1.weight"),
    "torchvision-resnet": (_torchvision, "layer1.0.conv1.weight"),
    "timm": (_timm, ""),
}


def _prefixes(keys: list[str], anchor: str) -> set[str]:
    """Candidate wrapper prefixes: '' and every dotted prefix of a key that ends in `anchor`."""
    out = {""}
    for k in keys:
        if anchor and k.endswith(anchor) and (len(k) == len(anchor) or k[-len(anchor) - 1] == "."):
            out.add(k[: len(k) - len(anchor)])
        elif not anchor:
            parts = k.split(".")
            out.update(".".join(parts[:i]) + "." for i in range(1, min(len(parts), 4)))
    return out


def remap(
    state: dict[str, Tensor], target: dict[str, Tensor], prefix: str | None = None
) -> tuple[dict[str, Tensor], str]:
    """`state` renamed onto `target`'s keys, and a description of the layout used.

    Tries every (wrapper prefix, layout) pair and keeps the one that fills the most target keys with
    tensors of the right shape. Raises ConfigError, listing missing/unexpected keys, if none fills all.
    """
    tkeys = set(target)
    optional = {k for k in tkeys if k.endswith("num_batches_tracked")}  # absent from some old checkpoints
    results = []
    for lname, (fn, anchor) in LAYOUTS.items():
        for pre in [prefix] if prefix is not None else sorted(_prefixes(list(state), anchor)):
            mapped, unexpected, ignored = {}, [], []
            for k, v in state.items():
                if not k.startswith(pre):
                    ignored.append(k)
                    continue
                sk = k[len(pre) :]
                new = fn(sk)
                if new is not None and new in tkeys:
                    mapped[new] = v
                elif HEAD.match(sk) or new is None:
                    ignored.append(k)
                else:
                    unexpected.append(k)
            shape_bad = [k for k, v in mapped.items() if tuple(v.shape) != tuple(target[k].shape)]
            good = len(mapped) - len(shape_bad)
            missing = [k for k in target if k not in mapped and k not in optional]
            results.append((good, lname, pre, mapped, missing, unexpected, shape_bad, ignored))
    results.sort(key=lambda r: (-r[0], len(r[5]), len(r[2])))
    good, lname, pre, mapped, missing, unexpected, shape_bad, ignored = results[0]
    complete = [r for r in results if not r[4] and not r[5] and not r[6]]
    if complete:
        if len({(r[1], r[2]) for r in complete if r[0] == complete[0][0]}) > 1 and prefix is None:
            cands = sorted({r[2] for r in complete if r[0] == complete[0][0]})
            raise ConfigError(
                f"the checkpoint holds more than one complete encoder, under prefixes {cands}; "
                "choose one with encoder.checkpoint_prefix=PREFIX (e.g. the query/online encoder)"
            )
        good, lname, pre, mapped, missing, unexpected, shape_bad, ignored = complete[0]
        if ignored:
            log.info("checkpoint: ignoring %d keys outside the encoder (e.g. %s)", len(ignored), ignored[:3])
        return mapped, f"{lname} layout, prefix {pre!r}"
    lines = [
        f"the checkpoint does not fit the encoder (best match: {lname} layout with prefix {pre!r}, "
        f"{good}/{len(tkeys)} tensors):"
    ]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        lines.append(
            f"  unexpected keys ({len(unexpected)}): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    if shape_bad:
        lines.append(
            "  shape mismatches: "
            + ", ".join(f"{k} {tuple(mapped[k].shape)} vs {tuple(target[k].shape)}" for k in shape_bad[:4])
            + "  (check encoder.arch / encoder.width / encoder.timm_kwargs)"
        )
    lines.append(
        f"  layouts tried: {', '.join(LAYOUTS)}; the file's first keys: {list(state)[:5]}. "
        "Set encoder.checkpoint_prefix if the encoder sits under an unusual prefix."
    )
    raise ConfigError("\n".join(lines))


def load_checkpoint(encoder: nn.Module, path: str | Path, prefix: str | None = None) -> str:
    """Load `path` into `encoder` (in place); returns the layout used. Never executes code from the file."""
    state = read_state(path)
    target = encoder.state_dict()
    try:
        mapped, how = remap(state, target, prefix)
    except ConfigError as e:
        raise ConfigError(f"encoder.checkpoint={path}: {e}") from None
    for k in target:
        if k not in mapped:  # tolerated optional keys keep the module's value
            mapped[k] = target[k]
    encoder.load_state_dict(mapped, strict=True)
    log.info("loaded encoder.checkpoint=%s (%s)", path, how)
    return how


def file_digest(path: str | Path) -> str:
    """Content hash of a checkpoint file: cache keys follow the weights, not the file's name."""
    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
