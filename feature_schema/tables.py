"""Reading an entity table (TSV with a header row, or Parquet) into plain cells, without Beam or TF.

The serving graph joins the tables the ETL joined (``EntityTableSpec``) from a copy inside the
export; this is how the exporter reads that copy. Cells are strings as the ETL sees them
(``str()`` of a Parquet value); an empty cell (or a Parquet null) means the column is missing for
that key.
"""
from __future__ import annotations

import csv


def read_table(path: str, key_column: str, columns) -> dict[str, tuple[str, ...]]:
    """{key: (cell of each of ``columns``)} of a local TSV or Parquet table.

    Raises:
      ValueError: a missing column, or a TSV row whose cell count differs from the header's.
    """
    columns = tuple(columns)
    if path.endswith((".parquet", ".pq")):
        return _read_parquet(path, key_column, columns)
    out: dict[str, tuple[str, ...]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, [])
        missing = [c for c in (key_column, *columns) if c not in header]
        if missing:
            raise ValueError(f"{path}: columns {missing} not in the header {header}")
        pos = [header.index(c) for c in columns]
        key_pos = header.index(key_column)
        for lineno, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise ValueError(f"{path}:{lineno}: {len(row)} cells, the header has {len(header)}")
            out[row[key_pos]] = tuple(row[i] for i in pos)
    return out


def _read_parquet(path: str, key_column: str, columns: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=[key_column, *columns]).to_pydict()
    cells = [["" if v is None else str(v) for v in table[c]] for c in columns]
    return {str(k): tuple(col[i] for col in cells) for i, k in enumerate(table[key_column])}
