"""The feature rules every stage shares, stated once in plain Python (no TensorFlow, no Beam).

The ETL uses these to count and describe what it writes; the featurization layer
(``featurization/``) applies the same rules in the TF graph, and
``tests/test_featurization.py`` checks the two agree value by value.

* **Value fields** (``binned`` and ``numeric``) carry one feature per line whose key is the field
  name (``value_key``) and whose value is the raw number, rounded to float32 (``to_float32``), the
  precision of a ``tf.train.FloatList``, with subnormal numbers flushed to zero as TensorFlow's CPU
  kernels do: bins and statistics are computed on exactly the numbers the layer later sees.
* **Bins.** ``bin_index(v, edges)`` is the number of edges ``<= v``: bin ``i`` holds
  ``edges[i-1] <= v < edges[i]`` (lower edge inclusive, upper exclusive); bin 0 holds everything
  below the first edge and bin ``len(edges)`` everything from the last edge up. Edges are strictly
  increasing float32 numbers, never subnormal. A value that carries at least ``1/num_bins`` of a
  field's training rows (0 in a zero-inflated field) gets a bin of its own,
  ``[v, singleton_edge(v))``, which holds no other float32 number; the rest of the rows is split
  into roughly equal-frequency bins, ``num_bins`` bins in all (``etl.features.bin_edges``). Bin
  ``i`` is the vocabulary feature ``bin_key(i)``.
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
FLOAT32_TINY = 1.1754943508222875e-38  # smallest normal float32


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
    """``value`` rounded to float32 (a ``tf.train.FloatList``'s precision; overflow gives +-inf),
    subnormal results flushed to zero (TensorFlow's CPU kernels flush them)."""
    try:
        v = _F32.unpack(_F32.pack(value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)
    return 0.0 if abs(v) < FLOAT32_TINY else v


def singleton_edge(value: float) -> float:
    """The smallest float32 edge above float32 ``value`` that no subnormal flush can cross.

    ``[value, singleton_edge(value))`` is a bin holding ``value`` alone: the next float32 up, or
    the smallest normal float32 when that next number would be subnormal (above 0) or 0.0 when it
    would be a negative subnormal.
    """
    v = to_float32(value)
    if v == 0.0:
        return FLOAT32_TINY
    bits = _F32.unpack(_F32.pack(v))[0]
    raw = struct.unpack("<i", _F32.pack(bits))[0]
    nxt = struct.unpack("<f", struct.pack("<i", raw + 1 if v > 0 else raw - 1))[0]
    if abs(nxt) < FLOAT32_TINY:
        return 0.0
    return nxt


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
