"""Dictionaries the ETL joins: the feature->field map and entity attribute tables.

TSV files have a header row; Parquet files are read with pyarrow (Beam's
``ReadFromParquet`` in the job, ``pyarrow.parquet`` for headers). Both become
PCollections of ``(key, value)``, joined as a side input when the file is at
most ``side_input_max_bytes`` (or ``join: side_input``) and by key
(CoGroupByKey, ``etl.transforms.KeyedLookup``) otherwise, so a dictionary never
has to fit into one worker's memory.

A side-input dictionary of at most ``inline_max_bytes`` is read by the launcher
(``field_map_here``, ``entity_table_here``) and travels inside the job graph, as
the same packed blob, with no read or gather stages: on the in-process runner
those cost 0.2 s of a 3-s Frappe job.

A side-input dictionary travels as one element, the dict as one JSON blob (``transforms.pack``),
which each worker process decodes once (``transforms.Unpacked``). As an ``AsDict`` of its entries, the SDK's state
cache measured every object of it (``objsize``) and held the entries and the dict: a
100,000-row item table cost 260 MB of peak memory and seconds of CPU.
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from etl import features as feat
from etl.config import EntityTableConfig

FIELD_MAP_COLUMNS = ("feature", "field")


def is_parquet(path: str) -> bool:
    return path.endswith((".parquet", ".pq"))


def _files(path: str):
    match = FileSystems.match([path])[0].metadata_list
    if not match:
        raise FileNotFoundError(f"dictionary {path} not found")
    return sorted(match, key=lambda m: m.path)


def dictionary_bytes(path: str) -> int:
    """Total size of the file(s) matching ``path``."""
    return sum(m.size_in_bytes for m in _files(path))


def join_is_keyed(join: str, path: str, side_input_max_bytes: int) -> bool:
    """True when a dictionary is joined by key: ``keyed``, or ``auto`` and larger than the limit."""
    if join == "keyed":
        return True
    if join == "side_input":
        return False
    return dictionary_bytes(path) > side_input_max_bytes


def read_tsv_header(path: str) -> list[str]:
    """Column names from the first line of a TSV file (any Beam filesystem)."""
    with FileSystems.open(_files(path)[0].path) as f:
        first = f.readline().decode("utf-8").rstrip("\r\n")
    return first.split("\t")


def read_parquet_columns(path: str) -> list[str]:
    import pyarrow.parquet as pq

    with FileSystems.open(_files(path)[0].path) as f:
        return list(pq.read_schema(f).names)


def columns_of(path: str) -> list[str]:
    return read_parquet_columns(path) if is_parquet(path) else read_tsv_header(path)


def table_columns(t: EntityTableConfig) -> list[str]:
    """Columns of ``t`` that become fields (all but the key unless listed)."""
    header = columns_of(t.path)
    key_column = t.key_column or t.key_field
    if key_column not in header:
        raise ValueError(f"entity table {t.name}: key column {key_column!r} not in {header}")
    cols = list(t.columns) or [c for c in header if c != key_column]
    missing = [c for c in cols if c not in header]
    if missing:
        raise ValueError(f"entity table {t.name}: columns {missing} not in {header}")
    return cols


def check_field_map(path: str) -> None:
    header = columns_of(path)
    if is_parquet(path) and not set(FIELD_MAP_COLUMNS) <= set(header):
        raise ValueError(f"field map {path}: columns {header} must include feature, field")
    if not is_parquet(path) and header[:2] != list(FIELD_MAP_COLUMNS):
        raise ValueError(f"field map {path}: header {header} must start with feature, field")


def field_map_fields(path: str) -> list[str]:
    """Field names of a field map in order of first appearance (read on the launcher)."""
    seen: dict[str, None] = {}
    for m in _files(path):
        if is_parquet(path):
            import pyarrow.parquet as pq

            with FileSystems.open(m.path) as f:
                for name in pq.read_table(f, columns=["field"]).column("field").to_pylist():
                    seen.setdefault(str(name), None)
        else:
            with FileSystems.open(m.path) as f:
                f.readline()
                for line in f:
                    cells = line.decode("utf-8").rstrip("\r\n").split("\t")
                    if len(cells) >= 2:
                        seen.setdefault(cells[1], None)
    return list(seen)


def _tsv_rows(path: str):
    header = read_tsv_header(path)

    def to_row(line: str):
        cells = line.rstrip("\r\n").split("\t")
        if len(cells) != len(header):
            raise ValueError(f"{path}: line {line!r} has {len(cells)} cells, header has {len(header)}")
        return dict(zip(header, cells))

    return to_row


def read_rows_here(path: str, columns: list[str]):
    """Rows (dicts of ``columns``) of a TSV or Parquet dictionary, read in this process.

    The same rows as the job's ``_read_rows``: every file's header line is skipped, every other
    line must have as many cells as the header.
    """
    if is_parquet(path):
        import pyarrow.parquet as pq
        for m in _files(path):
            with FileSystems.open(m.path) as f:
                yield from pq.read_table(f, columns=columns).to_pylist()
        return
    to_row = _tsv_rows(path)
    for m in _files(path):
        with FileSystems.open(m.path) as f:
            f.readline()
            for line in f:
                yield to_row(line.decode("utf-8"))


def _read_rows(p: beam.Pipeline, path: str, columns: list[str], label: str):
    if is_parquet(path):
        return p | f"Read{label}" >> beam.io.ReadFromParquet(path, columns=columns)
    return (p | f"Read{label}" >> beam.io.ReadFromText(path, skip_header_lines=1)
            | f"Parse{label}" >> beam.Map(_tsv_rows(path)))


def _field_map_pair(r) -> tuple[str, str]:
    return str(r["feature"]), str(r["field"])


def read_field_map(p: beam.Pipeline, path: str, label: str = "FieldMap"):
    """PCollection of (feature key, field name) from a field map (TSV or Parquet)."""
    check_field_map(path)
    return _read_rows(p, path, list(FIELD_MAP_COLUMNS), label) | f"Key{label}" >> beam.Map(_field_map_pair)


def field_map_here(path: str) -> list[tuple[str, str]]:
    """``read_field_map``'s pairs, read in this process (a small map that travels inside the job)."""
    check_field_map(path)
    return [_field_map_pair(r) for r in read_rows_here(path, list(FIELD_MAP_COLUMNS))]


class _EntityRow:
    """Row dict -> (key, cells of the row) (``features.table_row``, ``columns`` order)."""

    def __init__(self, t: EntityTableConfig, columns: list[str], value_columns):
        self.key_column = t.key_column or t.key_field
        self.columns = list(columns)
        self.value_columns = frozenset(value_columns)

    def __call__(self, r):
        return str(r[self.key_column]), feat.table_row({c: r[c] for c in self.columns}, self.value_columns)


def read_entity_table(p: beam.Pipeline, t: EntityTableConfig, columns: list[str], value_columns=frozenset()):
    """PCollection of (key, cells of the row) of an entity table (``features.table_row``, ``columns`` order)."""
    row = _EntityRow(t, columns, value_columns)
    label = f"Entity_{t.name}"
    return _read_rows(p, t.path, [row.key_column, *columns], label) | f"Key{label}" >> beam.Map(row)


def entity_table_here(t: EntityTableConfig, columns: list[str], value_columns=frozenset()) -> list[tuple]:
    """``read_entity_table``'s pairs, read in this process (a small table that travels inside the job)."""
    row = _EntityRow(t, columns, value_columns)
    return [row(r) for r in read_rows_here(t.path, [row.key_column, *columns])]


def is_inline(path: str, inline_max_bytes: int) -> bool:
    """True when a side-input dictionary is small enough to be read here and shipped in the job graph."""
    return dictionary_bytes(path) <= inline_max_bytes

