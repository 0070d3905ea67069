"""Typed configuration of the ETL job (frozen dataclasses, YAML + flag overrides)."""
from __future__ import annotations

import dataclasses

from feature_schema import configs

FIELD_KINDS = ("categorical", "binned", "numeric")


@dataclasses.dataclass(frozen=True)
class FieldConfig:
    """How one field is transformed.

    Attributes:
      name: field name (as in libffm lines, the field map or an entity table column).
      kind: ``categorical``, ``binned`` (equal-frequency bins of a continuous
        value) or ``numeric`` (one feature carrying the raw value).
      min_count: features of this field seen fewer times in training map to
        the field's rare id; None uses ``EtlConfig.min_count``.
      linear_only: the field gets first-order weights but no interactions.
      num_bins: number of equal-frequency bins for ``binned`` fields.
      multi_hot: several features of this field may occur in one line.
    """

    name: str
    kind: str = "categorical"
    min_count: int | None = None
    linear_only: bool = False
    num_bins: int = 10
    multi_hot: bool = False

    def __post_init__(self):
        if self.kind not in FIELD_KINDS:
            raise ValueError(f"field {self.name!r}: kind {self.kind!r} not in {FIELD_KINDS}")
        if self.num_bins < 2:
            raise ValueError(f"field {self.name!r}: num_bins must be >= 2")


@dataclasses.dataclass(frozen=True)
class EntityTableConfig:
    """An attribute table keyed by a feature (item -> category, brand, price).

    Attributes:
      name: table name, recorded as the source of the fields it adds.
      path: TSV (with a header row) or Parquet file.
      key_field: the log field whose feature key joins the table (``item``).
      key_column: the table column holding that key (default ``key_field``).
      columns: table columns that become fields of the example; their kind
        (categorical/binned/numeric) comes from ``EtlConfig.fields``.
      join: ``auto`` (side input when the file is under
        ``EtlConfig.side_input_max_bytes``, else keyed), ``side_input`` or ``keyed``.
    """

    name: str
    path: str
    key_field: str
    key_column: str = ""
    columns: tuple[str, ...] = ()
    join: str = "auto"

    def __post_init__(self):
        if self.join not in ("auto", "side_input", "keyed"):
            raise ValueError(f"entity table {self.name!r}: join {self.join!r} not in auto/side_input/keyed")


@dataclasses.dataclass(frozen=True)
class EtlConfig:
    """The whole ETL job.

    Attributes:
      input: glob of training log files.
      eval_input: glob of eval log files; empty means a hash split of ``input``.
      format: ``libfm`` or ``libffm``.
      field_map: feature -> field TSV (header ``feature<TAB>field``) for libfm input.
      labels: label names, in the order of the comma-separated labels of a line.
      out: output directory (local path or any Beam filesystem URL).
      fields: per-field settings; fields not listed are categorical with defaults.
      entity_tables: attribute tables joined by a key field.
      min_count: default frequency threshold for rare ids.
      eval_percent: share of lines (by hash of the line) sent to eval when
        ``eval_input`` is empty.
      max_features: lines with more features are dead-lettered.
      num_shards: TFRecord shards per split (0 lets the runner choose).
      fill_missing: add the field's rare id for every field absent from a line.
      strict_fields: only fields listed in ``fields`` (or added by entity tables)
        are allowed; others are dead-lettered as ``unknown_field``.
      side_input_max_bytes: dictionaries up to this size are joined as side inputs.
    """

    input: str = ""
    eval_input: str = ""
    format: str = "libffm"
    field_map: str = ""
    labels: tuple[str, ...] = ("label",)
    out: str = "data/etl"
    fields: tuple[FieldConfig, ...] = ()
    entity_tables: tuple[EntityTableConfig, ...] = ()
    min_count: int = 2
    eval_percent: int = 20
    max_features: int = 1000
    num_shards: int = 4
    fill_missing: bool = True
    strict_fields: bool = False
    side_input_max_bytes: int = 64 << 20

    def __post_init__(self):
        if self.format not in ("libfm", "libffm"):
            raise ValueError(f"format {self.format!r}: expected libfm or libffm")
        if self.format == "libfm" and not self.field_map:
            raise ValueError("libfm input carries no fields: set field_map (FIELD_MAP=<tsv>)")
        if not self.labels:
            raise ValueError("labels must name at least one label")
        if not 0 <= self.eval_percent < 100:
            raise ValueError("eval_percent must be in [0, 100)")
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"fields declared twice: {names}")

    def field_config(self, name: str) -> FieldConfig:
        for f in self.fields:
            if f.name == name:
                return f
        return FieldConfig(name=name)

    def min_count_of(self, name: str) -> int:
        mc = self.field_config(name).min_count
        return self.min_count if mc is None else mc


def load_config(path: str = "", overrides: dict | None = None) -> EtlConfig:
    """Reads a YAML config (optional) and applies overrides (flags, ``--set``)."""
    data = configs.load_yaml(path) if path else {}
    data = configs.deep_merge(data, overrides or {})
    return configs.from_dict(EtlConfig, data)
