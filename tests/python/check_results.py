"""Reads a report folder's runs.parquet and metrics.parquet with polars, pandas (pyarrow) and
DuckDB, checks the column types docs/results.md documents, runs its example analysis in all
three, and checks the result against summary.md (what `cargo xtask report` printed).

Usage: python3 tests/python/check_results.py reports/quick
"""
import math
import re
import sys
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl

folder = Path(sys.argv[1])
runs_path, metrics_path = folder / "runs.parquet", folder / "metrics.parquet"

# Types, as polars reads them.
runs = pl.read_parquet(runs_path)
metrics = pl.read_parquet(metrics_path)
expected = {
    "run_id": pl.String, "strategy": pl.String, "status": pl.String, "seed": pl.UInt64,
    "best_metric": pl.Float64, "final_metric": pl.Float64, "student_parameters": pl.UInt64,
    "compression": pl.Float64, "flops_per_sample": pl.UInt64, "wall_seconds": pl.Float64,
}
for column, dtype in expected.items():
    assert runs.schema[column] == dtype, (column, runs.schema[column])
for column in ("started_at", "finished_at"):
    dtype = runs.schema[column]
    assert isinstance(dtype, pl.Datetime) and dtype.time_zone == "UTC", (column, dtype)
for column in ("latency_ms_batch1", "latency_ms_batch64"):
    assert runs.schema[column] == pl.Float64 and runs[column].min() > 0, (column, runs[column])
assert metrics.schema["epoch"] == pl.UInt32 and metrics.schema["value"] == pl.Float64, metrics.schema

# The example analysis, three ways.
by_polars = (runs.filter(pl.col("status") == "ok")
                 .group_by("strategy")
                 .agg(pl.col("best_metric").mean().alias("mean"), pl.col("best_metric").std().alias("std"))
                 .sort("strategy"))
frame = pd.read_parquet(runs_path)
assert str(frame["seed"].dtype) == "uint64" and str(frame["best_metric"].dtype) == "float64", frame.dtypes
assert str(frame["started_at"].dtype).startswith("datetime64") and str(frame["started_at"].dt.tz) == "UTC", frame["started_at"].dtype
zone = duckdb.sql(f"SELECT typeof(started_at) FROM '{runs_path}' LIMIT 1").fetchall()[0][0]
assert zone == "TIMESTAMP WITH TIME ZONE", zone
by_pandas = frame[frame.status == "ok"].groupby("strategy")["best_metric"].agg(["mean", "std"])
by_duckdb = duckdb.sql(
    f"SELECT strategy, avg(best_metric) AS mean, stddev_samp(best_metric) AS std "
    f"FROM '{runs_path}' WHERE status = 'ok' GROUP BY strategy ORDER BY strategy"
).fetchall()

# summary.md rows: | strategy | ok/runs | best | ...: "mean ± std" in the third column.
printed = {}
for line in (folder / "summary.md").read_text().splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) >= 3 and re.fullmatch(r"-?[\d.]+ ± [\d.]+", cells[2]):
        mean, std = (float(v) for v in cells[2].split(" ± "))
        printed[cells[0].split(" ")[0]] = (mean, std)
assert printed, "no rows in summary.md"

for strategy, mean, std in by_polars.iter_rows():
    p_mean, p_std = by_pandas.loc[strategy, "mean"], by_pandas.loc[strategy, "std"]
    d_row = next(r for r in by_duckdb if r[0] == strategy)
    for other in (p_mean, d_row[1]):
        assert math.isclose(mean, other, rel_tol=1e-12), (strategy, mean, other)
    for other in (p_std, d_row[2]):
        assert math.isclose(std or 0.0, other or 0.0, rel_tol=1e-9, abs_tol=1e-12), (strategy, std, other)
    want_mean, want_std = printed[strategy]
    assert abs(mean - want_mean) <= 5e-5 and abs((std or 0.0) - want_std) <= 5e-5, (strategy, mean, std, printed[strategy])
print(f"ok: {by_polars.height} strategies agree across polars, pandas, DuckDB and summary.md")
