"""One run, top to bottom: the threat model as code.

splits   = dataset                                   downstream train/test (+ pre-training split)
encoder  = obtain(encoder, encoder_attack)           Threat-1: backdoored encoder (cached)
poisoned = data_attack.poison(train)                 Threat-2: poisoned downstream set + poison_idx
model    = defense.train(encoder, poisoned.train)    the defense owns downstream training
metrics  = evaluate(model, test, triggers)           ACC, ASR per distinct trigger
row      -> results/raw/<run_id>.json                one JSON row, atomically
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from securetl import progress, results
from securetl.build import build
from securetl.cache import Cache, plain
from securetl.deltas import apply_deltas
from securetl.encoders.obtain import obtain
from securetl.interfaces import DataAttack, Defense, EncoderAttack, RunContext, Splits
from securetl.knowledge import check_knowledge, clean_share
from securetl.knowledge import record as record_knowledge
from securetl.metrics import TriggerEval, evaluate, knn_evaluate
from securetl.numerics import Numerics, clear_resident
from securetl.validate import (
    ConfigError,
    DataSizes,
    check_config,
    check_encoder,
    planned_sizes,
    resolve_device,
    validate_attacks,
)

log = logging.getLogger(__name__)


def timed(timings: dict[str, float], phase: str):
    """Time a phase into `timings` and log its start and end (progress.phase)."""
    return progress.phase(phase, timings, log)


def triggers_in_play(
    data_attack: DataAttack, encoder_attack: EncoderAttack, cfg: DictConfig
) -> list[TriggerEval]:
    """One entry per distinct trigger; Threat-3 with a shared trigger and target gives one ASR."""
    out: list[TriggerEval] = []
    d_trig = plain(cfg.data_attack.get("trigger")) if data_attack.trigger is not None else None
    e_trig = plain(cfg.encoder_attack.get("trigger")) if encoder_attack.trigger is not None else None
    shared = d_trig is not None and d_trig == e_trig and data_attack.target == encoder_attack.target
    if data_attack.trigger is not None:
        out.append(
            TriggerEval(
                "shared" if shared else "data",
                data_attack.apply_test,
                data_attack.target,
                data_attack.asr_mask,
                data_attack.asr_definition,
            )
        )
    if encoder_attack.trigger is not None and not shared:
        out.append(
            TriggerEval(
                "encoder",
                encoder_attack.apply_test,
                encoder_attack.target,
                encoder_attack.asr_mask,
                encoder_attack.asr_definition,
            )
        )
    if not out:
        # A clean run still reports the ASR of a reference trigger: the floor an attack must beat.
        ref_trigger = build(cfg.eval.reference_trigger)
        target = int(cfg.eval.reference_target)
        out.append(
            TriggerEval(
                "reference", ref_trigger.apply, target, lambda y: y != target, "non-target test samples"
            )
        )
    return out


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)


def run(
    cfg: DictConfig, choices: dict[str, str] | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Execute one cell and return its row (also written to `${paths.results_dir}/raw/<run_id>.json`)."""
    choices = choices or results.choices_of(cfg)
    if overrides is None and "hydra" in cfg:
        overrides = list(cfg.hydra.overrides.task)
    deltas = apply_deltas(cfg, choices, overrides or [])
    if deltas:
        log.info("dataset deltas (conf/deltas/%s.yaml): %s", choices.get("dataset"), deltas)
    run_id = results.run_id(cfg, choices)
    raw_dir = Path(cfg.paths.results_dir) / "raw"
    if cfg.resume and (existing := results.load_row(raw_dir, run_id)) is not None:
        log.info("run %s already finished (resume=true): skipping", run_id)
        existing["skipped"] = True
        mirror = build(cfg.logger)  # the sweep's wandb group still gets this cell, marked skipped
        mirror.start(results.resolved(cfg), run_id, choices, skipped=True)
        mirror.log_row(existing)
        mirror.finish()
        return existing

    # ---- everything that can be wrong in the config fails here, before any data or model work
    check_config(cfg, overrides or [])  # types against the targets' signatures, ranges, unknown keys, files
    device = resolve_device(cfg.device)
    try:
        numerics = Numerics.resolve(device, str(cfg.precision), bool(cfg.deterministic), int(cfg.threads))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    data_attack: DataAttack = build(cfg.data_attack)
    encoder_attack: EncoderAttack = build(cfg.encoder_attack)
    defense: Defense = build(cfg.defense)
    # clean data needed but none given: stop here
    knowledge = check_knowledge(defense, choices.get("defense"))
    probe = build(cfg.probe)
    encoder_spec = build(cfg.encoder)
    check_encoder(encoder_spec)  # built on the meta device: architecture and width, no memory, no compute
    logger = build(cfg.logger)
    if (planned := planned_sizes(cfg.dataset)) is not None:  # class counts the dataset's config fixes
        validate_attacks(planned, data_attack, encoder_attack)
    results.ensure_results_dir(raw_dir.parent)  # a row that cannot be written is known now, not after the run

    timings: dict[str, float] = {}
    memory = results.PeakMemory(device).start()  # this run's peak, not the sweep process's
    numerics.apply_global()
    clear_resident()  # the previous sweep job's datasets would otherwise stay on the GPU
    set_seed(int(cfg.seed))
    with timed(timings, "data"):
        splits: Splits = build(cfg.dataset)
    # the same checks on the built splits (every dataset), before any training
    validate_attacks(DataSizes.of(splits), data_attack, encoder_attack)
    clean = clean_share(splits, knowledge, choices.get("defense"))  # None unless the defense declares a share
    ctx = RunContext(
        device=device,
        seed=int(cfg.seed),
        num_classes=splits.num_classes,
        cache=Cache(cfg.paths.cache_dir, enabled=bool(cfg.cache)),
        progress=progress.bars_enabled(bool(cfg.progress)),  # no bars into a redirected or SLURM log
        numerics=numerics,
    )

    logger.start(results.resolved(cfg), run_id, choices)
    with timed(timings, "encoder"):
        encoder, cache_keys = obtain(
            encoder_spec,
            splits.pretrain,
            encoder_attack,
            cfg.encoder_attack,
            ctx,
            reference=splits.reference,
            background=splits.background,
        )
    triggers = triggers_in_play(data_attack, encoder_attack, cfg)
    knn: dict[str, float] = {}
    if encoder_attack.kind != "none" or data_attack.trigger is None:
        # the received encoder by itself, before any defense touches it (a clean encoder has nothing to
        # say about a data attack)
        with timed(timings, "knn"):
            knn = knn_evaluate(encoder, splits.train, splits.test, triggers, ctx)
    with timed(timings, "poison"):
        poisoned = data_attack.poison(splits.train, ctx.generator(salt=1))
    set_seed(int(cfg.seed))
    # the defense's own context: its share of the clean reserve, and no diagnostics of the attacks so far
    defense_ctx = replace(ctx, clean=clean, diagnostics={})
    defense.decisions = progress.DecisionLog(choices.get("defense", defense.name), defense.decisions)
    with timed(timings, "defense"):
        # the defense gets the LabeledSet only: poison_idx never reaches it
        model = defense.train(encoder, poisoned.train, probe, defense_ctx)
    with timed(timings, "evaluate"):
        metrics = evaluate(model, splits.test, triggers, ctx) | knn

    diagnostics = dict(ctx.diagnostics)
    diagnostics.update(defense_ctx.diagnostics)
    diagnostics.update(defense.diagnostics)
    diagnostics.update(results.decision_diagnostics(defense.decisions, poisoned, len(poisoned.train)))
    diagnostics["n_poison"] = len(poisoned.poison_idx)
    diagnostics["n_cover"] = len(poisoned.cover_idx)
    row = results.make_row(
        cfg,
        run_id,
        choices,
        metrics,
        diagnostics,
        timings,
        device,
        cache_keys,
        overrides,
        numerics.record(),
        memory=memory.stop(),
    )
    row["deltas"] = deltas
    row["knowledge"] = record_knowledge(knowledge, clean)
    results.write_row(raw_dir, row)
    logger.log_row(row)  # metrics, diagnostics, timings (total included) and memory
    logger.finish()
    log.info("%s", progress.summary(run_id, metrics))
    return row


__all__ = ["run", "ConfigError"]
