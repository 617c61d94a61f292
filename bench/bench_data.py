"""The data processor's pandas engine against hand-written pandas, on the same file.

Generates a CSV of ~1.5 M orders, then times, alternating, several trials of:
- the service (its app, in-process) running the operation list
  read csv -> filter -> derive -> group/aggregate -> sort -> write csv;
- plain pandas code doing the same steps the way one would write them
  (`pd.read_csv`, boolean mask, `assign`, `groupby().agg`, `sort_values`, `to_csv`);
- the same hand-written code with pandas' pyarrow CSV reader and dtypes, for reference.
Reports rows/s (input rows over the median time) and the ratio service/plain
pandas, from the medians and from the fastest trials (the machines are
shared and noisy); the target is >= 0.9. Both results are checked to be the
same rows.

    python bench/bench_data.py [--rows 1500000] [--trials 7]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, summary  # noqa: E402

from aisemble.services.data.app import create  # noqa: E402
from aisemble.services.data.settings import DataSettings  # noqa: E402

OPERATIONS = [
    {"op": "read", "path": "orders.csv"},
    {"op": "filter", "where": "amount > 10 and region != 'north'"},
    {"op": "derive", "column": "total", "expr": "amount * qty"},
    {
        "op": "group",
        "by": ["category", "region"],
        "aggregations": [
            {"column": "total", "func": "sum", "as": "sum_total"},
            {"column": "amount", "func": "mean", "as": "mean_amount"},
            {"func": "count", "as": "orders"},
        ],
    },
    {"op": "sort", "by": ["sum_total"], "descending": True},
    {"op": "write", "path": "out/service.csv"},
]


def generate(path: Path, rows: int) -> int:
    rng = np.random.default_rng(42)
    amount = np.round(rng.gamma(2.0, 20.0, rows), 2)
    missing = rng.random(rows) < 0.02
    categories = np.array([f"cat{i:02d}" for i in range(20)])
    regions = np.array(["north", "south", "east", "west", "centre"])
    table = pa.table(
        {
            "id": pa.array(np.arange(rows)),
            "category": pa.array(categories[rng.integers(0, 20, rows)]),
            "region": pa.array(regions[rng.integers(0, 5, rows)]),
            "amount": pa.array(amount, mask=missing),
            "qty": pa.array(rng.integers(1, 11, rows)),
        }
    )
    pcsv.write_csv(table, path, pcsv.WriteOptions(quoting_style="none"))
    return path.stat().st_size


def plain_pandas(source: Path, target: Path, **read_options: str) -> None:
    df = pd.read_csv(source, **read_options)
    df = df[(df["amount"] > 10) & (df["region"] != "north")]
    df = df.assign(total=df["amount"] * df["qty"])
    out = (
        df.groupby(["category", "region"])
        .agg(sum_total=("total", "sum"), mean_amount=("amount", "mean"), orders=("id", "size"))
        .reset_index()
    )
    out = out.sort_values("sum_total", ascending=False)
    out.to_csv(target, index=False)


def same_rows(a: Path, b: Path) -> bool:
    x, y = pd.read_csv(a), pd.read_csv(b)
    x, y = (f.sort_values(["category", "region"]).reset_index(drop=True) for f in (x, y))
    if list(x.columns) != list(y.columns) or len(x) != len(y):
        return False
    numbers = ["sum_total", "mean_amount", "orders"]
    return x[["category", "region"]].equals(y[["category", "region"]]) and np.allclose(
        x[numbers].to_numpy(float), y[numbers].to_numpy(float), rtol=1e-9
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_500_000)
    parser.add_argument("--trials", type=int, default=7)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="aisemble-bench-data-"))
    try:
        source = root / "orders.csv"
        (root / "out").mkdir()
        size = generate(source, args.rows)
        print(f"{args.rows} rows, {size / 2**20:.0f} MiB of CSV in {root}", flush=True)
        times: dict[str, list[float]] = {"service": [], "pandas": [], "pandas_pyarrow": []}
        with TestClient(create(DataSettings(root=root))) as client:

            def service() -> None:
                response = client.post(
                    "/process", json={"operations": OPERATIONS, "engine": "pandas"}
                )
                assert response.status_code == 200, response.text

            runs = {
                "service": service,
                "pandas": lambda: plain_pandas(source, root / "out" / "pandas.csv"),
                "pandas_pyarrow": lambda: plain_pandas(
                    source,
                    root / "out" / "pandas_pyarrow.csv",
                    engine="pyarrow",
                    dtype_backend="pyarrow",
                ),
            }
            service()  # warm-up: first imports of the engine and its libraries
            for trial in range(args.trials):
                # Alternate the order, so neither side always runs on a warmer cache.
                order = list(runs) if trial % 2 == 0 else list(reversed(runs))
                for name in order:
                    started = time.perf_counter()
                    runs[name]()
                    times[name].append(time.perf_counter() - started)
                print(
                    f"  trial {trial + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in runs),
                    flush=True,
                )
        agree = same_rows(root / "out" / "service.csv", root / "out" / "pandas.csv")
        stats = {name: summary(samples) for name, samples in times.items()}
        rate = {name: args.rows / stats[name]["p50"] for name in stats}
        ratio = rate["service"] / rate["pandas"]
        # The fastest trials say the same with less of the machine's noise in them.
        best_ratio = stats["pandas"]["min"] / stats["service"]["min"]
        result = {
            "rows": args.rows,
            "csv_bytes": size,
            "trials": args.trials,
            "operations": [op["op"] for op in OPERATIONS],
            "seconds": stats,
            "rows_per_second": rate,
            "ratio_service_to_pandas": ratio,
            "ratio_service_to_pandas_best_trials": best_ratio,
            "ratio_service_to_pandas_pyarrow": rate["service"] / rate["pandas_pyarrow"],
            "same_result": agree,
            "target_ratio": 0.9,
        }
        print(
            f"\nservice (pandas engine): {rate['service']:,.0f} rows/s "
            f"(median {stats['service']['p50']:.2f}s)\n"
            f"plain pandas:            {rate['pandas']:,.0f} rows/s "
            f"(median {stats['pandas']['p50']:.2f}s)\n"
            f"pandas + pyarrow reader: {rate['pandas_pyarrow']:,.0f} rows/s "
            f"(median {stats['pandas_pyarrow']['p50']:.2f}s)\n"
            f"ratio service / plain pandas: {ratio:.2f} (target >= 0.9; "
            f"{best_ratio:.2f} between the fastest trials); "
            f"service / pandas+pyarrow: {result['ratio_service_to_pandas_pyarrow']:.2f}; "
            f"same result: {agree}"
        )
        print(f"wrote {save('data', result)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
