"""Sample data and result comparison for the data processor's tests.

The shop data is small but has what makes engines disagree when they are
careless: null keys, null numbers, zero and negative divisors, halves to
round, mixed-case text with spaces, and a customer no order names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ORDERS_CSV = """\
id,customer,amount,qty,product,note,placed
1,10,12.5,2,apple,gift,2024-01-05 10:00:00
2,11,,1,pear,,2024-01-06 11:30:00
3,10,7.25,-3,apple,,2024-01-07 09:15:00
4,,100,5,fig,bulk,2024-01-08 08:00:00
5,12,3,0,pear,,2024-01-09 17:45:00
6,11,0.285,4,Kiwi ,rush,2024-01-10 12:00:00
7,10,2.5,-7,apple,,
8,13,-2.5,3,fig,gift,2024-01-12 13:00:00
9,,1.005,2,pear,,2024-01-13 14:30:00
10,11,55.5,,kiwi,bulk,2024-01-14 15:00:00
11,12,,6,Apple,,2024-01-15 16:00:00
12,14,19.99,1,plum,gift,2024-01-16 07:30:00
"""

CUSTOMERS_CSV = """\
customer,name,country
10, Ann ,fr
11,bob,de
12,Cy,
13,dee,fr
15,Eve,es
,Nobody,xx
"""


def write_shop(root: Path) -> Path:
    """orders (csv, json, parquet with the same rows) and customers, under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "orders.csv").write_text(ORDERS_CSV)
    (root / "customers.csv").write_text(CUSTOMERS_CSV)
    rows = [line.split(",") for line in ORDERS_CSV.strip().splitlines()[1:]]
    table = pa.table(
        {
            "id": pa.array([int(r[0]) for r in rows], pa.int64()),
            "customer": pa.array([int(r[1]) if r[1] else None for r in rows], pa.int64()),
            "amount": pa.array([float(r[2]) if r[2] else None for r in rows], pa.float64()),
            "qty": pa.array([int(r[3]) if r[3] else None for r in rows], pa.int64()),
            "product": pa.array([r[4] for r in rows], pa.string()),
            "note": pa.array([r[5] or None for r in rows], pa.string()),
        }
    )
    pq.write_table(table, root / "orders.parquet")
    with open(root / "orders.json", "w") as out:
        for record in table.to_pylist():
            out.write(json.dumps(record) + "\n")
    return root


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def sort_key(row: dict[str, Any]) -> tuple:
    """Orders rows of mixed values (None, ints that one engine gives as floats)."""
    key = []
    for value in row.values():
        if value is None:
            key.append((0, 0))
        elif _number(value):
            key.append((1, round(float(value), 9)))
        else:
            key.append((2, str(value)))
    return tuple(key)


def assert_same_result(a: dict[str, Any], b: dict[str, Any], ordered: bool = False) -> None:
    """Same columns, count and rows (in any order unless `ordered`), floats within 1e-9."""
    assert a["columns"] == b["columns"], (a["columns"], b["columns"])
    assert a["row_count"] == b["row_count"], (a["row_count"], b["row_count"])
    rows_a, rows_b = a["rows"], b["rows"]
    if not ordered:
        rows_a, rows_b = sorted(rows_a, key=sort_key), sorted(rows_b, key=sort_key)
    assert len(rows_a) == len(rows_b)
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        assert list(row_a) == list(row_b)
        for column in row_a:
            x, y = row_a[column], row_b[column]
            if _number(x) and _number(y):
                assert math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9), (column, row_a, row_b)
            else:
                assert x == y, (column, row_a, row_b)
