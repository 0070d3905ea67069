"""Pure feature transforms used by the Beam job and by the plain-Python baseline.

No Beam import here: each function maps plain values to plain values, so it is
unit-tested directly and reused unchanged inside DoFns (``etl/transforms.py``)
and by ``bench/bench_etl.py``'s single-process conversion.

A record moving through the job is ``(labels, features)`` with ``(field, key, value)``
feature tuples; binned and numeric fields carry their field name as key
(``rules.value_key``) and the raw number as value. ``RecordEncoder`` turns a record into a
version-2 `tf.train.Example` (hashes, values, field hashes, labels). Nothing here maps a
key to a vocabulary row: the vocabulary is *built* here (``assign_vocabulary``,
``extend_vocabulary``, ``bin_edges``) and *applied* by the featurization layer.
"""
from __future__ import annotations

import dataclasses
import math
import types
from typing import Callable, Iterable, Mapping, Sequence

from etl import parsing, tfrecord
from etl.parsing import ParseError
from feature_schema import FieldSpec, VocabEntry, feature_hash, field_hash, string_hash
from feature_schema.rules import singleton_edge, value_key

TRAIN, EVAL, VALID = 0, 1, 2


# ---------------------------------------------------------------- bins and value statistics

def bin_edges(num_bins: int, lo: float, hi: float, heavy: Sequence[float], occupied_gaps,
              quantiles: Callable[[int], Sequence[float]]) -> tuple[float, ...]:
    """Bin edges of a field that survive ties: heavy values alone, the rest by equal frequency.

    A *heavy* value holds at least ``1/num_bins`` of the field's training rows (0 in a
    zero-inflated field). Heavy value ``v`` gets the bin ``[v, singleton_edge(v))``; its lower edge
    is left out when nothing lies below it (the training minimum, or right after another heavy
    value) and its upper edge when no other value lies between it and the next heavy value (or
    above it), so no bin is empty in training. The other values are split at ``m - 1`` interior
    quantiles into ``m`` bins, with ``m`` the largest count (from ``num_bins - len(heavy)`` down)
    that keeps the total at most ``num_bins``. Edges are float32 numbers in ``(lo, hi]``, strictly
    increasing; ``rules.bin_index`` (edges ``<= v``) places a value.

    Args:
      num_bins: bins wanted in total.
      lo, hi: the smallest and largest training value.
      heavy: the heavy values, sorted.
      occupied_gaps: indices ``g`` of the gaps that hold non-heavy values: gap ``g`` lies below
        ``heavy[g]`` (and above ``heavy[g-1]``), gap ``len(heavy)`` above the last heavy value.
      quantiles: ``m -> [min, q_1, .., q_{m-1}, max]``, weighted quantiles of the non-heavy
        values (``[]`` when there are none).

    Returns:
      The edges (``len(edges) + 1`` bins).
    """
    gaps = set(occupied_gaps)
    fixed = set()
    for i, v in enumerate(heavy):
        if i > 0 or 0 in gaps:
            fixed.add(v)
        if i + 1 in gaps:
            fixed.add(singleton_edge(v))
    edges: list[float] = []
    for m in range(max(num_bins - len(heavy), 1), 0, -1):
        qs = list(quantiles(m))
        interior = {float(q) for q in qs[1:-1]} if len(qs) > 2 else set()
        edges = sorted(e for e in interior | fixed if lo < e <= hi)
        if len(edges) < num_bins:
            break
    return tuple(edges)


def value_stats(count: float, total: float, total_sq: float, lo: float, hi: float) -> dict[str, float]:
    """count/mean/std/min/max from weighted sums (std is the population std)."""
    mean = total / count if count else 0.0
    var = max(total_sq / count - mean * mean, 0.0) if count else 0.0
    return {"count": float(count), "mean": mean, "std": math.sqrt(var), "min": lo, "max": hi}


# ---------------------------------------------------------------- dictionaries

def table_row(row: Mapping[str, str | None], value_columns=frozenset()) -> tuple | str:
    """The compact form of one entity-table row, or an error detail if a number is malformed.

    One cell per column, in ``row``'s order: ``None`` for an empty cell (the field is missing),
    a float for a binned/numeric column, the string otherwise. Rows are a side input that every
    worker holds for the whole job: a tuple of cells is a fifth of the memory of the features
    themselves (three tuples and a copy of every column name per row); ``join_entity`` makes
    the features of the rows a line matches. The job converts every row once, when it reads the
    table, not per line.
    """
    out = []
    for col, val in row.items():
        if val is None or val == "":
            out.append(None)
        elif col in value_columns:
            try:
                v = float(val)
            except ValueError:
                return f"column {col!r}: {val!r} is not a number"
            if not -parsing.FLOAT32_MAX <= v <= parsing.FLOAT32_MAX:
                return f"column {col!r}: {val!r} is not finite in float32"
            out.append(v)
        else:
            out.append(str(val))
    return tuple(out)


def join_entity(features, key_field: str, table, columns: Sequence[str]) -> tuple[tuple, ...]:
    """Adds the attributes of every entity named by ``key_field`` as features.

    A string cell of column ``c`` becomes ``(c, cell, 1.0)``, a number ``(c, c, number)``
    (``rules.value_key``); empty cells add nothing.

    Args:
      features: the line's features, fields assigned.
      key_field: field whose key looks up the table (``item``).
      table: any ``.get(key)`` mapping from entity key to ``table_row``.
      columns: the table's columns, in the order of its rows' cells.

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
        for col, cell in zip(columns, row):
            if cell is not None:
                extra.append((col, col, cell) if type(cell) is float else (col, cell, 1.0))
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
      table_columns: the columns of each entity table, in the order of its rows' cells.
      split: ``path`` (eval given by the input), ``line`` (hash of the raw line)
        or ``key`` (hash of the ``split_key`` field's feature).
      split_key: field for ``split == "key"``.
      eval_percent: share of lines hashed to eval (not for ``split == "path"``).
      valid_per_10k: share, in 1/10000, of the non-eval lines of ``input`` carved into valid.
      sequences: (sequence field, max_length) pairs: a line keeps a sequence's first max_length keys.
      vector_fields: fields of kind vector, which come from their tables only: a line holding one
        is dead-lettered (``unknown_field``).
    """

    fmt: str = "libffm"
    num_labels: int = 1
    max_features: int = 1000
    field_index: tuple[str, ...] | None = None
    known_fields: frozenset[str] | None = None
    multi_hot: frozenset[str] = frozenset()
    value_fields: frozenset[str] = frozenset()
    table_keys: tuple[str, ...] = ()
    table_columns: tuple[tuple[str, ...], ...] = ()
    split: str = "line"
    split_key: str = ""
    eval_percent: int = 20
    valid_per_10k: int = 0
    sequences: tuple[tuple[str, int], ...] = ()
    vector_fields: frozenset[str] = frozenset()


def truncate_sequences(features, max_lengths: Mapping[str, int]) -> tuple[tuple, dict[str, int]]:
    """The features with each sequence field's keys after its first ``max_length`` dropped.

    The kept keys keep their order (the first ones: the most recent, as the log lists them), and so
    does every other feature.

    Returns:
      (features, {sequence field: keys dropped}) (only fields that lost keys).
    """
    seen: dict[str, int] = {}
    dropped: dict[str, int] = {}
    out = []
    for f in features:
        limit = max_lengths.get(f[0])
        if limit is not None:
            n = seen[f[0]] = seen.get(f[0], 0) + 1
            if n > limit:
                dropped[f[0]] = dropped.get(f[0], 0) + 1
                continue
        out.append(f)
    return (tuple(out), dropped) if dropped else (tuple(features), dropped)


def line_hash(raw: bytes | str) -> int:
    """The stable hash of a raw line that splits it (its bytes read as Latin-1)."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    return string_hash(raw.decode("latin-1"))


def hash_split(h: int, eval_percent: int, valid_per_10k: int = 0) -> int:
    """TRAIN, EVAL or VALID from a stable hash.

    Eval takes ``h mod 100 < eval_percent``; of the rest, valid takes ``(h div 100) mod 10000 <
    valid_per_10k``, digits the eval test does not read, so valid is a uniform share of the
    non-eval lines, disjoint from train, and the same in every run.
    """
    if h % 100 < eval_percent:
        return EVAL
    if valid_per_10k and (h // 100) % 10000 < valid_per_10k:
        return VALID
    return TRAIN


def line_split(raw: bytes | str, eval_percent: int, valid_per_10k: int = 0) -> int:
    """The split of a raw line by its hash (``hash_split``)."""
    return hash_split(line_hash(raw), eval_percent, valid_per_10k)


_NO_DROPS: Mapping[str, int] = types.MappingProxyType({})  # no dict per line without sequence fields


class LineProcessor:
    """Parses, joins and checks lines, and decides their split (all pure)."""

    def __init__(self, spec: LineSpec):
        self.spec = spec
        self._max_lengths = dict(spec.sequences)

    def parse(self, raw) -> tuple[tuple[float, ...], list[tuple]]:
        s = self.spec
        return parsing.parse_record(raw, s.fmt, s.num_labels, s.max_features, s.field_index)

    @staticmethod
    def assign(features, field_map) -> tuple[tuple, ...]:
        return parsing.assign_fields(features, field_map)

    def join(self, features, table_index: int, table) -> tuple[tuple, ...]:
        return join_entity(features, self.spec.table_keys[table_index], table, self.spec.table_columns[table_index])

    def truncate(self, features) -> tuple[tuple, Mapping[str, int]]:
        """``truncate_sequences`` with the spec's sequence fields (no copy without any)."""
        if not self._max_lengths:
            return features, _NO_DROPS
        return truncate_sequences(features, self._max_lengths)

    def finish(self, features) -> tuple[tuple, ...]:
        """Field checks after all joins; value fields get their field name as key."""
        s = self.spec
        if s.vector_fields:
            for f in features:
                if f[0] in s.vector_fields:
                    raise ParseError(parsing.UNKNOWN_FIELD, f"field {f[0]!r} is a vector field: its vectors come "
                                                            f"from its table, not from log lines")
        if len(features) > s.max_features:
            raise ParseError(parsing.TOO_MANY_FEATURES,
                             f"{len(features)} features after joins > max_features={s.max_features}")
        parsing.check_fields(features, s.known_fields, s.multi_hot)
        vf = s.value_fields
        if vf:
            features = tuple((f[0], value_key(f[0]), f[2]) if f[0] in vf else f for f in features)
        return tuple(features)

    def split_of(self, raw, features=None) -> int:
        """The split of a line of ``input``; without features (a bad line) the raw line decides.

        With ``split == "path"`` the input is the training input: only the valid carve applies.
        """
        s = self.spec
        eval_percent = 0 if s.split == "path" else s.eval_percent
        if s.split == "key" and features:
            for f in features:
                if f[0] == s.split_key:
                    return hash_split(feature_hash(f[0], f[1]), eval_percent, s.valid_per_10k)
        return line_split(raw, eval_percent, s.valid_per_10k)


# ------------------------------------------------------------------ records

class RecordEncoder:
    """Version-2 `tf.train.Example` bytes of a record: feature hashes, values, field hashes, labels.

    ``feature_hash`` costs a string join and a FarmHash per feature; keys repeat (ids are
    Zipf-distributed), so (feature hash, field hash) is cached per (field, key), up to
    ``max_cached`` features (then the cache starts over, keeping its memory, about 16 MB at the
    default, independent of the number of distinct keys). Not thread-safe: each DoFn instance
    makes its own in ``setup``.

    A sequence field with ``vocabulary_of`` (``namespaces``: hist -> item) hashes its keys as the
    other field's features, ``feature_hash("item", key)``, and keeps its own field hash.
    """

    def __init__(self, label_names, keys, max_cached: int = 1 << 16, namespaces: Mapping[str, str] | None = None):
        self._example = tfrecord.ExampleEncoder(label_names, keys)
        self._max = max_cached
        self._cache: dict[tuple[str, str], tuple[int, int]] = {}
        self._namespaces = dict(namespaces or {})

    def _miss(self, field: str, key: str) -> tuple[int, int]:
        if len(self._cache) >= self._max:
            self._cache.clear()
        h = self._cache[(field, key)] = (feature_hash(self._namespaces.get(field, field), key), field_hash(field))
        return h

    def lists(self, features) -> tuple[list[int], list[float], list[int]]:
        """(feature hashes, values, field hashes) of ``(field, key, value)`` features, in their order."""
        hashes, values, fields = [], [], []
        get = self._cache.get
        for field, key, value in features:
            h = get((field, key)) or self._miss(field, key)
            hashes.append(h[0])
            values.append(value)
            fields.append(h[1])
        return hashes, values, fields

    def encode(self, labels, features) -> bytes:
        """The serialized record of ``labels`` and ``(field, key, value)`` features."""
        hashes, values, fields = self.lists(features)
        return self._example.encode(hashes, values, fields, labels)


# ------------------------------------------------------------------ vocabulary

def _spec(name, fid, s, offset, size):
    return FieldSpec(name=name, id=fid, kind=s["kind"], offset=offset, vocab_size=size, rare_id=offset,
                     linear_only=s["linear_only"], min_count=s["min_count"], bin_boundaries=s.get("bin_boundaries"),
                     source=s["source"], multi_hot=s["multi_hot"], value_stats=s.get("value_stats"),
                     transform=s.get("transform", "none"), sequence=s.get("sequence", False),
                     max_length=s.get("max_length", 0), vocabulary_of=s.get("vocabulary_of", ""))


def _kept_by_field(counts, field_settings, names) -> dict[str, list[tuple[str, int]]]:
    by_field: dict[str, list[tuple[str, int]]] = {name: [] for name in names}
    for (field, key), count in counts:
        if field not in by_field:
            raise ValueError(f"count for unknown field {field!r}")
        if field_settings[field].get("vocabulary_of"):
            continue  # its keys use another field's rows: its own block is its rare row
        if count >= field_settings[field]["min_count"]:
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
        multi_hot, and optionally bin_boundaries, value_stats, transform).

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


# ------------------------------------------------------------------ warnings

def field_usage(specs: Sequence[FieldSpec], vocab: Sequence[VocabEntry], counts: Mapping[tuple[str, str], int],
                occurrences: Mapping[str, int], lines: Mapping[str, int]) -> dict[str, dict]:
    """Per field, what the training split uses of its rows (for ``single_row_warnings``).

    Args:
      specs, vocab: the layout written.
      counts: this run's training count of every feature with a row of its own.
      occurrences: field -> training features of the field (rare ones included).
      lines: field -> training lines holding the field, for multi-hot fields (else the
        occurrences are the lines: a single-valued field occurs at most once per line).

    Returns:
      field -> {"rows": own rows hit, "rows_count": their occurrences, "top": (key, n) of the
      most frequent or None, "occurrences", "lines"}.
    """
    hits_of: dict[str, list[tuple[int, str]]] = {s.name: [] for s in specs}
    for e in vocab:
        n = counts.get((e.field, e.key), 0)
        if n > 0:
            hits_of[e.field].append((n, e.key))
    out = {}
    for s in specs:
        hits = sorted(hits_of[s.name], key=lambda nk: (-nk[0], nk[1]))
        occ = int(occurrences.get(s.name, 0))
        out[s.name] = {"rows": len(hits), "rows_count": sum(n for n, _ in hits), "top": [hits[0][1], hits[0][0]]
                       if hits else None, "occurrences": occ, "lines": int(lines.get(s.name, occ))}
    return out


def single_row_warnings(specs: Sequence[FieldSpec], usage: Mapping[str, dict], train_lines: int) -> list[str]:
    """Fields the training split sees through one row only: a constant to the model.

    A field's training rows are its own rows hit, plus its rare row when a training feature
    was rare or a training line lacked the field (the layer's missing row). A ``numeric``
    field has one row; it is constant when it is never missing and its ``std`` is 0.
    """
    out = []
    for s in specs:
        u = usage.get(s.name)
        if u is None or s.vocabulary_of:  # a sequence of another field's keys uses that field's rows
            continue
        missing = train_lines - u["lines"]
        rare = u["occurrences"] - u["rows_count"]
        if s.kind == "numeric":
            std = (s.value_stats or {}).get("std", 0.0)
            if missing <= 0 and std == 0 and u["occurrences"]:
                out.append(f"field {s.name!r}: every training line has the same value "
                           f"{(s.value_stats or {}).get('min')}; the field is a constant to the model")
            continue
        used = u["rows"] + (1 if rare > 0 or missing > 0 else 0)
        if used > 1:
            continue
        if u["rows"]:
            key, n = u["top"]
            what = f"all {n} training values in {key}" if s.kind == "binned" else f"every training line has key {key!r}"
        elif u["occurrences"]:
            what = f"all {u['occurrences']} training features are rare (< min_count {s.min_count})"
        elif train_lines:
            what = "missing from every training line"
        else:
            what = "no training lines"
        out.append(f"field {s.name!r}: one used row in training ({what}); the field is a constant to the model")
    return out
