"""The feature rules every stage shares, stated once in plain Python (no TensorFlow, no Beam).

The ETL uses these to count and describe what it writes; the featurization layer
(``featurization/``) applies the same rules in the TF graph, and
``tests/test_featurization.py`` checks the two agree value by value.

* **Value fields** (``binned`` and ``numeric``) carry one feature per line whose key is the field
  name (``value_key``) and whose value is the raw number, rounded to float32 (``to_float32``), the
  precision of a ``tf.train.FloatList``: bins and statistics are computed on exactly the numbers
  the layer later sees.
* **Bins.** ``bin_index(v, edges)`` is the number of edges ``<= v``: bin ``i`` holds
  ``edges[i-1] <= v < edges[i]`` (lower edge inclusive, upper exclusive); bin 0 holds everything
  below the first edge and bin ``len(edges)`` everything from the last edge up. Edges are strictly
  increasing and float32 numbers. A value that carries at least ``1/num_bins`` of a field's
  training rows (0 in a zero-inflated field) gets a bin of its own, ``[v, next_float32(v))``;
  the rest of the rows is split into roughly equal-frequency bins, ``num_bins`` bins in all
  (``etl.features.bin_edges``). Bin ``i`` is the vocabulary feature ``bin_key(i)``.
* **Scaling.** A ``numeric`` field's value becomes ``(t(v) - mean) / std`` with ``t`` its
  ``transform`` (``none``: identity; ``log1p``: ``sign(v) * log(1 + |v|)``, for heavy tails), and
  mean and std of ``t(v)`` over the training split (``FieldSpec.value_stats``; std 0 counts as 1).
* **Missing fields.** A field absent from a line gets its rare row with value 1 (categorical and
  binned fields: a learned "missing" weight); for a ``numeric`` field that row carries value 0,
  the training mean after scaling, so a dense input reads a missing number as the mean.
"""
from __future__ import annotations

import bisect
import math
import struct

VALUE_TRANSFORMS = ("none", "log1p")
_F32 = struct.Struct("<f")
_U32 = struct.Struct("<I")


def value_key(field: str) -> str:
    """Key of the one feature of a ``binned`` or ``numeric`` field: the field name."""
    return field


def bin_key(index: int) -> str:
    """Vocabulary key of bin ``index`` of a binned field."""
    return f"bin{index}"


def bin_index(value: float, edges) -> int:
    """Bin of ``value``: the number of ``edges`` that are ``<= value`` (0..len(edges))."""
    return bisect.bisect_right(edges, value)


def to_float32(value: float) -> float:
    """``value`` rounded to float32, the precision of a ``tf.train.FloatList`` (overflow: +-inf)."""
    try:
        return _F32.unpack(_F32.pack(value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def next_float32(value: float) -> float:
    """The smallest float32 above float32 ``value`` (numpy's ``nextafter`` towards +inf in float32).

    ``[v, next_float32(v))`` holds exactly one float32, ``v``: the bin of a heavy value.
    """
    v = to_float32(value)
    if v != v or v == math.inf:
        return v
    if v == 0.0:
        return _F32.unpack(_U32.pack(1))[0]  # the smallest subnormal, above +0 and -0
    bits = _U32.unpack(_F32.pack(v))[0]
    return _F32.unpack(_U32.pack(bits + 1 if v > 0 else bits - 1))[0]


def transform_value(value: float, transform: str) -> float:
    """``t(value)`` of a numeric field's ``transform`` (see the module docstring)."""
    if transform == "none":
        return value
    if transform == "log1p":
        return math.copysign(math.log1p(abs(value)), value)
    raise ValueError(f"transform {transform!r} not in {VALUE_TRANSFORMS}")


def scale_value(value: float, transform: str, mean: float, std: float) -> float:
    """The standardised value of a numeric feature: ``(t(value) - mean) / std`` (std 0 -> 1)."""
    return (transform_value(value, transform) - mean) / (std if std > 0 else 1.0)
