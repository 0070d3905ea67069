"""Pure feature transforms used by the Beam job and by the plain-Python baseline.

No Beam import here: each function maps plain values to plain values, so it is
unit-tested directly and reused unchanged inside DoFns.
"""
from __future__ import annotations

import bisect
import dataclasses
from typing import Iterable, Mapping

from etl import parsing
from etl.parsing import Feature, ParseError
from feature_schema import FieldSpec, VocabEntry, feature_hash

# Key of the placeholder feature added for a field missing from a line. It is
# never in the vocabulary, so it maps to the field's rare id here and in serving.
MISSING_KEY = "__missing__"


def bin_key(index: int) -> str:
    """Feature key of equal-frequency bin ``index`` of a binned field."""
    return f"bin{index}"


def bin_index(value: float, boundaries) -> int:
    """Bin of ``value``: number of boundaries <= value (0..len(boundaries))."""
    return bisect.bisect_right(boundaries, value)


def apply_bins(features: Iterable[Feature], boundaries: Mapping[str, tuple[float, ...]]) -> tuple[Feature, ...]:
    """Replaces each binned field's value by its bin feature (value 1)."""
    out = []
    for f in features:
        b = boundaries.get(f.field)
        if b is None:
            out.append(f)
        else:
            out.append(Feature(f.field, bin_key(bin_index(f.value, b)), 1.0))
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


def join_entity(features: tuple[Feature, ...], key_field: str, table: Mapping[str, Mapping[str, str]],
                numeric_columns=frozenset()) -> tuple[Feature, ...]:
    """Adds the attributes of the entity named by ``key_field`` as features.

    Args:
      features: the line's features, fields assigned.
      key_field: field whose key looks up the table (``item``).
      table: key -> {column: value}; a column becomes a field of that name.
      numeric_columns: columns whose value is a number (the feature key is the
        column name and the value the number); others are categorical keys.

    Returns:
      The features plus one feature per column of every matched entity.
    """
    extra = []
    for f in features:
        if f.field != key_field:
            continue
        row = table.get(f.key)
        if row is None:
            continue
        extra.extend(attribute_features(row, numeric_columns))
    return features + tuple(extra)


def attribute_features(row: Mapping[str, str], numeric_columns=frozenset()) -> list[Feature]:
    """Features of one entity-table row (empty cells are skipped: the field is missing)."""
    out = []
    for col, val in row.items():
        if val is None or val == "":
            continue
        if col in numeric_columns:
            out.append(Feature(col, col, parsing.parse_value(str(val), f"{col}={val}")))
        else:
            out.append(Feature(col, str(val), 1.0))
    return out


def assign_vocabulary(counts: Iterable[tuple[tuple[str, str], int]], field_names: list[str],
                      field_settings: Mapping[str, dict]) -> tuple[list[FieldSpec], list[VocabEntry]]:
    """Builds the field layout and the vocabulary from training counts.

    Features with ``count >= min_count`` of their field keep a row; within a
    field rows are ordered by descending count, then key, so the layout is
    deterministic. Row ``offset`` of each field is its rare id.

    Args:
      counts: ((field, key), training count) pairs.
      field_names: all fields in schema order.
      field_settings: field -> dict(kind, min_count, linear_only, bin_boundaries,
        source, multi_hot).

    Returns:
      (field specs in ``field_names`` order, vocabulary entries by index).
    """
    by_field: dict[str, list[tuple[str, int]]] = {name: [] for name in field_names}
    for (field, key), count in counts:
        if field not in by_field:
            raise ValueError(f"count for unknown field {field!r}")
        if key == MISSING_KEY:
            continue
        if count >= field_settings[field]["min_count"]:
            by_field[field].append((key, count))
    specs, vocab = [], []
    offset = 0
    for fid, name in enumerate(field_names):
        s = field_settings[name]
        kept = sorted(by_field[name], key=lambda kc: (-kc[1], kc[0]))
        for rank, (key, count) in enumerate(kept):
            vocab.append(VocabEntry(name, key, feature_hash(name, key), offset + 1 + rank, count))
        specs.append(FieldSpec(name=name, id=fid, kind=s["kind"], offset=offset, vocab_size=1 + len(kept),
                               rare_id=offset, linear_only=s["linear_only"], min_count=s["min_count"],
                               bin_boundaries=s.get("bin_boundaries"), source=s["source"],
                               multi_hot=s["multi_hot"]))
        offset += 1 + len(kept)
    return specs, vocab


@dataclasses.dataclass(frozen=True)
class SparseExample:
    """Aligned lists of one example, ready to serialize."""

    labels: tuple[float, ...]
    ids: tuple[int, ...]
    values: tuple[float, ...]
    fields: tuple[int, ...]
    hashes: tuple[int, ...]


def to_sparse_example(labels, features, field_ids: Mapping[str, int], rare_ids: list[int],
                      lookup: Mapping[int, int], fill_missing: bool = True) -> SparseExample:
    """Maps features to vocabulary rows (unknown -> the field's rare id).

    Args:
      labels: the line's labels.
      features: the line's features, fields assigned.
      field_ids: field name -> field id.
      rare_ids: rare row by field id.
      lookup: stable feature hash -> vocabulary row.
      fill_missing: add a rare feature for every field absent from the line.

    Raises:
      ParseError: ``unknown_field`` for a field not in the schema.
    """
    ids, vals, fids, hashes = [], [], [], []
    present = set()
    for f in features:
        fid = field_ids.get(f.field)
        if fid is None:
            raise ParseError(parsing.UNKNOWN_FIELD, f"field {f.field!r} is not in the schema")
        h = feature_hash(f.field, f.key)
        ids.append(lookup.get(h, rare_ids[fid]))
        vals.append(f.value)
        fids.append(fid)
        hashes.append(h)
        present.add(fid)
    if fill_missing:
        for name, fid in field_ids.items():
            if fid not in present:
                ids.append(rare_ids[fid])
                vals.append(1.0)
                fids.append(fid)
                hashes.append(feature_hash(name, MISSING_KEY))
    return SparseExample(tuple(labels), tuple(ids), tuple(vals), tuple(fids), tuple(hashes))


def _example_class():
    # Imported on first use: TensorFlow is heavy, and only the writing step needs its protos.
    global _EXAMPLE
    if _EXAMPLE is None:
        from tensorflow.core.example import example_pb2
        _EXAMPLE = example_pb2.Example
    return _EXAMPLE


_EXAMPLE = None


def serialize_example(ex: SparseExample, label_names, keys) -> bytes:
    """Serializes a SparseExample as a `tf.train.Example`."""
    e = _example_class()()
    feat = e.features.feature
    feat[keys.ids].int64_list.value.extend(ex.ids)
    feat[keys.values].float_list.value.extend(ex.values)
    feat[keys.fields].int64_list.value.extend(ex.fields)
    feat[keys.hashes].int64_list.value.extend(ex.hashes)
    for name, value in zip(label_names, ex.labels):
        feat[name].float_list.value.append(value)
    return e.SerializeToString()
