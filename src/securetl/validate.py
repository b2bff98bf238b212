"""Checks that turn bad input into one clear message before any expensive work.

`check_config` runs first in every run (pipeline.run): each value of a node with a `_target_` is compared with
the annotation of that parameter in the target's signature (typed constructors are the schema: a YAML
typo or `probe.epochs=abc` is named before anything is built), settings whose meaning is the same in every
group are range-checked by name, and keys a command line adds that nothing reads are refused. Then the
attacks' own `validate(num_classes, sizes)` hooks check what the dataset can give them (`DataSizes`):
from the config alone where it fixes the class counts, again on the built splits before any training.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException


class ConfigError(ValueError):
    """A user-facing configuration problem; the CLI prints its message without a traceback."""


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def resolve_device(name: str) -> torch.device:
    """`device=auto` picks CUDA when present, else CPU; `cuda`/`cuda:N`/`cpu`/`mps` are taken as given."""
    name = str(name)
    if not _DEVICE.match(name):
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is visible; use device=auto or device=cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- values vs signatures
# Top-level settings of conf/run.yaml and their types (a key that is absent is not checked).
TOP_LEVEL = {
    "seed": int,
    "resume": bool,
    "cache": bool,
    "progress": bool,
    "threads": int,
    "deterministic": bool,
}
# Settings whose meaning is the same in every group that has them, so their range is checked here, once,
# by name: a count of epochs is never negative, a set size or a width never 0.
MINIMUM = {"epochs": 0, "batch_size": 1, "width": 1, "n_train": 1, "n_test": 1, "n_pretrain": 1}
MINIMUM |= {"n_reference": 0, "n_clean": 0, "lr": 0, "threads": 1}
MINIMUM_SUFFIX = {"_epochs": 0, "_lr": 0}  # fit_epochs, unlearn_lr, ...
# where the conf/ folder is: a top-level key a command line adds must be a group there or a key of run.yaml
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _check_range(full: str, value: Any) -> None:
    """`full` (a dotted key) against MINIMUM, by its last part."""
    key = full.rsplit(".", 1)[-1]
    low = MINIMUM.get(key)
    if low is None:
        low = next((m for suffix, m in MINIMUM_SUFFIX.items() if key.endswith(suffix)), None)
    if low is not None and isinstance(value, int | float) and not isinstance(value, bool) and value < low:
        raise ConfigError(f"{full}={value} must be >= {low}")


@functools.cache
def _signature(target: str) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """(parameters, resolved annotations, takes **kwargs) of a `_target_`; annotations that cannot be
    resolved (names imported only for type checkers) are left out, so they are not checked."""
    from hydra.utils import get_object

    fn = get_object(target)
    params = dict(inspect.signature(fn).parameters)
    params.pop("self", None)
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    init = fn.__init__ if isinstance(fn, type) else fn
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # one unresolvable name: resolve the others one by one
        hints = {}
        module_globals = getattr(init, "__globals__", {})
        for name, p in params.items():
            try:
                ann = p.annotation
                hints[name] = eval(ann, module_globals) if isinstance(ann, str) else ann  # noqa: S307
            except Exception:
                pass
    return params, hints, takes_kwargs


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if hint in names:
        return names[hint]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    origin = typing.get_origin(hint) or hint
    if origin in (list, tuple, collections.abc.Sequence):
        return "a list" + (f" of {_describe(args[0])}s" if args and args[0] in names else "")
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    return getattr(hint, "__name__", str(hint))


def _fits(value: Any, hint: Any) -> bool:
    """Whether a plain config value can be passed as `hint`. Classes (a Trigger, ...) are not judged here:
    a node that builds one has its own `_target_` and is checked against that."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if container in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, list | tuple):
            return False
        if container is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if container in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True


def _value(node: DictConfig | ListConfig, key: Any, where: str) -> Any:
    try:
        v = node[key]
    except MissingMandatoryValue:
        raise ConfigError(f"{where} must be set (e.g. {where}=VALUE on the command line)") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {e}".splitlines()[0]) from None
    return OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig | ListConfig) else v


def check_values(target: str, values: dict[str, Any], where: str) -> None:
    """`values` as keyword arguments of `target`: each is a parameter of it, fits the parameter's
    annotation, and lies in its range (MINIMUM) where its name has one."""
    try:
        params, hints, takes_kwargs = _signature(target)
    except Exception as e:  # not importable: Hydra would fail the same way, later and less clearly
        raise ConfigError(f"{where}._target_={target} cannot be imported ({e})") from None
    for key, value in values.items():
        full = f"{where}.{key}"
        if key not in params:
            if takes_kwargs:
                continue
            known = ", ".join(k for k in params if not k.startswith("_"))
            raise ConfigError(f"{full} is not a setting of {target} (its settings: {known})")
        hint = hints.get(key, inspect.Parameter.empty)
        if not (_fits(value, hint) or (value is None and params[key].default is None)):
            raise ConfigError(f"{full}={value!r} must be {_describe(hint)}")
        _check_range(full, value)


def check_node(node: Any, where: str) -> None:
    """Every `_target_` node under `node` (itself included) against its target's signature (check_values)."""
    if isinstance(node, ListConfig):
        for i in range(len(node)):
            check_node(node._get_node(i), f"{where}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    keys = [str(k) for k in node.keys() if not str(k).startswith("_")]
    if "_target_" in node:
        check_values(str(node._target_), {k: _value(node, k, f"{where}.{k}") for k in keys}, where)
    for key in keys:
        check_node(node._get_node(key), f"{where}.{key}")


def check_config(cfg: DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Everything about a run's config that can be checked without building anything (see module doc)."""
    for key, kind in TOP_LEVEL.items():
        if key in cfg:
            value = _value(cfg, key, key)
            if not _fits(value, kind):
                raise ConfigError(f"{key}={value!r} must be {_describe(kind)}")
            _check_range(key, value)
    known = set(OmegaConf.load(CONF_DIR / "run.yaml").keys()) if (CONF_DIR / "run.yaml").exists() else set()
    for o in overrides:
        if o.startswith("+"):
            key = o.lstrip("+").split("=", 1)[0].strip()
            # `+foo=1` adds a key nothing reads: the run would go ahead, under another run_id
            if not re.search(r"[./@]", key) and key not in known and not (CONF_DIR / key).is_dir():
                raise ConfigError(f"{o}: there is no top-level setting {key!r}; see `securetl --help`")
    for key in cfg.keys():
        if key != "hydra":
            check_node(cfg._get_node(key), str(key))
    checkpoint = OmegaConf.select(cfg, "encoder.checkpoint", default=None)
    if checkpoint and not Path(str(checkpoint)).expanduser().is_file():
        raise ConfigError(f"encoder.checkpoint={checkpoint}: no such file")


def check_encoder(spec: Any) -> None:
    """Build the encoder on the `meta` device (shapes only, no memory, no compute): an unknown
    architecture, a width it cannot take or a bad timm option fails here, before the data are made; so do
    an unknown `encoder.ssl` and `encoder.method` / `encoder.augment` settings of the wrong type."""
    from securetl.ssl.methods import SSL_METHODS, check_method

    try:
        with torch.device("meta"):
            spec.build()
        check_method(spec.ssl, spec.method)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise ConfigError(f"{e}  [encoder.arch={spec.arch}, encoder.width={spec.width}]") from None
    # the SSL method's and the augmentation's settings, typed as their constructors say
    method = SSL_METHODS[spec.ssl]
    check_values(f"{method.__module__}.{method.__qualname__}", spec.method, "encoder.method")
    check_values("securetl.ssl.augment.SimCLRAugment", spec.augment, "encoder.augment")


# --------------------------------------------------------------------------- what a dataset can give
@dataclass(frozen=True)
class DataSizes:
    """Images per class of the splits attacks draw from (None: the split is absent or unknown)."""

    num_classes: int
    train: tuple[int, ...]
    reference: tuple[int, ...] | None = None
    pretrain: tuple[int, ...] | None = None

    @property
    def n_train(self) -> int:
        return sum(self.train)

    @classmethod
    def of(cls, splits: Any) -> DataSizes:
        """Counted on built splits (labels outside 0..C-1, e.g. unlabelled pre-training images, not counted)."""

        def counts(ls: Any) -> tuple[int, ...] | None:
            if ls is None:
                return None
            y = ls.y[(ls.y >= 0) & (ls.y < splits.num_classes)]
            return tuple(int(c) for c in torch.bincount(y, minlength=splits.num_classes))

        return cls(
            splits.num_classes, counts(splits.train), counts(splits.reference), counts(splits.pretrain)
        )


def _balanced(n: int, num_classes: int) -> tuple[int, ...]:
    return tuple(n // num_classes + (c < n % num_classes) for c in range(num_classes))


def _synthetic_sizes(d: dict) -> DataSizes:
    # securetl.data.synthetic.generate draws class c for n // C + (c < n % C) of its n images; a variant's
    # `downstream.num_classes` is the downstream splits' C, the pre-training split keeps the top-level one
    c, c_pre = int((d.get("downstream") or {}).get("num_classes", d["num_classes"])), int(d["num_classes"])
    pretrain = (_balanced(d["n_pretrain"], c_pre) + (0,) * c)[:c]  # counted as DataSizes.of counts it
    return DataSizes(c, _balanced(d["n_train"], c), _balanced(d["n_reference"], c), pretrain)


# Datasets whose class counts follow from their config alone: checked before the data are made.
PLANNED_SIZES = {"securetl.data.synthetic.build_synthetic": _synthetic_sizes}


def planned_sizes(dataset: DictConfig) -> DataSizes | None:
    """The splits' class counts as the dataset config fixes them, or None where only the data tell."""
    plan = PLANNED_SIZES.get(str(dataset.get("_target_")))
    if plan is None:
        return None
    try:
        return plan(OmegaConf.to_container(dataset, resolve=True))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None  # an odd config: check_node has said what it could, the builder says the rest


def validate_attacks(sizes: DataSizes, *attacks: Any) -> None:
    """Each attack's `validate(num_classes, sizes)`: a target class the dataset lacks, more poisons or
    references than the dataset's classes hold, ... as one ConfigError."""
    for attack in attacks:
        try:
            attack.validate(sizes.num_classes, sizes)
        except ValueError as e:
            raise ConfigError(str(e)) from e


def validate_targets(num_classes: int, *attacks: Any) -> None:
    """Only the class checks, for callers without sizes."""
    for attack in attacks:
        try:
            attack.validate(num_classes)
        except ValueError as e:
            raise ConfigError(str(e)) from e
