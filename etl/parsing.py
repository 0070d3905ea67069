"""Pure parsers of libfm/libffm lines (no Beam, no TensorFlow).

Formats (tokens separated by spaces or tabs):

    libfm:   label[,label2...] key:value key:value ...
    libffm:  label[,label2...] field:key:value field:key:value ...

Labels are ``0``/``1`` or ``-1``/``1`` (``-1`` maps to 0). Keys may be integers
or strings (``user_city=beijing``); ``:`` separates parts, so a key may not
contain one. With ``field_names`` given, a libffm field is an integer index
into it (``3:4711:1`` is feature ``4711`` of the fourth declared field).

A feature is a ``(field, key, value)`` tuple. The hot path (``parse_record``)
returns plain tuples, which Beam encodes without pickling; ``Feature`` is the
same tuple with names, and compares equal to it. Every failure raises
``ParseError`` with a machine-readable ``reason`` that the ETL writes, with the
raw line, to its dead-letter output.
"""
from __future__ import annotations

from sys import intern
from typing import NamedTuple

# Reasons a line is dead-lettered; docs/ETL.md lists exactly these.
EMPTY = "empty_line"
NON_UTF8 = "non_utf8"
BAD_LABEL = "bad_label"
LABEL_COUNT = "wrong_label_count"
BAD_TOKEN = "bad_token"
BAD_VALUE = "bad_value"
NON_FINITE = "non_finite_value"
DUPLICATE_FIELD = "duplicate_field"
FIELD_OUT_OF_RANGE = "field_out_of_range"
UNKNOWN_FIELD = "unknown_field"
UNMAPPED_FEATURE = "unmapped_feature"
TOO_MANY_FEATURES = "too_many_features"
NO_FEATURES = "no_features"
BAD_DICTIONARY_VALUE = "bad_dictionary_value"
REASONS = (EMPTY, NON_UTF8, BAD_LABEL, LABEL_COUNT, BAD_TOKEN, BAD_VALUE, NON_FINITE, DUPLICATE_FIELD,
           FIELD_OUT_OF_RANGE, UNKNOWN_FIELD, UNMAPPED_FEATURE, TOO_MANY_FEATURES, NO_FEATURES,
           BAD_DICTIONARY_VALUE)

_LABEL_VALUES = {"1": 1.0, "0": 0.0, "-1": 0.0, "+1": 1.0, "1.0": 1.0, "0.0": 0.0, "-1.0": 0.0}
# Records hold float32 values (a tf.train.FloatList): a larger magnitude would become inf there.
FLOAT32_MAX = 3.4028234663852886e38


class ParseError(ValueError):
    """A malformed line; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Feature(NamedTuple):
    """One feature occurrence: ``field`` is None until a field map assigns it."""

    field: str | None
    key: str
    value: float


class ParsedLine(NamedTuple):
    labels: tuple[float, ...]
    features: tuple[Feature, ...]


def decode(raw: bytes | str) -> str:
    """Decodes a raw line as UTF-8, stripping the line ending."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ParseError(NON_UTF8, f"byte {e.start} is not UTF-8") from None
    return raw.rstrip("\r\n")


def parse_labels(text: str, num_labels: int) -> tuple[float, ...]:
    parts = text.split(",")
    if len(parts) != num_labels:
        raise ParseError(LABEL_COUNT, f"label {text!r} has {len(parts)} parts, expected {num_labels}")
    out = []
    for p in parts:
        v = _LABEL_VALUES.get(p)
        if v is None:
            raise ParseError(BAD_LABEL, f"label {p!r} is not one of 0/1/-1")
        out.append(v)
    return tuple(out)


def _field_by_index(token: str, part: str, field_names: tuple[str, ...]) -> str:
    if not (part.isascii() and part.isdigit()):  # no sign: "-1" is a bad token, not index -1
        raise ParseError(BAD_TOKEN, f"field {part!r} of token {token!r} is not a field index")
    i = int(part)
    if i >= len(field_names):
        raise ParseError(FIELD_OUT_OF_RANGE, f"field index {i} of token {token!r} >= {len(field_names)} fields")
    return field_names[i]


def _number(text: str, token: str) -> float:
    """A feature value: a number that is finite in float32 (``bad_value``, ``non_finite_value``)."""
    try:
        v = float(text)
    except ValueError:
        raise ParseError(BAD_VALUE, f"value {text!r} of token {token!r} is not a number") from None
    if not -FLOAT32_MAX <= v <= FLOAT32_MAX:  # also false for NaN
        raise ParseError(NON_FINITE, f"value {text!r} of token {token!r} is not finite in float32")
    return v


def parse_record(raw: bytes | str, fmt: str, num_labels: int = 1, max_features: int = 1000,
                 field_names: tuple[str, ...] | None = None) -> tuple[tuple[float, ...], list[tuple]]:
    """Parses one line into labels and ``(field, key, value)`` tuples (fields None for libfm).

    Args:
      raw: the line, bytes (checked to be UTF-8) or str.
      fmt: ``libfm`` or ``libffm``.
      num_labels: comma-separated labels expected before the features.
      max_features: lines with more features are rejected.
      field_names: libffm only: fields are integer indexes into this tuple.

    Raises:
      ParseError: with the reason the line is malformed.
    """
    if fmt == "libffm":
        nparts = 3
    elif fmt == "libfm":
        nparts = 2
    else:
        raise ValueError(f"unknown format {fmt!r}: expected libfm or libffm")
    tokens = decode(raw).split()
    if not tokens:
        raise ParseError(EMPTY, "line has no tokens")
    labels = parse_labels(tokens[0], num_labels)
    n = len(tokens) - 1
    if n == 0:
        raise ParseError(NO_FEATURES, "line has labels but no features")
    if n > max_features:
        raise ParseError(TOO_MANY_FEATURES, f"{n} features > max_features={max_features}")
    out = []
    append = out.append
    for i in range(1, n + 1):
        tok = tokens[i]
        parts = tok.split(":")
        if len(parts) != nparts or "" in parts:
            raise ParseError(BAD_TOKEN, f"token {tok!r} is not {'key:value' if nparts == 2 else 'field:key:value'}")
        text = parts[-1]
        v = 1.0 if text == "1" else _number(text, tok)  # "1": most values of one-hot logs
        if nparts == 2:
            append((None, parts[0], v))
        elif field_names is None:
            # One string object per field name, not one per token: every distinct key counted
            # downstream would otherwise hold its own copy.
            append((intern(parts[0]), parts[1], v))
        else:
            append((_field_by_index(tok, parts[0], field_names), parts[1], v))
    return labels, out


def parse_line(raw: bytes | str, fmt: str, num_labels: int = 1, max_features: int = 1000,
               field_names: tuple[str, ...] | None = None) -> ParsedLine:
    """``parse_record`` with named tuples: labels and ``Feature``s (see there)."""
    labels, feats = parse_record(raw, fmt, num_labels, max_features, field_names)
    return ParsedLine(labels, tuple(Feature(*f) for f in feats))


def check_fields(features, known_fields=None, multi_hot_fields=frozenset()) -> None:
    """Rejects unknown fields and repeated single-valued fields.

    Args:
      features: ``(field, key, value)`` tuples with fields assigned.
      known_fields: if given, the only field names allowed.
      multi_hot_fields: fields that may occur several times in one line.

    Raises:
      ParseError: ``unknown_field`` or ``duplicate_field``.
    """
    seen = set()
    for f in features:
        field = f[0]
        if known_fields is not None and field not in known_fields:
            raise ParseError(UNKNOWN_FIELD, f"field {field!r} of feature {f[1]!r} is not one of {sorted(known_fields)}")
        if field in seen and field not in multi_hot_fields:
            raise ParseError(DUPLICATE_FIELD, f"field {field!r} occurs more than once")
        seen.add(field)


def assign_fields(features, field_map) -> tuple[tuple, ...]:
    """Gives libfm features their field from a feature->field mapping (any ``.get``)."""
    out = []
    get = field_map.get
    for f in features:
        field = get(f[1])
        if field is None:
            raise ParseError(UNMAPPED_FEATURE, f"feature {f[1]!r} is not in the field map")
        out.append((field, f[1], f[2]))
    return tuple(out)
