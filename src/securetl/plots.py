"""`securetl-plot`: the figures a backdoor paper shows, from the suite's own rows and runs.

    securetl-plot acc-asr TABLE [-cd DIR] [--out FILE]      ACC vs ASR of a table preset's rows: one point per
                                                            defense x threat (its other keys in the label),
                                                            mean ± std over seeds as error bars
    securetl-plot curves OVERRIDES... [--out FILE]          per-epoch training loss and accuracy of the clean
                                                            and the poisoned training samples (the downstream
                                                            training on the whole poisoned set): is the backdoor
                                                            learned faster than the task (ABL's and ASD's premise)?
    securetl-plot embed OVERRIDES... [--out FILE]           2-D PCA of the clean and poisoned training samples'
                                                            features under the received encoder and after the
                                                            defense

`curves` and `embed` replay one cell (the same OVERRIDES as `securetl`, the encoder from the cache) up to the
defense: `replay` mirrors pipeline.run step by step, and a test checks that its model scores the row's ACC.
`curves` also writes its numbers beside the rows, `<results dir>/curves/<run_id>.json`. Figures go to
`<results dir>/figures/` unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


# --------------------------------------------------------------------------- ACC vs ASR
def acc_asr_points(name: str, results_dir: Path | None = None, conf_dir: Any = CONF_DIR):
    """(long-form table of the preset's cells with acc and asr mean/std/count, the keys of a cell, results dir):
    the preset's rows and columns become the cell keys, whatever its report shows."""
    from securetl import tables
    from securetl.results import read_rows

    preset = tables.load_preset(name, conf_dir)
    report, sweep = preset["report"], preset["sweep"]
    results_dir = Path(results_dir) if results_dir is not None else tables.default_results_dir(conf_dir)
    rows = read_rows(results_dir / "raw")
    keys = [*report.get("rows", []), *report.get("cols", [])]
    described = {*keys, *report.get("where", {}), *sweep}
    config_keys = [k for k in described if "." in k and "@" not in k]
    flat = tables.flatten(rows, config_keys, described=described, defaults=tables.run_defaults(conf_dir))
    layout = {"rows": keys, "cols": [], "metrics": ["acc", "asr"], "where": report.get("where", {})}
    _, _, long = tables.build_table(flat, layout, sweep)
    if long.empty or "asr" not in long.columns.get_level_values(0):
        raise SystemExit(
            f"securetl-plot: no rows with ACC and ASR for table {name} under {results_dir / 'raw'}"
        )
    return long, keys, results_dir


def plot_acc_asr(long, keys: list[str], title: str, out: Path) -> Path:
    """`acc_asr_figure`, written to `out`."""
    return _save(acc_asr_figure(long, keys, title), out)


def acc_asr_figure(long, keys: list[str], title: str):
    """One point per cell: x = ASR, y = ACC (%), error bars = std over seeds, a colour (and, past ten, a marker)
    per defense (or per value of the first key). With a second key (the threat) and more points than one panel
    holds legibly, one panel per value of that key; otherwise one panel and a marker per value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [dict(zip(keys, ix if isinstance(ix, tuple) else (ix,))) for ix in long.index]
    values = {f"{m}_{s}": long[(m, s)].tolist() for m in ("acc", "asr") for s in ("mean", "std")}
    colour_key = "defense" if "defense" in keys else keys[0]
    panel_key = next((k for k in keys if k != colour_key), None)
    series = list(dict.fromkeys(str(c[colour_key]) for c in cells))
    groups = list(dict.fromkeys(str(c[panel_key]) for c in cells)) if panel_key else [None]
    palette = plt.cm.tab20 if len(series) > 10 else plt.cm.tab10
    markers = "osD^v<>Pp*hX"
    # past ten series a colour alone is ambiguous: the marker changes with each round of the palette
    style = {
        v: (palette(i % palette.N), markers[(i // 10) % len(markers)] if len(series) > 10 else "o")
        for i, v in enumerate(series)
    }
    facets = panel_key is not None and len(groups) > 1 and len(cells) > 30
    if facets:
        ncols = min(3, len(groups))
        nrows = math.ceil(len(groups) / ncols)
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False, sharex=True, sharey=True
        )
        panels = {g: ax for g, ax in zip(groups, axes.flat)}
        for ax in list(axes.flat)[len(groups) :]:
            ax.set_visible(False)
    else:
        fig, ax = plt.subplots(figsize=(9, 5.5))
        panels = {g: ax for g in groups}
        shapes = {g: markers[i % len(markers)] for i, g in enumerate(groups)} if panel_key else {}
    for i, cell in enumerate(cells):
        c = str(cell[colour_key])
        g = str(cell[panel_key]) if panel_key else None
        colour, marker = style[c]
        if not facets and panel_key:
            marker = shapes[g]
        std = [0.0 if math.isnan(v) else 100 * v for v in (values["asr_std"][i], values["acc_std"][i])]
        panels[g].errorbar(
            100 * values["asr_mean"][i],
            100 * values["acc_mean"][i],
            xerr=std[0],
            yerr=std[1],
            fmt=marker,
            color=colour,
            markersize=6 if facets else 7,
            capsize=2 if facets else 3,
            alpha=0.9,
        )
    for g, ax in panels.items():
        ax.set_xlim(-3, 103)
        ax.grid(alpha=0.3)
        if facets:
            ax.set_title(f"{panel_key}={g}", fontsize=9)
            ax.set_xlabel("ASR (%)", fontsize=8)
            ax.set_ylabel("ACC (%)", fontsize=8)
            ax.tick_params(labelsize=7)
    first = next(iter(panels.values()))
    handles = [plt.Line2D([], [], color=col, marker=mk, ls="", label=v) for v, (col, mk) in style.items()]
    # legends outside the axes: a point in a corner is not hidden behind them
    if facets:
        fig.legend(
            handles=handles, title=colour_key, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8
        )
        fig.suptitle(title + " (mean ± std over seeds; ASR lower and ACC higher are better)", fontsize=10)
    else:
        legend = first.legend(
            handles=handles, title=colour_key, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8
        )
        if shapes:
            first.add_artist(legend)
            more = [plt.Line2D([], [], color="grey", marker=s, ls="", label=v) for v, s in shapes.items()]
            first.legend(
                handles=more, title=panel_key, loc="lower left", bbox_to_anchor=(1.02, 0), fontsize=8
            )
        first.set_xlabel("ASR (%)  — lower is better")
        first.set_ylabel("ACC (%)  — higher is better")
        first.set_title(title + " (mean ± std over seeds)", fontsize=10)
    return fig


def _save(fig, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=150, bbox_inches="tight")  # legends placed outside the axes stay in the file
    import matplotlib.pyplot as plt

    plt.close(fig)
    log.info("wrote %s", out)
    return out


# --------------------------------------------------------------------------- replaying a cell
@dataclass
class Replay:
    """A cell replayed up to its defense: what the figures read."""

    cfg: DictConfig
    run_id: str
    splits: Any
    encoder: torch.nn.Module
    poisoned: Any  # Poisoned: the poisoned train set and its poison_idx (ground truth, for the figures only)
    model: torch.nn.Module
    ctx: Any
    target: int | None


def compose(overrides: Sequence[str], config_dirs: Sequence[Path] = ()) -> DictConfig:
    """The run config `securetl OVERRIDES` composes (config dirs on the search path, as `-cd` puts them)."""
    import securetl.run  # noqa: F401  the resolvers the configs use
    from securetl.tables import compose_run

    return compose_run(overrides, config_dirs)


@dataclass
class Prepared:
    """A cell's steps before its defense (what `pipeline.run` does up to there, with the same seeds, salts and
    order): its data, the received encoder, the poisoned training set and what the defense will be given."""

    cfg: DictConfig
    run_id: str
    splits: Any
    encoder: torch.nn.Module
    poisoned: Any  # Poisoned: the poisoned train set and its poison_idx (ground truth, for analyses only)
    ctx: Any
    data_attack: Any
    defense: Any
    probe: Any
    clean: Any  # the defense's share of the clean reserve (None unless it declares one)


def prepare(cfg: DictConfig) -> Prepared:
    """Data, encoder (cached), poisoning, as `pipeline.run` does them, without writing a row."""
    from securetl import pipeline, results
    from securetl.build import build
    from securetl.cache import Cache
    from securetl.deltas import apply_deltas
    from securetl.encoders.obtain import obtain
    from securetl.interfaces import RunContext
    from securetl.knowledge import check_knowledge, clean_share
    from securetl.numerics import Numerics
    from securetl.validate import check_config, resolve_device

    choices = results.choices_of(cfg)
    overrides = list(cfg.hydra.overrides.task)
    apply_deltas(cfg, choices, overrides)
    rid = results.run_id(cfg, choices)
    check_config(cfg, overrides)
    device = resolve_device(cfg.device)
    numerics = Numerics.resolve(device, str(cfg.precision), bool(cfg.deterministic), int(cfg.threads))
    data_attack, encoder_attack = build(cfg.data_attack), build(cfg.encoder_attack)
    defense = build(cfg.defense)
    knowledge = check_knowledge(defense, choices.get("defense"))
    probe, spec = build(cfg.probe), build(cfg.encoder)
    numerics.apply_global()
    pipeline.set_seed(int(cfg.seed))
    splits = build(cfg.dataset)
    clean = clean_share(splits, knowledge, choices.get("defense"))
    ctx = RunContext(
        device=device,
        seed=int(cfg.seed),
        num_classes=splits.num_classes,
        cache=Cache(cfg.paths.cache_dir, enabled=bool(cfg.cache)),
        progress=False,
        numerics=numerics,
    )
    encoder, _ = obtain(
        spec,
        splits.pretrain,
        encoder_attack,
        cfg.encoder_attack,
        ctx,
        reference=splits.reference,
        background=splits.background,
    )
    poisoned = data_attack.poison(splits.train, ctx.generator(salt=1))
    pipeline.set_seed(int(cfg.seed))
    return Prepared(cfg, rid, splits, encoder, poisoned, ctx, data_attack, defense, probe, clean)


def replay(cfg: DictConfig, during_defense=None) -> Replay:
    """pipeline.run's steps up to the trained downstream model, without writing a row: `prepare`, then the
    defense. `during_defense(poisoned, ctx)`: a context manager the defense runs inside (the curves' recorder)."""
    p = prepare(cfg)
    with during_defense(p.poisoned, p.ctx) if during_defense is not None else nullcontext():
        model = p.defense.train(
            p.encoder, p.poisoned.train, p.probe, replace(p.ctx, clean=p.clean, diagnostics={})
        )
    target = p.data_attack.target if p.data_attack.trigger is not None else None
    return Replay(cfg, p.run_id, p.splits, p.encoder, p.poisoned, model, p.ctx, target)


# --------------------------------------------------------------------------- per-epoch curves
@contextmanager
def epoch_curves(poison_idx: torch.Tensor, n: int, ctx: Any) -> Iterator[list[dict[str, float]]]:
    """Record, after each epoch of the first probe training on the whole training set (`n` samples), the mean
    loss and the accuracy (against the labels trained on) of its clean and its poisoned samples. The probe's
    loop (securetl.probe.train_loop) takes an `on_epoch_end` callback; Probe.fit does not pass one, so the
    loop is wrapped here, for the replay only."""
    from securetl import probe as probe_mod

    real, epochs = probe_mod.train_loop, []
    is_poison = torch.zeros(n, dtype=torch.bool)
    is_poison[torch.as_tensor(poison_idx, dtype=torch.long)] = True

    def measure(module, inputs, y) -> dict[str, float]:
        from securetl.probe import batched_forward

        module.eval()
        with torch.no_grad():
            logits = batched_forward(module, inputs, ctx, keep_on_device=True).float().cpu()
        loss = torch.nn.functional.cross_entropy(logits, y.cpu(), reduction="none")
        right = (logits.argmax(1) == y.cpu()).float()
        out = {}
        for part, mask in (("clean", ~is_poison), ("poison", is_poison)):
            out[f"loss_{part}"] = float(loss[mask].mean()) if mask.any() else float("nan")
            out[f"acc_{part}"] = float(right[mask].mean()) if mask.any() else float("nan")
        return out

    def wrapped(module, inputs, y, ctx_, groups, **kw):
        if epochs or len(y) != n:  # another training (a subset, a second model): not this curve
            return real(module, inputs, y, ctx_, groups, **kw)
        epochs.append({"epoch": 0, **measure(module, inputs, y)})
        inner = kw.pop("on_epoch_end", None)

        def on_epoch_end(done: int) -> bool | None:
            epochs.append({"epoch": done, **measure(module, inputs, y)})
            return inner(done) if inner is not None else None

        return real(module, inputs, y, ctx_, groups, on_epoch_end=on_epoch_end, **kw)

    probe_mod.train_loop = wrapped
    try:
        yield epochs
    finally:
        probe_mod.train_loop = real


def record_curves(cfg: DictConfig) -> dict[str, Any]:
    """Replay the cell with the epoch curves recorded; written to `<results dir>/curves/<run_id>.json`."""
    from securetl import results
    from securetl.cache import atomic_write_json

    epochs: list[dict[str, float]] = []

    @contextmanager
    def recorder(poisoned, ctx):
        with epoch_curves(poisoned.poison_idx, len(poisoned.train), ctx) as recorded:
            yield
            epochs.extend(recorded)

    rep = replay(cfg, recorder)
    record = {
        "run_id": rep.run_id,
        "choices": results.choices_of(cfg),
        "seed": int(cfg.seed),
        "overrides": list(cfg.hydra.overrides.task),
        "n_train": len(rep.poisoned.train),
        "n_poison": len(rep.poisoned.poison_idx),
        "epochs": epochs,
    }
    atomic_write_json(Path(cfg.paths.results_dir) / "curves" / f"{rep.run_id}.json", record)
    return record


def first_epoch_at(epochs: list[dict[str, Any]], key: str, level: float) -> int | None:
    """The first epoch whose `key` reaches `level` (None: never)."""
    return next((e["epoch"] for e in epochs if e[key] >= level), None)


def plot_curves(record: dict[str, Any], out: Path) -> Path:
    """Loss (left) and accuracy on the labels trained on (right) per epoch, clean vs poisoned samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = record["epochs"]
    if not ep:
        raise SystemExit("securetl-plot: no training on the whole poisoned set was recorded for this cell")
    x = [e["epoch"] for e in ep]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.4))
    for part, colour in (("clean", "tab:blue"), ("poison", "tab:red")):
        label = "clean samples" if part == "clean" else f"poisoned samples ({record['n_poison']})"
        a1.plot(x, [e[f"loss_{part}"] for e in ep], color=colour, marker=".", label=label)
        a2.plot(x, [100 * e[f"acc_{part}"] for e in ep], color=colour, marker=".", label=label)
    a1.set_xlabel("epoch")
    a1.set_ylabel("mean training loss (cross-entropy)")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy on the training labels (%)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ch = record["choices"]
    # what the curves say, measured, not assumed: ABL and ASD premise that the poisons are learned first
    fit = {part: first_epoch_at(ep, f"acc_{part}", 0.9) for part in ("clean", "poison")}
    said = ", ".join(
        f"{'poisons' if part == 'poison' else 'clean samples'} reach 90 % "
        + (f"at epoch {e}" if e is not None else "never")
        for part, e in fit.items()
    )
    fig.suptitle(
        f"{ch.get('data_attack')} data / {ch.get('encoder_attack')} encoder attack on {ch.get('dataset')}, "
        f"probe {ch.get('probe')}, seed {record['seed']}\n{said}",
        fontsize=10,
    )
    return _save(fig, out)


# --------------------------------------------------------------------------- feature embeddings
def pca_2d(f: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, 2): the top two principal components (centred, via SVD; deterministic sign)."""
    f = f.double() - f.double().mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(f, full_matrices=False)
    proj = f @ v[:2].T
    signs = torch.sign(proj[proj.abs().argmax(0), torch.arange(2)])
    return (proj * signs).float()


def embeddings(rep: Replay) -> dict[str, torch.Tensor]:
    """PCA of the training features under the received encoder and under the defended model's encoder."""
    from securetl.probe import memo_forward

    x = rep.poisoned.train.x
    before = memo_forward(rep.encoder, x, rep.ctx).float().cpu()
    after = memo_forward(rep.model.encoder, x, rep.ctx).float().cpu()
    return {"received encoder": pca_2d(before), "after the defense": pca_2d(after)}


def plot_embeddings(rep: Replay, out: Path) -> Path:
    """Two panels: clean samples coloured by class (small), poisoned samples as red crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from securetl import results

    y = rep.poisoned.train.y
    is_poison = torch.zeros(len(y), dtype=torch.bool)
    is_poison[torch.as_tensor(rep.poisoned.poison_idx, dtype=torch.long)] = True
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5))
    names = list(rep.splits.class_names)
    for ax, (title, z) in zip(axes, embeddings(rep).items()):
        for c in range(rep.splits.num_classes):
            m = (y == c) & ~is_poison
            ax.scatter(z[m, 0], z[m, 1], s=4, alpha=0.35, color=plt.cm.tab10(c % 10), label=names[c])
        if is_poison.any():
            label = "poisoned" + (f" (labelled {names[rep.target]})" if rep.target is not None else "")
            ax.scatter(z[is_poison, 0], z[is_poison, 1], s=16, marker="x", color="red", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("principal component 1")
        ax.set_ylabel("principal component 2")
    axes[1].legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ch = results.choices_of(rep.cfg)
    fig.suptitle(
        f"training features: {ch.get('encoder_attack')} + {ch.get('data_attack')}, defense {ch.get('defense')}, "
        f"probe {ch.get('probe')} (PCA)",
        fontsize=10,
    )
    return _save(fig, out)


# --------------------------------------------------------------------------- command line
def _figures_dir(cfg_or_dir) -> Path:
    if isinstance(cfg_or_dir, DictConfig):
        return Path(cfg_or_dir.paths.results_dir) / "figures"
    return Path(cfg_or_dir) / "figures"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="securetl-plot", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="kind", required=True)
    a = sub.add_parser("acc-asr", help="ACC vs ASR of a table preset's rows")
    a.add_argument("table")
    a.add_argument("--results-dir", default=None)
    for name, what in (
        ("curves", "per-epoch loss/accuracy, clean vs poisoned"),
        ("embed", "2-D PCA of features"),
    ):
        p = sub.add_parser(name, help=what)
        p.add_argument(
            "overrides", nargs="*", help="the cell, as `securetl` takes it (e.g. data_attack=badnets)"
        )
    for p in sub.choices.values():
        p.add_argument("--config-dir", "-cd", action="append", default=[], help="as `securetl -cd DIR`")
        p.add_argument(
            "--out", default=None, help="the figure's file (default: under <results dir>/figures/)"
        )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dirs = [Path(d).expanduser() for d in args.config_dir]
    if args.kind == "acc-asr":
        from securetl.tables import CONF_DIR as TABLE_CONF
        from securetl.tables import load_preset

        conf = [*dirs, TABLE_CONF]
        long, keys, results_dir = acc_asr_points(args.table, args.results_dir, conf)
        title = load_preset(args.table, conf)["report"].get("title", args.table)
        out = args.out or _figures_dir(results_dir) / f"{args.table}_acc_asr.png"
        print(plot_acc_asr(long, keys, title, Path(out)))
        return
    cfg = compose(args.overrides, dirs)
    if args.kind == "curves":
        record = record_curves(cfg)
        out = args.out or _figures_dir(cfg) / f"curves_{record['run_id']}.png"
        print(plot_curves(record, Path(out)))
    else:
        rep = replay(cfg)
        out = args.out or _figures_dir(cfg) / f"embed_{rep.run_id}.png"
        print(plot_embeddings(rep, Path(out)))


if __name__ == "__main__":
    sys.exit(main())
