"""Per-dataset deltas: the one optional file per dataset (conf/deltas/<dataset>.yaml) that holds the values
a method takes on that dataset when they differ from its YAML's paper defaults.

A method YAML states the original paper's settings; some of them are counts in disguise. TaCT's poison
rate 0.003 is 150 images of CIFAR-10's 50 000, but 12 of the synthetic default's 4 000. The delta file
says, per group and option, which keys change on its dataset and why; `apply_deltas` merges them into the
run's config before the run_id is computed, so the row records the values that ran. A key the user set on
the command line (or in a sweep) is theirs: the delta never overrides it.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict

from securetl.validate import ConfigError


def overridden_keys(overrides: list[str]) -> set[str]:
    """Dotted keys named by Hydra overrides (`a.b=1`, `+a.b=1`, `++a.b=1`, `~a.b`, sweeps `a.b=1,2`)."""
    keys = set()
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~").strip()
        if key:
            keys.add(key)
    return keys


def _leaves(cfg: DictConfig, dotted: str, value, mine: set[str]) -> list[tuple[str, object]]:
    """The (dotted key, value) pairs a delta sets. It descends into a mapping where the config holds a mapping
    too, so that `decree: {distill: {augment: ...}}` changes `augment` and leaves distill's other keys alone,
    and it leaves out every key the user set (`mine`): the key itself, a node above it or a key inside it."""
    if any(dotted == k or dotted.startswith(k + ".") for k in mine):
        return []
    node = OmegaConf.select(cfg, dotted, throw_on_missing=False)
    if OmegaConf.is_dict(value) and isinstance(node, DictConfig):
        out: list[tuple[str, object]] = []
        for key, sub in value.items():
            if key not in node:
                raise ConfigError(
                    f"conf/deltas: {dotted} has no key {key!r} (the delta file names a key its method lacks)"
                )
            out += _leaves(cfg, f"{dotted}.{key}", sub, mine)
        return out
    # a key the user set inside a node the delta would replace keeps the whole node theirs
    return [] if any(k.startswith(dotted + ".") for k in mine) else [(dotted, value)]


def apply_deltas(cfg: DictConfig, choices: dict[str, str], overrides: list[str]) -> dict[str, object]:
    """Merge `cfg.deltas.<group>.<option>` into `cfg.<group>` for the chosen options; returns what changed."""
    deltas = cfg.get("deltas")
    if not deltas:
        return {}
    # `data_attack=tact` picks an option: it does not make the group's keys the user's
    mine = overridden_keys(overrides) - set(choices)
    applied: dict[str, object] = {}
    for group, per_option in deltas.items():
        option = choices.get(str(group))
        if option is None or per_option is None or option not in per_option:
            continue
        for dotted, leaf in _leaves(cfg, str(group), per_option[option], mine):
            with open_dict(cfg):
                OmegaConf.update(cfg, dotted, leaf, merge=False)
            applied[dotted] = OmegaConf.to_container(leaf) if OmegaConf.is_config(leaf) else leaf
    return applied
