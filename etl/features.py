"""Pure feature transforms used by the Beam job and by the plain-Python baseline.

No Beam import here: each function maps plain values to plain values, so it is
unit-tested directly and reused unchanged inside DoFns (``etl/transforms.py``)
and by ``bench/bench_etl.py``'s single-process conversion.

A record moving through the job is ``(raw, labels, features)``: the raw line
(kept for the dead-letter output), the labels and ``(field, key, value)``
feature tuples. Binned and numeric fields carry their field name as key and the
number as value until ``to_sparse_example`` turns a binned value into its bin.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Iterable, Mapping

from etl import parsing
from etl.tfrecord import ExampleEncoder
from etl.parsing import ParseError
from feature_schema import FieldSpec, VocabEntry, feature_hash, field_hash, string_hash

# Key of the placeholder feature added for a field missing from a line. It is
# never in the vocabulary, so it maps to the field's rare id here and in serving.
MISSING_KEY = "__missing__"
VALUE_KINDS = ("binned", "numeric")
TRAIN, EVAL = 0, 1


def bin_key(index: int) -> str:
    """Feature key of equal-frequency bin ``index`` of a binned field."""
    return f"bin{index}"


def bin_index(value: float, boundaries) -> int:
    """Bin of ``value``: number of boundaries <= value (0..len(boundaries))."""
    return bisect.bisect_right(boundaries, value)


def apply_bins(features: Iterable[tuple], boundaries: Mapping[str, tuple[float, ...]]) -> tuple[tuple, ...]:
    """Replaces each binned field's value by its bin feature (value 1)."""
    out = []
    for f in features:
        b = boundaries.get(f[0])
        out.append(f if b is None else (f[0], bin_key(bisect.bisect_right(b, f[2])), 1.0))
    return tuple(out)


def boundaries_from_quantiles(quantiles, num_bins: int) -> tuple[float, ...]:
    """Interior, strictly increasing bin edges from ``num_bins+1`` quantiles (min..max)."""
    interior = list(quantiles)[1:-1] if len(quantiles) > 2 else []
    edges = []
    for q in interior:
        q = float(q)
        if not edges or q > edges[-1]:
            edges.append(q)
    return tuple(edges)


def resample_quantiles(qs, num_bins: int) -> list:
    """``num_bins+1`` quantiles picked from a finer, evenly spaced quantile grid ``qs``."""
    if len(qs) == num_bins + 1:
        return list(qs)
    return [qs[round(i * (len(qs) - 1) / num_bins)] for i in range(num_bins + 1)]


def value_stats(count: float, total: float, total_sq: float, lo: float, hi: float) -> dict[str, float]:
    """count/mean/std/min/max from weighted sums (std is the population std)."""
    mean = total / count if count else 0.0
    var = max(total_sq / count - mean * mean, 0.0) if count else 0.0
    return {"count": float(count), "mean": mean, "std": math.sqrt(var), "min": lo, "max": hi}


# ---------------------------------------------------------------- dictionaries

def row_features(row: Mapping[str, str], value_columns=frozenset()) -> tuple[tuple, ...] | str:
    """Features of one entity-table row, or an error detail if a number is malformed.

    Categorical columns give ``(column, cell, 1.0)``; binned/numeric columns give
    ``(column, column, number)``. Empty cells are skipped (the field is missing).
    The job converts every row once, when it reads the table, not per line.
    """
    out = []
    for col, val in row.items():
        if val is None or val == "":
            continue
        if col in value_columns:
            try:
                v = float(val)
            except ValueError:
                return f"column {col!r}: {val!r} is not a number"
            if not math.isfinite(v):
                return f"column {col!r}: {val!r} is not finite"
            out.append((col, col, v))
        else:
            out.append((col, str(val), 1.0))
    return tuple(out)


def join_entity(features, key_field: str, table) -> tuple[tuple, ...]:
    """Adds the attributes of every entity named by ``key_field`` as features.

    Args:
      features: the line's features, fields assigned.
      key_field: field whose key looks up the table (``item``).
      table: any ``.get(key)`` mapping from entity key to ``row_features``.

    Raises:
      ParseError: ``bad_dictionary_value`` when the matched row has a malformed number.
    """
    extra = []
    for f in features:
        if f[0] != key_field:
            continue
        row = table.get(f[1])
        if row is None:
            continue
        if type(row) is str:
            raise ParseError(parsing.BAD_DICTIONARY_VALUE, f"{key_field} {f[1]!r}: {row}")
        extra.extend(row)
    return tuple(features) + tuple(extra)


# ------------------------------------------------------------ line processing

@dataclasses.dataclass(frozen=True)
class LineSpec:
    """What ``LineProcessor`` needs of the config (plain values, cheap to pickle).

    Attributes:
      fmt: ``libfm`` or ``libffm``.
      num_labels: labels per line.
      max_features: limit on features per line, before and after joins.
      field_index: libffm fields are integer indexes into this tuple (or names if None).
      known_fields: the only fields allowed (None: any).
      multi_hot: fields that may repeat in a line.
      value_fields: binned and numeric fields (key becomes the field name).
      table_keys: key field of each entity table, in config order.
      split: ``path`` (split given by the input), ``line`` (hash of the raw line)
        or ``key`` (hash of the ``split_key`` field's feature).
      split_key: field for ``split == "key"``.
      eval_percent: share of lines hashed to eval.
    """

    fmt: str = "libffm"
    num_labels: int = 1
    max_features: int = 1000
    field_index: tuple[str, ...] | None = None
    known_fields: frozenset[str] | None = None
    multi_hot: frozenset[str] = frozenset()
    value_fields: frozenset[str] = frozenset()
    table_keys: tuple[str, ...] = ()
    split: str = "line"
    split_key: str = ""
    eval_percent: int = 20


def line_split(raw: bytes | str, eval_percent: int) -> int:
    """0 (train) or 1 (eval) from the hash of the raw line."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    return EVAL if string_hash(raw.decode("latin-1")) % 100 < eval_percent else TRAIN


class LineProcessor:
    """Parses, joins and checks lines, and decides their split (all pure)."""

    def __init__(self, spec: LineSpec):
        self.spec = spec

    def parse(self, raw) -> tuple[tuple[float, ...], list[tuple]]:
        s = self.spec
        return parsing.parse_record(raw, s.fmt, s.num_labels, s.max_features, s.field_index)

    @staticmethod
    def assign(features, field_map) -> tuple[tuple, ...]:
        return parsing.assign_fields(features, field_map)

    def join(self, features, table_index: int, table) -> tuple[tuple, ...]:
        return join_entity(features, self.spec.table_keys[table_index], table)

    def finish(self, features) -> tuple[tuple, ...]:
        """Field checks after all joins; value fields get their field name as key."""
        s = self.spec
        if len(features) > s.max_features:
            raise ParseError(parsing.TOO_MANY_FEATURES,
                             f"{len(features)} features after joins > max_features={s.max_features}")
        parsing.check_fields(features, s.known_fields, s.multi_hot)
        vf = s.value_fields
        if vf:
            features = tuple((f[0], f[0], f[2]) if f[0] in vf else f for f in features)
        return tuple(features)

    def split_of(self, raw, features=None) -> int:
        """The split of a line; without features (a bad line) the raw line decides."""
        s = self.spec
        if s.split == "key" and features:
            for f in features:
                if f[0] == s.split_key:
                    return EVAL if feature_hash(f[0], f[1]) % 100 < s.eval_percent else TRAIN
        return line_split(raw, s.eval_percent)


# ------------------------------------------------------------------ vocabulary

def _spec(name, fid, s, offset, size):
    return FieldSpec(name=name, id=fid, kind=s["kind"], offset=offset, vocab_size=size, rare_id=offset,
                     linear_only=s["linear_only"], min_count=s["min_count"], bin_boundaries=s.get("bin_boundaries"),
                     source=s["source"], multi_hot=s["multi_hot"], value_stats=s.get("value_stats"))


def _kept_by_field(counts, field_settings, names) -> dict[str, list[tuple[str, int]]]:
    by_field: dict[str, list[tuple[str, int]]] = {name: [] for name in names}
    for (field, key), count in counts:
        if field not in by_field:
            raise ValueError(f"count for unknown field {field!r}")
        if key != MISSING_KEY and count >= field_settings[field]["min_count"]:
            by_field[field].append((key, count))
    for kept in by_field.values():
        kept.sort(key=lambda kc: (-kc[1], kc[0]))
    return by_field


def assign_vocabulary(counts: Iterable[tuple[tuple[str, str], int]], field_names: list[str],
                      field_settings: Mapping[str, dict]) -> tuple[list[FieldSpec], list[VocabEntry]]:
    """Builds the field layout and the vocabulary from training counts.

    Features with ``count >= min_count`` of their field keep a row; within a
    field rows are ordered by descending count, then key, so the layout is
    deterministic. Row ``offset`` of each field is its rare id.

    Args:
      counts: ((field, key), training count) pairs.
      field_names: all fields in schema order.
      field_settings: field -> dict(kind, min_count, linear_only, source,
        multi_hot, and optionally bin_boundaries, value_stats).

    Returns:
      (field specs in ``field_names`` order, vocabulary entries by index).
    """
    kept_by_field = _kept_by_field(counts, field_settings, field_names)
    specs, vocab = [], []
    offset = 0
    for fid, name in enumerate(field_names):
        kept = kept_by_field[name]
        for rank, (key, count) in enumerate(kept):
            vocab.append(VocabEntry(name, key, feature_hash(name, key), offset + 1 + rank, count))
        specs.append(_spec(name, fid, field_settings[name], offset, 1 + len(kept)))
        offset += 1 + len(kept)
    return specs, vocab


def extend_vocabulary(base_specs, base_vocab, counts, field_names: list[str],
                      field_settings: Mapping[str, dict]) -> tuple[list[FieldSpec], list[VocabEntry]]:
    """An earlier run's vocabulary with this run's new frequent features appended.

    Every old row keeps its index and meaning; its count becomes old + new
    count. Features of old fields not yet in the vocabulary with ``count >=
    min_count`` get rows after all existing rows (an ``extra_ranges`` block per
    field, fields in id order); fields the base did not have follow as new
    blocks (rare row first) with the next field ids. The ordering within each
    block is the one of ``assign_vocabulary``.

    Args:
      base_specs: the earlier schema's fields, by id.
      base_vocab: the earlier vocabulary entries.
      counts: ((field, key), training count) of this run.
      field_names: this run's fields; base fields first, in base order.
      field_settings: as in ``assign_vocabulary``, for every name.
    """
    base_names = [s.name for s in base_specs]
    if field_names[:len(base_names)] != base_names:
        raise ValueError(f"fields {field_names} do not start with the base fields {base_names}")
    counts = list(counts)
    new_count = {fk: c for fk, c in counts}
    known = {(e.field, e.key) for e in base_vocab}
    vocab = [dataclasses.replace(e, count=e.count + new_count.get((e.field, e.key), 0)) for e in base_vocab]
    kept_by_field = _kept_by_field([(fk, c) for fk, c in counts if fk not in known], field_settings, field_names)
    next_row = sum(s.num_rows for s in base_specs)
    specs = []
    for s in base_specs:
        kept = kept_by_field[s.name]
        extra = s.extra_ranges
        if kept:
            for rank, (key, count) in enumerate(kept):
                vocab.append(VocabEntry(s.name, key, feature_hash(s.name, key), next_row + rank, count))
            extra = extra + ((next_row, len(kept)),)
            next_row += len(kept)
        specs.append(dataclasses.replace(s, extra_ranges=extra,
                                         value_stats=field_settings[s.name].get("value_stats", s.value_stats)))
    for name in field_names[len(base_names):]:
        kept = kept_by_field[name]
        for rank, (key, count) in enumerate(kept):
            vocab.append(VocabEntry(name, key, feature_hash(name, key), next_row + 1 + rank, count))
        specs.append(_spec(name, len(specs), field_settings[name], next_row, 1 + len(kept)))
        next_row += 1 + len(kept)
    return specs, vocab


def lookup_layout(specs: list[FieldSpec], vocab: list[VocabEntry]) -> dict:
    """The compact lookup structure ``to_sparse_example`` reads (a Beam side input).

    Keys: ``fields`` {name: (field id, {key: (row, hash)}, bin edges or None,
    rare row)}, ``num_fields`` and ``missing`` [(id, rare row, hash of the
    missing placeholder)] by field id.
    """
    rows: dict[str, dict[str, tuple[int, int]]] = {s.name: {} for s in specs}
    for e in vocab:
        rows[e.field][e.key] = (e.index, e.hash)
    fields = {}
    for s in specs:
        edges = tuple(s.bin_boundaries or ()) if s.kind == "binned" else None
        fields[s.name] = (s.id, rows[s.name], edges, s.rare_id)
    return {"fields": fields, "num_fields": len(specs),
            "missing": [(s.id, s.rare_id, feature_hash(s.name, MISSING_KEY)) for s in specs]}


# ------------------------------------------------------------------ examples

@dataclasses.dataclass(frozen=True)
class SparseExample:
    """Aligned lists of one example, ready to serialize."""

    labels: tuple[float, ...]
    ids: tuple[int, ...]
    values: tuple[float, ...]
    fields: tuple[int, ...]
    hashes: tuple[int, ...]


def sparse_lists(features, layout: Mapping, fill_missing: bool = True):
    """(ids, values, field ids, hashes) lists of one example; see ``to_sparse_example``."""
    fields = layout["fields"]
    ids, vals, fids, hashes = [], [], [], []
    present = set()
    for field, key, value in features:
        info = fields.get(field)
        if info is None:
            raise ParseError(parsing.UNKNOWN_FIELD, f"field {field!r} is not in the schema")
        fid, rows, edges, rare = info
        if edges is not None:
            key, value = bin_key(bisect.bisect_right(edges, value)), 1.0
        hit = rows.get(key)
        if hit is None:
            ids.append(rare)
            hashes.append(feature_hash(field, key))
        else:
            ids.append(hit[0])
            hashes.append(hit[1])
        vals.append(value)
        fids.append(fid)
        present.add(fid)
    if fill_missing and len(present) < layout["num_fields"]:
        for fid, rare, h in layout["missing"]:
            if fid not in present:
                ids.append(rare)
                vals.append(1.0)
                fids.append(fid)
                hashes.append(h)
    return ids, vals, fids, hashes


def to_sparse_example(labels, features, layout: Mapping, fill_missing: bool = True) -> SparseExample:
    """Maps features to vocabulary rows (unknown -> the field's rare id).

    Binned values become their bin feature (value 1). Each feature carries its
    stable hash, what a serving client sends.

    Args:
      labels: the line's labels.
      features: ``(field, key, value)`` tuples, fields assigned.
      layout: ``lookup_layout`` of the vocabulary.
      fill_missing: add the rare row for every field absent from the line.

    Raises:
      ParseError: ``unknown_field`` for a field not in the schema.
    """
    ids, vals, fids, hashes = sparse_lists(features, layout, fill_missing)
    return SparseExample(tuple(labels), tuple(ids), tuple(vals), tuple(fids), tuple(hashes))


def record_lists(features, known_fields) -> tuple[list[int], list[float], list[int]]:
    """(feature hashes, values, field hashes) of one line's record (``feature_schema.ExampleKeys``).

    Raises:
      ParseError: ``unknown_field`` for a field not in ``known_fields``.
    """
    hashes, vals, fhs = [], [], []
    for field, key, value in features:
        if field not in known_fields:
            raise ParseError(parsing.UNKNOWN_FIELD, f"field {field!r} is not in the schema")
        hashes.append(feature_hash(field, key))
        vals.append(value)
        fhs.append(field_hash(field))
    return hashes, vals, fhs


def serialize_example(labels, features, label_names, keys) -> bytes:
    """Serializes one line's hashed record as `tf.train.Example` bytes (without importing TensorFlow)."""
    h, v, f = record_lists(features, {feat[0] for feat in features})
    return ExampleEncoder(label_names, keys).encode(h, v, f, labels)
