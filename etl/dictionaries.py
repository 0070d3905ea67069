"""Dictionaries the ETL joins: the feature->field map and entity attribute tables.

TSV files have a header row; Parquet files are read with pyarrow (through
Beam's ``ReadFromParquet``). Both become PCollections of ``(key, value)`` that
the job joins as side inputs or by key.
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from etl.config import EntityTableConfig


def is_parquet(path: str) -> bool:
    return path.endswith((".parquet", ".pq"))


def read_tsv_header(path: str) -> list[str]:
    """Column names from the first line of a TSV file (any Beam filesystem)."""
    match = FileSystems.match([path])[0].metadata_list
    if not match:
        raise FileNotFoundError(f"dictionary {path} not found")
    with FileSystems.open(match[0].path) as f:
        first = f.readline().decode("utf-8").rstrip("\r\n")
    return first.split("\t")


def read_parquet_columns(path: str) -> list[str]:
    import pyarrow.parquet as pq

    match = FileSystems.match([path])[0].metadata_list
    if not match:
        raise FileNotFoundError(f"dictionary {path} not found")
    with FileSystems.open(match[0].path) as f:
        return list(pq.read_schema(f).names)


def table_columns(t: EntityTableConfig) -> list[str]:
    """Columns of ``t`` that become fields (all but the key unless listed)."""
    header = read_parquet_columns(t.path) if is_parquet(t.path) else read_tsv_header(t.path)
    key_column = t.key_column or t.key_field
    if key_column not in header:
        raise ValueError(f"entity table {t.name}: key column {key_column!r} not in {header}")
    cols = list(t.columns) or [c for c in header if c != key_column]
    missing = [c for c in cols if c not in header]
    if missing:
        raise ValueError(f"entity table {t.name}: columns {missing} not in {header}")
    return cols


def _tsv_rows(path: str):
    header = read_tsv_header(path)

    def to_row(line: str):
        cells = line.rstrip("\r\n").split("\t")
        if len(cells) != len(header):
            raise ValueError(f"{path}: line {line!r} has {len(cells)} cells, header has {len(header)}")
        return dict(zip(header, cells))

    return header, to_row


def read_field_map(p: beam.Pipeline, path: str, label: str = "FieldMap"):
    """PCollection of (feature key, field name) from a ``feature<TAB>field`` TSV."""
    header, to_row = _tsv_rows(path)
    if header[:2] != ["feature", "field"]:
        raise ValueError(f"field map {path}: header {header} must start with feature, field")
    return (p | f"Read{label}" >> beam.io.ReadFromText(path, skip_header_lines=1)
            | f"Parse{label}" >> beam.Map(lambda line: tuple(to_row(line)[c] for c in ("feature", "field"))))


def read_entity_table(p: beam.Pipeline, t: EntityTableConfig, columns: list[str]):
    """PCollection of (key, {column: value as str}) of an entity table."""
    key_column = t.key_column or t.key_field
    label = f"Entity_{t.name}"
    if is_parquet(t.path):
        rows = p | f"Read{label}" >> beam.io.ReadFromParquet(t.path, columns=[key_column, *columns])
    else:
        _, to_row = _tsv_rows(t.path)
        rows = (p | f"Read{label}" >> beam.io.ReadFromText(t.path, skip_header_lines=1)
                | f"Parse{label}" >> beam.Map(to_row))
    return rows | f"Key{label}" >> beam.Map(
        lambda r: (str(r[key_column]), {c: ("" if r[c] is None else str(r[c])) for c in columns}))
