"""Where T-Core's accuracy goes: phases 1-3 once, as the defense runs them, then phase 4 in several ways from
the same post-phase-3 state. An analysis with ground truth on development variants, never part of the defense.

    python scripts/tcore_pool_oracle.py threat=t2_blended seed=0 threads=1 \
        [--ways default restart random_clean all_clean balanced90] [more Hydra overrides]

Ways (each starts from the model phase 3 left: untrusted channels re-initialised, trusted ones pre-trained):
  default         phase 4 as configured (the run's own result: same ACC / ASR as the row)
  restart         the final training alone, restarted from the post-phase-3 model, on the default's pool
  random_clean    the final training on as many clean samples as the default's pool holds, drawn at random
                  (an oracle: it reads poison_idx)
  all_clean       the final training on every clean sample (an oracle)
  balancedNN      phase 4 with pool_quota=balanced and rho = NN / 100 (e.g. balanced90)

Prints one JSON line per way: ACC, ASR, per-class ACC, pool size, pool poisons, pool per class, seconds.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import time
from dataclasses import replace

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. threat=t2_blended seed=0")
    parser.add_argument("--ways", nargs="+", default=["default", "restart", "random_clean", "all_clean"])
    args = parser.parse_args()

    import securetl.defenses.tcore.defense as tcore_defense
    from securetl import metrics, pipeline
    from securetl.build import build
    from securetl.defenses.tcore.bootstrap import bootstrap
    from securetl.numerics import take
    from securetl.plots import compose, prepare
    from securetl.probe import predict

    cell = prepare(compose(["defense=tcore", "probe=finetune", *args.overrides]))
    ctx, encoder, poisoned, tc = cell.ctx, cell.encoder, cell.poisoned, cell.defense
    triggers = pipeline.triggers_in_play(cell.data_attack, build(cell.cfg.encoder_attack), cell.cfg)
    y, test, c = poisoned.train.y, cell.splits.test, ctx.num_classes
    is_poison = torch.zeros(len(y), dtype=torch.bool)
    is_poison[poisoned.poison_idx] = True
    start = tc.trainable_start(encoder)

    def report(tail, way: str, pool: torch.Tensor, t0: float) -> None:
        model = tc.assemble(encoder, start, copy.deepcopy(tail))
        out = metrics.evaluate(model, test, triggers, ctx)
        pred = predict(model, test.x, ctx)
        per_class = [round(100 * float((pred[test.y == k] == k).float().mean()), 1) for k in range(c)]
        line = {
            "way": way,
            "acc": round(100 * out["acc"], 2),
            "asr": round(100 * out["asr"], 2),
            "per_class_acc": per_class,
            "pool": len(pool),
            "pool_poisons": int(is_poison[pool].sum()),
            "pool_per_class": torch.bincount(y[pool], minlength=c).tolist(),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(line), flush=True)

    def ways(tail, acts, y_, start_idx, trainer, g, *rest):
        """Stands in for bootstrap() inside TCore._train: every way from the same state and generator."""
        post3, g_state = copy.deepcopy(tail), g.get_state()
        clean = torch.nonzero(~is_poison).squeeze(1)
        result = None

        def fresh():
            gen = torch.Generator()
            gen.set_state(g_state)
            return copy.deepcopy(post3), gen, time.perf_counter()

        def final_only(idx, way):
            t, gen, t0 = fresh()
            trainer.train(t, take(acts, idx), y_[idx], tc.final_epochs, gen, True, cosine=tc.final_cosine)
            report(t, way, idx, t0)

        for way in args.ways:
            if way == "default" or way.startswith("balanced"):
                t, gen, t0 = fresh()
                if way == "default":
                    res = bootstrap(t, acts, y_, start_idx, trainer, gen, *rest)
                else:
                    call = inspect.signature(bootstrap).bind(t, acts, y_, start_idx, trainer, gen, *rest)
                    call.arguments.update(rho=int(way[len("balanced") :]) / 100, quota="balanced")
                    res = bootstrap(*call.args, **call.kwargs)
                report(t, way, res.pool_idx, t0)
                result = result or res
            elif way == "restart":
                if result is None:
                    raise SystemExit("--ways: restart needs default (or balancedNN) before it")
                final_only(result.pool_idx, way)
            elif way == "random_clean":
                n = len(result.pool_idx) if result is not None else int(tc.class_rho * len(clean))
                gen = torch.Generator().manual_seed(0)
                final_only(clean[torch.randperm(len(clean), generator=gen)[:n]].sort().values, way)
            elif way == "all_clean":
                final_only(clean, way)
            else:
                raise SystemExit(f"--ways: unknown way {way!r}")
        if result is None:  # the defense still needs a pool to finish its run
            result = bootstrap(copy.deepcopy(post3), acts, y_, start_idx, trainer, g, *rest)
        return result

    tcore_defense.bootstrap = ways
    tc.train(encoder, poisoned.train, cell.probe, replace(ctx, clean=cell.clean, diagnostics={}))


if __name__ == "__main__":
    main()
