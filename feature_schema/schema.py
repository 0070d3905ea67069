"""The schema artifact: one JSON file written by the ETL, read by every later stage.

Feature rows live in one global index space. Field ``f`` owns the contiguous rows
``[offset, offset + vocab_size)``; row ``offset`` is the field's *rare* id, which
stands for features seen fewer than ``min_count`` times in training, for
features never seen, and for a field missing from an example. Trainer layers
size their tables from ``num_features`` and ``num_fields``; the featurization
layer builds the in-graph lookup (stable hash -> row, unknown -> rare id) from
the vocabulary file named here. The ETL's records (version 2) hold hashes and
raw values only (``ExampleKeys``). Nothing downstream hard-codes any of it.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Any, Iterator

from feature_schema import rules
from feature_schema.rules import VALUE_TRANSFORMS

SCHEMA_FILENAME = "schema.json"
VOCAB_FILENAME = "vocabulary.tsv"
SCHEMA_VERSION = 2

FIELD_KINDS = ("categorical", "binned", "numeric")


@dataclasses.dataclass(frozen=True)
class ExampleKeys:
    """Names of the `tf.train.Example` features of the ETL's records (the *hashed-record* format).

    One record per log line. The lists are aligned, one entry per feature of the line after the
    joins, in line order. Fields absent from the line are not written: the featurization layer
    adds their missing rows. No vocabulary row is written: the layer maps hashes to rows, so the
    ETL writes each record as soon as it is parsed.

    Attributes:
      hashes: int64 list, ``feature_hash(field, key)`` of each feature; the key of a ``binned`` or
        ``numeric`` field's feature is the field name (``rules.value_key``).
      values: float list, the feature's value in the log (categorical) or the raw number (binned,
        numeric), aligned with ``hashes``.
      field_hashes: int64 list, ``field_hash(field)`` of each feature's field, aligned with ``hashes``.
      weight: optional float, the sample weight (1.0 when absent).
    Labels are float features named by ``Schema.labels``.
    """

    hashes: str = "feat_hashes"
    values: str = "feat_vals"
    field_hashes: str = "feat_field_hashes"
    weight: str = "weight"


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One field (a group of features that share a latent space in FFM).

    Attributes:
      name: field name as in the logs or dictionaries (``user``, ``item``).
      id: dense field id, 0..num_fields-1, the order of ``Schema.fields``.
      kind: ``categorical`` (ids), ``binned`` (a continuous value turned into one
        of ``len(bin_boundaries)+1`` equal-frequency bins) or ``numeric`` (one
        feature whose value is the raw number).
      offset: first global row of the field; equal to ``rare_id``.
      vocab_size: rows owned by the field, the rare row included.
      rare_id: global row of rare/unknown/missing features of this field.
      linear_only: True for fields that get a first-order weight but take part
        in no interaction (position-bias fields such as ad position).
      min_count: training-split count below which a feature maps to rare.
      bin_boundaries: strictly increasing bin edges of a ``binned`` field; bin ``i``
        holds ``edges[i-1] <= v < edges[i]`` (``rules.bin_index``).
      source: where the field comes from: ``log`` or ``dict:<table>``.
      multi_hot: True when an example may hold several features of the field.
      extra_ranges: ``(first row, rows)`` blocks the field gained when a later
        ETL run extended a fixed vocabulary (``vocabulary_mode: extend``): new
        features are appended after all existing rows so that no old row moves.
        The field owns ``[offset, offset + vocab_size)`` plus these blocks.
      value_stats: for ``binned`` and ``numeric`` fields, ``{"count", "mean",
        "std", "min", "max"}`` of the training split's values after ``transform``.
      transform: ``none`` or ``log1p``, applied to a ``numeric`` field's value
        before standardisation (``rules.scale_value``).
      sequence: the field is an ordered list of keys (e.g. the user's last clicked items, most
        recent first): multi-hot, its entries keep their order through the featurization layer.
      max_length: a sequence's longest list; the ETL and the featurization layer keep the first
        ``max_length`` keys of a longer one.
      vocabulary_of: a sequence whose keys are keys of another field (``item``): they are hashed as
        that field's features (``feature_hash(vocabulary_of, key)``), so they map to its rows; the
        field's own block is its rare row alone (keys without a row of the other field).
    """

    name: str
    id: int
    kind: str
    offset: int
    vocab_size: int
    rare_id: int
    linear_only: bool = False
    min_count: int = 1
    bin_boundaries: tuple[float, ...] | None = None
    source: str = "log"
    multi_hot: bool = False
    extra_ranges: tuple[tuple[int, int], ...] = ()
    value_stats: dict[str, float] | None = None
    transform: str = "none"
    sequence: bool = False
    max_length: int = 0
    vocabulary_of: str = ""

    @property
    def key_namespace(self) -> str:
        """The field whose name prefixes this field's keys when they are hashed (``rules.key_namespace``)."""
        return rules.key_namespace(self.name, self.vocabulary_of)

    @property
    def num_rows(self) -> int:
        """All rows of the field: its block plus any ``extra_ranges``."""
        return self.vocab_size + sum(n for _, n in self.extra_ranges)

    def __post_init__(self):
        if self.kind not in FIELD_KINDS:
            raise ValueError(f"field {self.name!r}: kind {self.kind!r} not in {FIELD_KINDS}")
        if self.rare_id != self.offset:
            raise ValueError(f"field {self.name!r}: rare_id {self.rare_id} != offset {self.offset}")
        if self.vocab_size < 1:
            raise ValueError(f"field {self.name!r}: vocab_size must be >= 1 (the rare row)")
        if self.transform not in VALUE_TRANSFORMS:
            raise ValueError(f"field {self.name!r}: transform {self.transform!r} not in {VALUE_TRANSFORMS}")
        edges = self.bin_boundaries or ()
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"field {self.name!r}: bin_boundaries {list(edges)} are not strictly increasing")
        if self.sequence and (self.kind != "categorical" or not self.multi_hot or self.max_length < 1):
            raise ValueError(f"field {self.name!r}: a sequence is categorical and multi-hot with max_length >= 1")
        if (self.max_length or self.vocabulary_of) and not self.sequence:
            raise ValueError(f"field {self.name!r}: max_length and vocabulary_of are for sequence fields")


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """A binary label (one task).

    Attributes:
      name: label name (``click``, ``conversion``); also the TF feature key.
      positive_rate: fraction of positives in the training split.
      positives: number of positives in the training split.
    """

    name: str
    positive_rate: float
    positives: int = 0


@dataclasses.dataclass(frozen=True)
class EntityTableSpec:
    """An entity table the ETL joined (item -> category, brand, price), for joins in the serving graph.

    Attributes:
      name: table name (the source ``dict:<name>`` of the fields it adds).
      path: the table file (TSV with a header row, or Parquet), relative to the schema's directory
        or absolute.
      key_field: the field whose keys look the table up (``item``).
      key_column: the table column holding those keys.
      columns: the columns that became fields, in order.
    """

    name: str
    path: str
    key_field: str
    key_column: str
    columns: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class VectorFieldSpec:
    """A field of kind ``vector``: a fixed-size float vector per key of another field (an item's image
    or text embedding), from a table the ETL validated. Records do not carry it: the featurization
    layer joins it in the graph by the key field's hash, for training and serving alike.

    Attributes:
      name: the field name, also the table's vector column.
      dim: d, floats per vector.
      key_field: the field whose keys look the table up (``item``); a sequence field whose
        ``vocabulary_of`` is this field gets the vectors of its keys too.
      path: the table: TSV with a header row and ``d`` comma-separated floats in the column, or
        Parquet with a list column; relative to the schema's directory or absolute.
      key_column: the table column holding the keys.
      rows: keys in the table (the graph holds ``(rows + 1) x dim`` floats: a zero row for unknown keys).
      source: ``dict:<table name>``.
    """

    name: str
    dim: int
    key_field: str
    path: str
    key_column: str
    rows: int
    source: str = ""

    def __post_init__(self):
        if self.dim < 1 or self.rows < 0:
            raise ValueError(f"vector field {self.name!r}: dim must be >= 1 and rows >= 0 (got {self.dim}, {self.rows})")


@dataclasses.dataclass(frozen=True)
class Schema:
    """The whole contract between ETL, trainer and exporter.

    Attributes:
      fields: all fields, ordered by id.
      labels: all labels, in the order of the input lines.
      num_features: total rows of the global vocabulary (sum of vocab sizes).
      max_features_per_example: largest number of features in one example after the
        featurization layer added the rows of missing fields (``fill_missing``).
      example_keys: names of the `tf.train.Example` features.
      hash_function: how feature hashes were computed (see ``hashing``).
      vocabulary_path: vocabulary TSV, relative to the schema's directory.
      splits: split name (``train``, ``eval``, and ``valid`` when the ETL made one) ->
        {"files": [glob relative to the schema dir], "examples": n}.
      counts: split name -> {"read", "written", "dead_lettered", "dead_letter_reasons"} line counts.
      sources: input files and dictionaries the job read.
      compression: compression of the TFRecord shards (``GZIP``).
      format: input format the ETL parsed (``libfm`` or ``libffm``).
      vocabulary_mode: ``build`` (vocabulary counted from this run's training
        split), ``fixed`` (an earlier run's vocabulary reused unchanged) or
        ``extend`` (an earlier run's rows kept, new frequent features appended).
      base_schema: the earlier run's schema for ``fixed``/``extend``.
      base_num_features: ``num_features`` of that schema: rows below it mean
        the same features as there (what a warm start can copy).
      fill_missing: a field absent from an example gets its rare row (the
        featurization layer adds it; ``feature_schema.rules``).
      entity_tables: the tables the ETL joined (``EntityTableSpec``), which the
        serving graph joins again for clients that send only the log's fields.
      field_index: libffm input with integer field tokens: field names by index
        (empty: field tokens are names). How a client parses lines as the ETL did.
      vector_fields: fields of kind ``vector`` (``VectorFieldSpec``); they own no rows and are not in
        ``fields``: the featurization layer adds them to the batch as dense vectors.
      warnings: what the ETL found suspicious (e.g. a field left with one used row).
    """

    fields: tuple[FieldSpec, ...]
    labels: tuple[LabelSpec, ...]
    num_features: int
    max_features_per_example: int
    example_keys: ExampleKeys = ExampleKeys()
    hash_function: str = ""
    vocabulary_path: str = VOCAB_FILENAME
    splits: dict[str, Any] = dataclasses.field(default_factory=dict)
    counts: dict[str, Any] = dataclasses.field(default_factory=dict)
    sources: dict[str, Any] = dataclasses.field(default_factory=dict)
    compression: str = "GZIP"
    format: str = "libffm"
    vocabulary_mode: str = "build"
    base_schema: str = ""
    base_num_features: int = 0
    fill_missing: bool = True
    entity_tables: tuple[EntityTableSpec, ...] = ()
    field_index: tuple[str, ...] = ()
    vector_fields: tuple[VectorFieldSpec, ...] = ()
    warnings: tuple[str, ...] = ()
    version: int = SCHEMA_VERSION
    # Directory the schema was loaded from; not serialized.
    base_dir: str = dataclasses.field(default="", compare=False)

    def __post_init__(self):
        for i, f in enumerate(self.fields):
            if f.id != i:
                raise ValueError(f"field {f.name!r} has id {f.id}, expected {i}")
        # The fields' row blocks (and, after vocabulary extensions, their extra
        # ranges) must tile [0, num_features) without gaps or overlaps.
        blocks = sorted([(f.offset, f.vocab_size, f.name) for f in self.fields]
                        + [(start, n, f.name) for f in self.fields for start, n in f.extra_ranges])
        end = 0
        for start, n, name in blocks:
            if start != end:
                raise ValueError(f"field {name!r}: rows from {start} leave a gap or overlap (expected {end})")
            end += n
        if end != self.num_features:
            raise ValueError(f"num_features {self.num_features} != sum of vocab sizes {end}")
        if not self.labels:
            raise ValueError("schema needs at least one label")
        kinds = {f.name: f for f in self.fields}
        for f in self.fields:
            if f.vocabulary_of:
                of = kinds.get(f.vocabulary_of)
                if of is None or of.kind != "categorical" or of.vocabulary_of:
                    raise ValueError(f"field {f.name!r}: vocabulary_of {f.vocabulary_of!r} must name a categorical "
                                     f"field that uses its own vocabulary")
        for v in self.vector_fields:
            key = kinds.get(v.key_field)
            if key is None or key.kind != "categorical" or key.sequence or v.name in kinds:
                raise ValueError(f"vector field {v.name!r}: key_field {v.key_field!r} must be a categorical field that "
                                 f"is not a sequence, and the name must not be a field's")

    @property
    def sequence_fields(self) -> tuple[FieldSpec, ...]:
        return tuple(f for f in self.fields if f.sequence)

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    @property
    def single_field_ids(self) -> tuple[int, ...]:
        """Ids of the fields with at most one feature per example (not ``multi_hot``; the ETL
        dead-letters a line that repeats such a field), in id order. With ``fill_missing`` each holds
        exactly one feature per featurized example: the featurization layer's dense layout."""
        return tuple(f.id for f in self.fields if not f.multi_hot)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"no field {name!r} in schema (fields: {[f.name for f in self.fields]})")

    @property
    def linear_only_field_ids(self) -> tuple[int, ...]:
        return tuple(f.id for f in self.fields if f.linear_only)

    @property
    def rare_ids(self) -> tuple[int, ...]:
        """Rare row of every field, indexed by field id."""
        return tuple(f.rare_id for f in self.fields)

    def split_files(self, split: str) -> list[str]:
        """Absolute file globs of a split's TFRecord shards."""
        if split not in self.splits:
            raise KeyError(f"no split {split!r} in schema (splits: {sorted(self.splits)})")
        return [_resolve(self.base_dir, p) for p in self.splits[split]["files"]]

    def vocabulary_file(self) -> str:
        return _resolve(self.base_dir, self.vocabulary_path)

    def table_file(self, table: EntityTableSpec | VectorFieldSpec) -> str:
        """Absolute path of an entity table's (or a vector field's table's) file."""
        return _resolve(self.base_dir, table.path)

    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("base_dir")
        for f in d["fields"]:
            if f["bin_boundaries"] is not None:
                f["bin_boundaries"] = list(f["bin_boundaries"])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_json_dict(cls, d: dict[str, Any], base_dir: str = "") -> "Schema":
        d = dict(d)
        version = d.get("version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"schema version {version!r} is not {SCHEMA_VERSION}: the ETL output predates the "
                             f"hashed-record format; rerun `make etl` on the logs")
        fields = []
        for f in d.pop("fields"):
            f = dict(f)
            if f.get("bin_boundaries") is not None:
                f["bin_boundaries"] = tuple(float(b) for b in f["bin_boundaries"])
            if "extra_ranges" in f:
                f["extra_ranges"] = tuple((int(a), int(n)) for a, n in f["extra_ranges"])
            fields.append(FieldSpec(**f))
        labels = tuple(LabelSpec(**label) for label in d.pop("labels"))
        keys = ExampleKeys(**d.pop("example_keys", {}))
        for key in ("warnings", "field_index"):
            if key in d:
                d[key] = tuple(d[key])
        d["entity_tables"] = tuple(EntityTableSpec(**{**t, "columns": tuple(t["columns"])})
                                   for t in d.get("entity_tables", ()))
        d["vector_fields"] = tuple(VectorFieldSpec(**v) for v in d.get("vector_fields", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown schema keys: {sorted(unknown)}")
        return cls(fields=tuple(fields), labels=labels, example_keys=keys, base_dir=base_dir, **d)


def _resolve(base_dir: str, path: str) -> str:
    if "://" in path or os.path.isabs(path) or not base_dir:
        return path
    return os.path.join(base_dir, path)


def load_schema(path: str) -> Schema:
    """Reads a schema from ``path`` (the JSON file, or the ETL output directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, SCHEMA_FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no schema at {path}: run `make etl` first (or pass DATA=<etl output dir>)")
    with open(path, encoding="utf-8") as f:
        return Schema.from_json_dict(json.load(f), base_dir=os.path.dirname(os.path.abspath(path)))


@dataclasses.dataclass(frozen=True, slots=True)
class VocabEntry:
    """One vocabulary row: a feature that kept its own id (slots: vocabularies have millions of rows)."""

    field: str
    key: str
    hash: int
    index: int
    count: int


VOCAB_HEADER = ("field", "key", "hash", "index", "count")


def write_vocabulary_lines(entries) -> Iterator[str]:
    """Yields the TSV lines (header first) of a vocabulary."""
    yield "\t".join(VOCAB_HEADER)
    for e in entries:
        yield f"{e.field}\t{_escape(e.key)}\t{e.hash}\t{e.index}\t{e.count}"


def parse_vocabulary_line(line: str) -> VocabEntry:
    """One data line of a vocabulary TSV (what ``write_vocabulary_lines`` wrote)."""
    row = line.rstrip("\r\n").split("\t")
    if len(row) != len(VOCAB_HEADER):
        raise ValueError(f"vocabulary line {line!r}: expected {len(VOCAB_HEADER)} columns, got {len(row)}")
    return VocabEntry(row[0], _unescape(row[1]), int(row[2]), int(row[3]), int(row[4]))


def read_vocabulary(path: str) -> list[VocabEntry]:
    """Reads a vocabulary TSV written by the ETL."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if tuple(header) != VOCAB_HEADER:
            raise ValueError(f"{path}: vocabulary header {header} != {list(VOCAB_HEADER)}")
        out = []
        for lineno, row in enumerate(reader, start=2):
            if len(row) != len(VOCAB_HEADER):
                raise ValueError(f"{path}:{lineno}: expected {len(VOCAB_HEADER)} columns, got {len(row)}")
            out.append(VocabEntry(row[0], _unescape(row[1]), int(row[2]), int(row[3]), int(row[4])))
        return out


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            nxt = s[i + 1]
            out.append({"t": "\t", "n": "\n", "\\": "\\"}.get(nxt, nxt))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)
