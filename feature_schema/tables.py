"""Reading an entity table (TSV with a header row, or Parquet) into plain cells, without Beam or TF.

The serving graph joins the tables the ETL joined (``EntityTableSpec``) from a copy inside the
export; this is how the exporter reads that copy. Cells are strings as the ETL sees them
(``str()`` of a Parquet value); an empty cell (or a Parquet null) means the column is missing for
that key.

``read_vectors`` reads a vector field's table (``VectorFieldSpec``), checking every row: the ETL
validates the table with it, and the featurization layer loads it into the graph with it.
"""
from __future__ import annotations

import csv
import io
import math

from feature_schema.rules import to_float32


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


def parse_vector(cell, dim: int, where: str) -> list[float]:
    """The floats of one vector cell: ``d`` comma-separated numbers (TSV) or a list (Parquet).

    Values are rounded to float32 (what the graph holds); each must be finite there.

    Raises:
      ValueError: naming ``where`` (the file and row) and what is wrong.
    """
    if cell is None:
        raise ValueError(f"{where}: no vector")
    parts = cell.split(",") if isinstance(cell, str) else list(cell)
    if len(parts) != dim:
        raise ValueError(f"{where}: {len(parts)} values, the field's dim is {dim}")
    out = []
    for i, p in enumerate(parts):
        try:
            v = float(p)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: value {i} {p!r} is not a number") from None
        v32 = to_float32(v)
        if not math.isfinite(v32):
            raise ValueError(f"{where}: value {i} {p!r} is not finite in float32")
        out.append(v32)
    return out


def read_vectors(path: str, key_column: str, column: str, dim: int, opener=open) -> tuple[list[str], list[list[float]]]:
    """(keys, vectors) of a vector table, in file order, every row checked (``parse_vector``).

    Args:
      path: TSV with a header row (the vector column holds ``d`` comma-separated floats) or Parquet
        (``.parquet``/``.pq``; the vector column is a list column).
      key_column, column: the key and vector columns.
      dim: d.
      opener: ``open``-like (``opener(path, "rb")``); the ETL passes Beam's filesystems.

    Raises:
      ValueError: a missing column, a repeated or empty key, or a bad vector, naming the row
        (the TSV line number, or the Parquet row index) and the key.
    """
    keys, vectors, seen = [], [], set()

    def add(key, cell, where):
        if key in ("", None):
            raise ValueError(f"{where}: empty key")
        key = str(key)
        if key in seen:
            raise ValueError(f"{where}: key {key!r} appears twice")
        seen.add(key)
        keys.append(key)
        vectors.append(parse_vector(cell, dim, f"{where} (key {key!r})"))

    if path.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        with opener(path, "rb") as f:
            schema_names = pq.read_schema(f).names
            missing = [c for c in (key_column, column) if c not in schema_names]
            if missing:
                raise ValueError(f"{path}: columns {missing} not in {schema_names}")
            f.seek(0)
            table = pq.read_table(f, columns=[key_column, column]).to_pydict()
        for i, (key, cell) in enumerate(zip(table[key_column], table[column])):
            add(key, cell, f"{path} row {i}")
        return keys, vectors
    with opener(path, "rb") as f:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        reader = csv.reader(text, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, [])
        missing = [c for c in (key_column, column) if c not in header]
        if missing:
            raise ValueError(f"{path}: columns {missing} not in the header {header}")
        key_pos, pos = header.index(key_column), header.index(column)
        for lineno, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise ValueError(f"{path}:{lineno}: {len(row)} cells, the header has {len(header)}")
            add(row[key_pos], row[pos], f"{path}:{lineno}")
    return keys, vectors
