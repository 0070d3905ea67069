"""Typed configuration of the ETL job (frozen dataclasses, YAML + flag overrides)."""
from __future__ import annotations

import dataclasses

from feature_schema import configs
from feature_schema.rules import VALUE_TRANSFORMS

FIELD_KINDS = ("categorical", "binned", "numeric", "vector")
JOIN_MODES = ("auto", "side_input", "keyed")
# Split ids are positions in this tuple.
SPLIT_NAMES = ("train", "eval", "valid")
INPUT_DIR = "{input_dir}"
FIELDS_TSV_COLUMNS = ("field", "name", "kind", "num_bins", "min_count", "linear_only", "multi_hot", "transform",
                      "sequence", "max_length", "vocabulary_of", "dim")


@dataclasses.dataclass(frozen=True)
class FieldConfig:
    """How one field is transformed.

    Attributes:
      name: field name (as in libffm lines, the field map or an entity table column).
      kind: ``categorical``, ``binned`` (equal-frequency bins of a continuous
        value, boundaries recorded in the schema), ``numeric`` (one feature,
        key = the field name, whose value is the raw number; its training
        mean/std/min/max are recorded in the schema) or ``vector`` (a column of an
        entity table holding ``dim`` floats per key, e.g. an item's image embedding:
        validated and recorded in the schema, never written into records; the
        featurization layer joins it in the graph).
      min_count: features of this field seen fewer times in training map to
        the field's rare id; None uses ``EtlConfig.min_count``.
      linear_only: the field gets first-order weights but no interactions.
      num_bins: number of bins of a ``binned`` field: a value with at least ``1/num_bins`` of
        the field's training rows gets a bin of its own, the other values share the remaining
        bins by roughly equal frequency (``features.bin_edges``).
      multi_hot: several features of this field may occur in one line.
      transform: ``none`` or ``log1p`` (``sign(v) * log(1 + |v|)``, for heavy tails): what the
        featurization layer applies to a ``numeric`` field's value before standardising it with
        the schema's ``value_stats``, which are statistics of the transformed values.
      sequence: the field is an ordered list of keys (``hist:i12:1 hist:i55:1 ...``: the user's
        last clicked items, most recent first); multi-hot, order kept.
      max_length: a sequence's longest list: the ETL keeps the first ``max_length`` keys of a
        line and counts the truncated lines (``<split>.truncated.<field>`` in the report).
      vocabulary_of: a sequence whose keys are another field's keys (``item``): hashed as that
        field's features, so they share its rows; not counted into its vocabulary.
      dim: floats per vector of a ``vector`` field.
    """

    name: str
    kind: str = "categorical"
    min_count: int | None = None
    linear_only: bool = False
    num_bins: int = 10
    multi_hot: bool = False
    transform: str = "none"
    sequence: bool = False
    max_length: int = 0
    vocabulary_of: str = ""
    dim: int = 0

    def __post_init__(self):
        if self.kind not in FIELD_KINDS:
            raise ValueError(f"field {self.name!r}: kind {self.kind!r} not in {FIELD_KINDS}")
        if self.num_bins < 2:
            raise ValueError(f"field {self.name!r}: num_bins must be >= 2")
        if self.transform not in VALUE_TRANSFORMS:
            raise ValueError(f"field {self.name!r}: transform {self.transform!r} not in {VALUE_TRANSFORMS}")
        if self.transform != "none" and self.kind != "numeric":
            raise ValueError(f"field {self.name!r}: transform {self.transform!r} needs kind numeric, not {self.kind!r}")
        if self.sequence and (self.kind != "categorical" or self.max_length < 1):
            raise ValueError(f"field {self.name!r}: a sequence is categorical with max_length >= 1 "
                             f"(got kind {self.kind!r}, max_length {self.max_length})")
        if (self.max_length or self.vocabulary_of) and not self.sequence:
            raise ValueError(f"field {self.name!r}: max_length and vocabulary_of need sequence: true")
        if self.vocabulary_of == self.name:
            raise ValueError(f"field {self.name!r}: vocabulary_of names the field itself")
        if (self.kind == "vector") != (self.dim >= 1) or self.dim < 0:
            raise ValueError(f"field {self.name!r}: kind vector needs dim >= 1, and only it takes dim "
                             f"(got kind {self.kind!r}, dim {self.dim})")
        if self.kind == "vector" and (self.linear_only or self.multi_hot or self.min_count is not None):
            raise ValueError(f"field {self.name!r}: a vector field takes no linear_only, multi_hot or min_count")

    @property
    def is_multi_hot(self) -> bool:
        """Several features per line: ``multi_hot``, or a sequence."""
        return self.multi_hot or self.sequence


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
      valid_input: glob of validation log files (the ``valid`` split, for model selection).
      valid_fraction: share of the training input carved into ``valid`` by the same hash that
        splits off eval (the line's, or the ``split_key`` feature's), so the carve is stable
        across runs and disjoint from train; 0: none. Not with ``valid_input``.
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
      fill_missing: the featurization layer adds the field's rare row for every field absent
        from a record (recorded in the schema; records never hold placeholders).
      strict_fields: only fields listed in ``fields`` (or added by entity tables)
        are allowed; others are dead-lettered as ``unknown_field``.
      (Dictionary paths, ``field_map`` and entity tables' ``path``, may start with
      ``{input_dir}``: the directory of ``input``, see ``resolve_paths``.)
      side_input_max_bytes: dictionaries up to this size are joined as side
        inputs; larger ones by key (CoGroupByKey), unless their ``join`` says.
      inline_max_bytes: side-input dictionaries up to this size are read by the
        launcher and travel inside the job graph (no read stages); larger ones
        are read by the job. 0: every side input is read by the job.
      vocabulary: an earlier run's output directory (or its schema.json):
        reuse its fields and vocabulary instead of building new ones.
      vocabulary_mode: with ``vocabulary``: ``fixed`` (rows unchanged; unknown
        features -> rare; fields the base lacks are dead-lettered as
        ``unknown_field``) or ``extend`` (old rows keep their indices, new
        frequent features and new fields are appended after them).
    """

    input: str = ""
    eval_input: str = ""
    valid_input: str = ""
    valid_fraction: float = 0.0
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
    inline_max_bytes: int = 1 << 20
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
        if self.inline_max_bytes < 0:
            raise ValueError("inline_max_bytes must be >= 0")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction {self.valid_fraction} must be in [0, 1)")
        if self.valid_fraction and self.valid_input:
            raise ValueError("valid_input and valid_fraction both make the valid split: set one")

    @property
    def split_names(self) -> tuple[str, ...]:
        """The splits this job writes: train, eval, and valid when asked for."""
        return SPLIT_NAMES if self.valid_input or self.valid_fraction else SPLIT_NAMES[:2]

    def field_config(self, name: str) -> FieldConfig:
        for f in self.fields:
            if f.name == name:
                return f
        return FieldConfig(name=name)

    def min_count_of(self, name: str) -> int:
        mc = self.field_config(name).min_count
        return self.min_count if mc is None else mc


def load_config(path: str = "", overrides: dict | None = None) -> EtlConfig:
    """Reads a YAML config (optional), applies overrides (flags, ``--set``) and ``resolve_paths``."""
    data = configs.load_yaml(path) if path else {}
    data = configs.deep_merge(data, overrides or {})
    return resolve_paths(configs.from_dict(EtlConfig, data))


def input_dir(pattern: str) -> str:
    """The directory of an input glob (``data/raw/train.libffm`` -> ``data/raw``)."""
    head = pattern.rsplit("/", 1)[0] if "/" in pattern else "."
    if any(c in head for c in "*?["):
        raise ValueError(f"{INPUT_DIR}: the directory of input {pattern!r} is itself a pattern")
    return head


def resolve_paths(cfg: EtlConfig) -> EtlConfig:
    """Replaces a leading ``{input_dir}`` of dictionary paths by the directory of ``cfg.input``.

    So one config serves any directory of generated data: ``configs/etl_generated.yaml`` names
    ``{input_dir}/items.tsv``, and ``make etl RAW=x`` reads ``x/items.tsv``.
    """
    def resolve(path):
        if not path.startswith(INPUT_DIR):
            return path
        if not cfg.input:
            raise ValueError(f"{path!r} names {INPUT_DIR} but no input is set")
        return input_dir(cfg.input) + path[len(INPUT_DIR):]

    tables = tuple(dataclasses.replace(t, path=resolve(t.path)) for t in cfg.entity_tables)
    return dataclasses.replace(cfg, field_map=resolve(cfg.field_map), entity_tables=tables)


def _cell(value: str, column: str, where: str):
    if column in ("num_bins", "min_count", "max_length", "dim"):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{where}: {column} {value!r} is not an integer") from None
    if column in ("linear_only", "multi_hot", "sequence"):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{where}: {column} {value!r} is not true/false")
        return value.lower() in ("true", "1", "yes")
    return value


def fields_from_tsv(text: str, source: str = "FIELDS") -> dict:
    """Config overrides (``fields``, and ``field_ids: index``) from a fields TSV.

    One row per field: ``field<TAB>name<TAB>kind``, then optional columns. A header row
    (first cell ``field``) names the columns, any of ``FIELDS_TSV_COLUMNS`` in any order;
    without it the columns are ``field, name, kind``. ``field`` is a libffm integer field id
    (then every row needs one, the ids are ``0..n-1``, and the job reads ``field:key:value``
    tokens with ``field_ids: index``) or a field name (then ``name`` is empty or the same).
    ``name`` defaults to ``field``, ``kind`` to ``categorical``; empty cells take defaults.

    Raises:
      ValueError: naming the row and the problem.
    """
    rows = [line.rstrip("\r\n").split("\t") for line in text.splitlines()]
    rows = [(i, r) for i, r in enumerate(rows, start=1) if any(c.strip() for c in r) and not r[0].startswith("#")]
    columns = ("field", "name", "kind")
    if rows and rows[0][1][0].strip() == "field":
        columns = tuple(c.strip() for c in rows[0][1])
        unknown = sorted(set(columns) - set(FIELDS_TSV_COLUMNS))
        if unknown or len(set(columns)) != len(columns):
            raise ValueError(f"{source}: header {list(columns)}: unknown or repeated columns {unknown} "
                             f"(known: {list(FIELDS_TSV_COLUMNS)})")
        rows = rows[1:]
    if not rows:
        raise ValueError(f"{source}: no field rows")
    entries = []
    for lineno, row in rows:
        where = f"{source} line {lineno}"
        if len(row) > len(columns):
            raise ValueError(f"{where}: {len(row)} cells, the columns are {list(columns)}")
        cells = {c: v.strip() for c, v in zip(columns, row) if v.strip()}
        if "field" not in cells:
            raise ValueError(f"{where}: no field")
        entries.append((where, cells))
    by_index = all(cells["field"].isascii() and cells["field"].isdigit() for _, cells in entries)
    fields = []
    for where, cells in entries:
        field = cells.pop("field")
        name = cells.setdefault("name", field)
        if not by_index and name != field:
            raise ValueError(f"{where}: field {field!r} is a name, so name {name!r} must be empty or the same")
        kwargs = {c: _cell(v, c, where) for c, v in cells.items()}
        try:
            fields.append((int(field) if by_index else len(fields), FieldConfig(**kwargs)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
    if by_index:
        ids = sorted(i for i, _ in fields)
        if ids != list(range(len(fields))):
            raise ValueError(f"{source}: integer field ids must be 0..{len(fields) - 1} once each, got {ids}")
        fields.sort(key=lambda t: t[0])
    names = [f.name for _, f in fields]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: field names repeated: {names}")
    out = {"fields": [configs.to_dict(f) for _, f in fields]}
    if by_index:
        out["field_ids"] = "index"
    return out
