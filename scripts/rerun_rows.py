"""Re-run committed rows on this machine, in place (`resume=false`, the same run_id): for the rows a table
flags as started from another machine's encoder ("Rows that share an encoder's settings but started from
different weights"), so that every row of a table comes from one build.

    python scripts/rerun_rows.py --encoder-key 25466eb [--table baselines_synthetic] [--shard 0/2] [--dry-run]

Selects the rows under <results dir>/raw whose encoder cache key starts with --encoder-key (and, with --table,
that a sweep of that preset wrote: `table=NAME` among their overrides), and runs each again from its own
overrides with `resume=false`; the new row replaces the old one (same run_id, checked). `--shard I/N` takes every
N-th row from the I-th, so that N processes (one per core) share the work; `--dry-run` lists the rows only.
Run it from the repository root, with the same SECURETL_* environment as the sweep that wrote the rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the defenses/ package lives at the repository root
log = logging.getLogger("rerun_rows")


def select(raw_dir: Path, encoder_key: str, table: str | None) -> list[dict]:
    """The rows to re-run, sorted by run_id (a stable order for --shard)."""
    from securetl.results import read_rows

    out = []
    for r in read_rows(raw_dir):
        keys = r.get("cache_keys") if isinstance(r.get("cache_keys"), dict) else {}
        if not str(keys.get("encoder", "")).startswith(encoder_key):
            continue
        if table is not None and f"table={table}" not in (r.get("overrides") or []):
            continue
        out.append(r)
    return sorted(out, key=lambda r: r["run_id"])


def rerun_overrides(row: dict) -> list[str]:
    """The row's own overrides, with `resume=false` in place of any resume setting."""
    return [o for o in row.get("overrides") or [] if not o.startswith("resume=")] + ["resume=false"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder-key", required=True, help="prefix of the encoder cache key to re-run")
    parser.add_argument("--table", help="only rows a sweep of this preset wrote")
    parser.add_argument("--shard", default="0/1", help="I/N: this process's share (default 0/1)")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--results-dir", type=Path, help="default: the config's paths.results_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        i, n = (int(v) for v in args.shard.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise SystemExit(f"rerun_rows: --shard {args.shard!r}: give I/N with 0 <= I < N") from None

    import securetl.run  # noqa: F401  registers the config resolvers
    from securetl.pipeline import run
    from securetl.tables import compose_run, default_results_dir

    results_dir = args.results_dir or default_results_dir()
    rows = select(results_dir / "raw", args.encoder_key, args.table)[i::n]
    log.info("%d row(s) to re-run under %s (shard %s)", len(rows), results_dir, args.shard)
    for k, old in enumerate(rows, 1):
        overrides = rerun_overrides(old)
        log.info("[%d/%d] %s %s", k, len(rows), old["run_id"], " ".join(overrides))
        if args.dry_run:
            continue
        cfg = compose_run(overrides)
        if args.results_dir is not None:
            cfg.paths.results_dir = str(args.results_dir)
        new = run(cfg, overrides=overrides)
        if (
            new["run_id"] != old["run_id"]
        ):  # the code or config moved on: the old row stays, the new one beside it
            log.warning(
                "  %s re-ran as %s (the config changed since): both rows kept", old["run_id"], new["run_id"]
            )
        was, now = old.get("metrics", {}), new.get("metrics", {})
        log.info(
            "  encoder %s -> %s; acc %s -> %s, asr %s -> %s",
            old["cache_keys"].get("encoder"),
            new["cache_keys"].get("encoder"),
            *(json.dumps(d.get(m)) for m in ("acc", "asr") for d in (was, now)),
        )


if __name__ == "__main__":
    main()
