"""Pure parsers of libfm/libffm lines (no Beam, no TensorFlow).

Formats (tokens separated by single spaces or tabs):

    libfm:   label[,label2...] key:value key:value ...
    libffm:  label[,label2...] field:key:value field:key:value ...

Labels are ``0``/``1`` or ``-1``/``1`` (``-1`` maps to 0). Keys may be integers
or strings (``user_city=beijing``); ``:`` separates parts, so a key may not
contain one. Every failure raises ``ParseError`` with a machine-readable
``reason`` that the ETL writes, with the raw line, to its dead-letter output.
"""
from __future__ import annotations

import dataclasses
import math

# Reasons a line is dead-lettered; tests and the README table list exactly these.
EMPTY = "empty_line"
NON_UTF8 = "non_utf8"
BAD_LABEL = "bad_label"
LABEL_COUNT = "wrong_label_count"
BAD_TOKEN = "bad_token"
BAD_VALUE = "bad_value"
NON_FINITE = "non_finite_value"
DUPLICATE_FIELD = "duplicate_field"
UNKNOWN_FIELD = "unknown_field"
UNMAPPED_FEATURE = "unmapped_feature"
TOO_MANY_FEATURES = "too_many_features"
NO_FEATURES = "no_features"
REASONS = (EMPTY, NON_UTF8, BAD_LABEL, LABEL_COUNT, BAD_TOKEN, BAD_VALUE, NON_FINITE,
           DUPLICATE_FIELD, UNKNOWN_FIELD, UNMAPPED_FEATURE, TOO_MANY_FEATURES, NO_FEATURES)

_LABEL_VALUES = {"1": 1.0, "0": 0.0, "-1": 0.0, "+1": 1.0, "1.0": 1.0, "0.0": 0.0, "-1.0": 0.0}


class ParseError(ValueError):
    """A malformed line; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Feature:
    """One feature occurrence: ``field`` is None until a field map assigns it."""

    field: str | None
    key: str
    value: float


@dataclasses.dataclass(frozen=True)
class ParsedLine:
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


def parse_value(text: str, token: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ParseError(BAD_VALUE, f"value {text!r} of token {token!r} is not a number") from None
    if not math.isfinite(v):
        raise ParseError(NON_FINITE, f"value {text!r} of token {token!r} is not finite")
    return v


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


def parse_line(raw: bytes | str, fmt: str, num_labels: int = 1, max_features: int = 1000) -> ParsedLine:
    """Parses one libfm or libffm line.

    Args:
      raw: the line, bytes (checked to be UTF-8) or str.
      fmt: ``libfm`` or ``libffm``.
      num_labels: comma-separated labels expected before the features.
      max_features: lines with more features are rejected.

    Returns:
      The labels and features; fields are None for libfm.

    Raises:
      ParseError: with the reason the line is malformed.
    """
    if fmt not in ("libfm", "libffm"):
        raise ValueError(f"unknown format {fmt!r}: expected libfm or libffm")
    line = decode(raw)
    tokens = line.split()
    if not tokens:
        raise ParseError(EMPTY, "line has no tokens")
    labels = parse_labels(tokens[0], num_labels)
    feats = tokens[1:]
    if not feats:
        raise ParseError(NO_FEATURES, "line has labels but no features")
    if len(feats) > max_features:
        raise ParseError(TOO_MANY_FEATURES, f"{len(feats)} features > max_features={max_features}")
    parts_expected = 2 if fmt == "libfm" else 3
    out = []
    for tok in feats:
        parts = tok.split(":")
        if len(parts) != parts_expected or not all(parts):
            raise ParseError(BAD_TOKEN, f"token {tok!r} is not {'key:value' if fmt == 'libfm' else 'field:key:value'}")
        value = parse_value(parts[-1], tok)
        if fmt == "libfm":
            out.append(Feature(None, parts[0], value))
        else:
            out.append(Feature(parts[0], parts[1], value))
    return ParsedLine(labels, tuple(out))


def check_fields(features, known_fields=None, multi_hot_fields=frozenset()) -> None:
    """Rejects unknown fields and repeated single-valued fields.

    Args:
      features: parsed features with fields assigned.
      known_fields: if given, the only field names allowed.
      multi_hot_fields: fields that may occur several times in one line.

    Raises:
      ParseError: ``unknown_field`` or ``duplicate_field``.
    """
    seen = set()
    for f in features:
        if known_fields is not None and f.field not in known_fields:
            raise ParseError(UNKNOWN_FIELD, f"field {f.field!r} of feature {f.key!r} is not one of {sorted(known_fields)}")
        if f.field in seen and f.field not in multi_hot_fields:
            raise ParseError(DUPLICATE_FIELD, f"field {f.field!r} occurs more than once")
        seen.add(f.field)


def assign_fields(features, field_map) -> tuple[Feature, ...]:
    """Gives libfm features their field from a feature->field dictionary."""
    out = []
    for f in features:
        field = field_map.get(f.key)
        if field is None:
            raise ParseError(UNMAPPED_FEATURE, f"feature {f.key!r} is not in the field map")
        out.append(Feature(field, f.key, f.value))
    return tuple(out)
