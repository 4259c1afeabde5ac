#!/usr/bin/env python3
"""Read a results folder from Python: an example to copy from.

    scripts/read_results.py [RESULTS_DIR]        # default: results

The runner writes, per experiment (results/<name>/):
  summary.parquet               one row per run: experiment, run_id, one column per grid key
                                (its dotted name, e.g. "model.backend"), seed, data, backend,
                                head, n_params, epochs, best_epoch, best_val_nll, test_nll,
                                test_bpd, wall_seconds, status, reason
  runs/<run_id>/metrics.parquet one row per epoch: epoch, train_nll, val_nll, val_bpd, seconds

Below: the same files read with polars (data frames), then queried with DuckDB (SQL over
parquet globs, no loading step). NLLs are in nats per image.

Needs: pip install polars duckdb
"""

import sys
from pathlib import Path

try:
    import duckdb
    import polars as pl
except ImportError as e:
    sys.exit(f"read_results.py: the Python package {e.name!r} is missing: pip install polars duckdb")


def main() -> None:
    if len(sys.argv) > 2 or sys.argv[1:] in (["-h"], ["--help"]):
        print(__doc__)
        sys.exit(0 if len(sys.argv) == 2 else 2)
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results")
    summaries = sorted(root.glob("*/summary.parquet"))
    if not summaries:
        sys.exit(
            f"read_results.py: no <experiment>/summary.parquet under {root}/: "
            "run a sweep first (runner sweep FILE, or scripts/reproduce.sh --quick)"
        )
    pl.Config.set_tbl_rows(40)
    pl.Config.set_tbl_cols(12)
    pl.Config.set_fmt_str_lengths(60)
    pl.Config.set_tbl_width_chars(200)

    # --- polars: each experiment's summary (experiments have different grid keys). ---
    for path in summaries:
        runs = pl.read_parquet(path)
        grid = [c for c in runs.columns if "." in c]  # grid keys are dotted: "model.backend"
        print(f"\n{path}: {runs.height} runs, grid keys {grid or 'none'}")
        table = (
            runs.filter(pl.col("status") == "finished")
            .group_by(grid or ["backend"], maintain_order=True)
            .agg(
                seeds=pl.len(),
                test_nll=pl.col("test_nll").mean().round(2),
                test_nll_std=pl.col("test_nll").std().round(2),
                test_bpd=pl.col("test_bpd").mean().round(4),
                epochs=pl.col("epochs").mean(),
            )
            .sort("test_nll")
        )
        print(table)
        not_finished = runs.filter(pl.col("status") != "finished")
        if not_finished.height:
            print("not finished:", not_finished.select("run_id", "status", "reason"))

        # Per-epoch metrics: one file per run; the run id is its folder's name.
        files = sorted(path.parent.glob("runs/*/metrics.parquet"))
        if not files:
            continue
        metrics = pl.concat(pl.read_parquet(p).with_columns(run_id=pl.lit(p.parent.name)) for p in files)
        # Each run's epoch of lowest validation NLL, checked against the summary's best_epoch.
        best = metrics.sort("epoch").group_by("run_id").agg(pl.all().sort_by("val_nll").first())
        check = best.join(runs.select("run_id", "best_epoch"), on="run_id")
        agree = (check["epoch"] == check["best_epoch"]).sum()
        print(f"{metrics.height} epochs in {len(files)} metrics files; best epoch as in the summary: {agree}/{check.height}")

    # --- DuckDB: SQL straight over the parquet files of every experiment at once. ---
    db = duckdb.connect()
    best_per_config = db.sql(
        rf"""
        -- union_by_name: experiments have different grid columns (absent ones read as NULL).
        WITH summary AS (
            SELECT * FROM read_parquet('{root}/*/summary.parquet', union_by_name = true)
        ),
        -- A config label from the grid columns (the dotted names) that a run has:
        -- one (key, value) row per non-NULL grid value, joined to "channels=64 head=categorical".
        grid AS (
            SELECT experiment, run_id,
                   string_agg(regexp_extract(key, '[^.]+$') || '=' || value, ' ' ORDER BY key) AS config
            FROM (UNPIVOT (SELECT experiment, run_id, COLUMNS('\.')::VARCHAR FROM summary)
                  ON COLUMNS('\.') INTO NAME key VALUE value)
            GROUP BY ALL
        ),
        -- filename = true adds each row's file path: results/<experiment>/runs/<run_id>/metrics.parquet.
        epochs AS (
            SELECT regexp_extract(filename, '([^/]+)/runs/([^/]+)/metrics\.parquet$', 1) AS experiment,
                   regexp_extract(filename, '([^/]+)/runs/([^/]+)/metrics\.parquet$', 2) AS run_id,
                   *
            FROM read_parquet('{root}/*/runs/*/metrics.parquet', filename = true)
        ),
        per_run AS (
            SELECT experiment, run_id, min(val_nll) AS best_val_nll, count(*) AS epochs, sum(seconds) AS seconds
            FROM epochs GROUP BY ALL
        )
        SELECT s.experiment,
               coalesce(g.config, s.backend) AS config,
               count(*) AS seeds,
               round(avg(r.best_val_nll), 2) AS best_val_nll,
               round(stddev_samp(r.best_val_nll), 2) AS std,
               round(avg(s.test_nll), 2) AS test_nll,
               round(avg(s.test_bpd), 4) AS test_bpd,
               round(avg(r.epochs), 1) AS epochs,
               round(sum(r.seconds)) AS train_s
        FROM summary s
        JOIN per_run r USING (experiment, run_id)
        LEFT JOIN grid g USING (experiment, run_id)
        WHERE s.status = 'finished'
        GROUP BY ALL
        ORDER BY s.experiment, best_val_nll
        """
    )
    print("\nDuckDB: best validation NLL per config (mean over seeds of each run's lowest epoch)")
    best_per_config.show(max_width=200, max_rows=100)

if __name__ == "__main__":
    main()
