"""What a defense may see, enforced: the clean-data check before any work, and the defense's share of the
clean reserve (DESIGN.md "Defenses": knowledge is declared, and enforced by the pipeline).

A defense declares `knowledge: Knowledge` (securetl.interfaces); `defense.clean_fraction` overrides its share.
The pipeline hands `RunContext.clean` -- `clean_fraction x |train|` images of `Splits.clean`, class-balanced --
only to a defense whose share is > 0; a method that `needs_clean` and is given 0 refuses to run (a table shows
it as n/a) instead of silently using poisoned data. Every row records the knowledge it ran with.
"""

from __future__ import annotations

import torch

from securetl.interfaces import Defense, Knowledge, LabeledSet, Splits
from securetl.validate import ConfigError


def check_knowledge(defense: Defense, option: str | None = None) -> Knowledge:
    """The defense's effective knowledge; a ConfigError (one line) when it needs clean data and gets none."""
    k = defense.knowledge
    name = option or defense.name
    if k.reads_poison_idx:
        raise ConfigError(f"defense={name} declares reads_poison_idx; no defense may read the poison indices")
    if not 0.0 <= k.clean_fraction <= 1.0:
        raise ConfigError(f"defense={name}: clean_fraction={k.clean_fraction} must lie in [0, 1]")
    if k.needs_clean and k.clean_fraction <= 0:
        raise ConfigError(
            f"defense={name} needs clean labelled data but defense.clean_fraction=0: it cannot run without "
            "it (e.g. defense.clean_fraction=0.05, a class-balanced 5 % of |train| from the clean reserve)"
        )
    return k


def per_class_count(fraction: float, n_train: int, num_classes: int) -> int:
    """Images per class for `fraction x n_train` in all, balanced over classes (at least 1 when fraction > 0)."""
    if fraction <= 0:
        return 0
    return max(1, round(fraction * n_train / num_classes))


def clean_share(splits: Splits, knowledge: Knowledge, option: str | None = None) -> LabeledSet | None:
    """The first `per_class_count` images of every class of the reserve (the reserve's own order, so the share
    is the same for every run and a larger fraction is a superset of a smaller one); None at fraction 0."""
    per = per_class_count(knowledge.clean_fraction, len(splits.train), splits.num_classes)
    if per == 0:
        return None
    reserve = splits.clean
    name = option or "this defense"
    if reserve is None or len(reserve) == 0:
        raise ConfigError(
            f"defense={name} needs clean data but dataset={splits.name} has no clean reserve (dataset.n_clean=0)"
        )
    picks = []
    for c in range(splits.num_classes):
        idx = torch.nonzero(reserve.y == c).squeeze(1)
        if len(idx) < per:
            raise ConfigError(
                f"defense={name}: clean_fraction={knowledge.clean_fraction} asks for {per} clean images per class, "
                f"but the clean reserve of dataset={splits.name} holds {len(idx)} of class {c}; "
                "lower defense.clean_fraction or raise dataset.n_clean"
            )
        picks.append(idx[:per])
    return reserve.subset(torch.cat(picks).sort().values)


def record(knowledge: Knowledge, clean: LabeledSet | None) -> dict[str, object]:
    """What a row stores about the defense's knowledge."""
    return {
        "clean_fraction": knowledge.clean_fraction,
        "needs_clean": knowledge.needs_clean,
        "n_clean": 0 if clean is None else len(clean),
        "trains_encoder": knowledge.trains_encoder,
        "reads_poison_idx": knowledge.reads_poison_idx,
    }


def split_holdout(clean: LabeledSet, fraction: float, g: torch.Generator) -> tuple[LabeledSet, LabeledSet]:
    """(fit, holdout): a class-balanced `fraction` of the clean share held out for a method's selection rules
    (thresholds, stopping, best epoch; BASELINES.md section 0: never test data). Each class keeps at least one
    image on the fit side and gives at least one to the holdout when it has two or more."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction={fraction} must lie in (0, 1)")
    fit, held = [], []
    for c in torch.unique(clean.y).tolist():
        idx = torch.nonzero(clean.y == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        held.append(idx[:k])
        fit.append(idx[k:])
    return clean.subset(torch.cat(fit).sort().values), clean.subset(torch.cat(held).sort().values)
