"""Typed configuration of the ETL job (frozen dataclasses, YAML + flag overrides)."""
from __future__ import annotations

import dataclasses

from feature_schema import configs

FIELD_KINDS = ("categorical", "binned", "numeric")
JOIN_MODES = ("auto", "side_input", "keyed")


@dataclasses.dataclass(frozen=True)
class FieldConfig:
    """How one field is transformed.

    Attributes:
      name: field name (as in libffm lines, the field map or an entity table column).
      kind: ``categorical``, ``binned`` (equal-frequency bins of a continuous
        value, boundaries recorded in the schema) or ``numeric`` (one feature,
        key = the field name, whose value is the raw number; its training
        mean/std/min/max are recorded in the schema).
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
        if self.join not in JOIN_MODES:
            raise ValueError(f"entity table {self.name!r}: join {self.join!r} not in {JOIN_MODES}")


@dataclasses.dataclass(frozen=True)
class EtlConfig:
    """The whole ETL job.

    Attributes:
      input: glob of training log files.
      eval_input: glob of eval log files; empty means a hash split of ``input``.
      format: ``libfm`` or ``libffm``.
      field_map: feature -> field dictionary for libfm input: TSV with header
        ``feature<TAB>field``, or Parquet with columns ``feature`` and ``field``.
      field_map_join: ``auto`` (side input when the file is at most
        ``side_input_max_bytes``, else keyed), ``side_input`` or ``keyed``.
      field_ids: ``name`` (libffm field tokens are field names) or ``index``
        (they are integer indexes into ``fields``; an index >= len(fields) is
        dead-lettered as ``field_out_of_range``).
      labels: label names, in the order of the comma-separated labels of a line.
      out: output directory (local path or any Beam filesystem URL).
      fields: per-field settings; fields not listed are categorical with defaults.
      entity_tables: attribute tables joined by a key field.
      min_count: default frequency threshold for rare ids.
      eval_percent: share of lines sent to eval when ``eval_input`` is empty.
      split_key: empty: the eval split is chosen by the hash of the raw line;
        a field name (``user``): by the hash of that field's feature, so all
        lines of a user land in one split (lines without it: by line hash).
      max_features: lines with more features are dead-lettered.
      num_shards: gzip TFRecord files per split (>= 1).
      fill_missing: add the field's rare id for every field absent from a line.
      strict_fields: only fields listed in ``fields`` (or added by entity tables)
        are allowed; others are dead-lettered as ``unknown_field``.
      side_input_max_bytes: dictionaries up to this size are joined as side
        inputs; larger ones by key (CoGroupByKey), unless their ``join`` says.
      vocabulary: an earlier run's output directory (or its schema.json):
        reuse its fields and vocabulary instead of building new ones.
      vocabulary_mode: with ``vocabulary``: ``fixed`` (rows unchanged; unknown
        features -> rare; fields the base lacks are dead-lettered as
        ``unknown_field``) or ``extend`` (old rows keep their indices, new
        frequent features and new fields are appended after them).
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
    field_map_join: str = "auto"
    field_ids: str = "name"
    split_key: str = ""
    vocabulary: str = ""
    vocabulary_mode: str = "fixed"

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
        if self.field_map_join not in JOIN_MODES:
            raise ValueError(f"field_map_join {self.field_map_join!r} not in {JOIN_MODES}")
        if self.field_ids not in ("name", "index"):
            raise ValueError(f"field_ids {self.field_ids!r}: expected name or index")
        if self.field_ids == "index" and (self.format != "libffm" or not self.fields):
            raise ValueError("field_ids: index needs libffm input and the fields declared in order")
        if self.split_key and self.eval_input:
            raise ValueError("split_key splits `input`; it cannot be combined with eval_input")
        if self.vocabulary_mode not in ("fixed", "extend"):
            raise ValueError(f"vocabulary_mode {self.vocabulary_mode!r}: expected fixed or extend")
        if self.num_shards < 1:
            raise ValueError("num_shards must be >= 1")
        if self.side_input_max_bytes < 0:
            raise ValueError("side_input_max_bytes must be >= 0")

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
