"""Stable 64-bit feature ids shared by the ETL and the serving graph.

A feature is identified by its field name and its key (``user`` and ``u123``,
``city`` and ``beijing``, ``0`` and ``4711``). Its stable id is

    id = int64(Fingerprint64(field + "=" + key))

where ``Fingerprint64`` is FarmHash's ``Fingerprint64``: ``farmhash.fingerprint64``
in Python (package ``pyfarmhash``) and ``tf.fingerprint`` in TensorFlow, whose
eight output bytes read little-endian are the same number (the hash behind
``tf.strings.to_hash_bucket_fast``). The unsigned 64-bit value is stored as the
two's-complement signed int64 that ``tf.train.Int64List`` and TF tensors hold.

Putting the field into the hashed string gives one id space for all fields, so
that the same integer key in two fields (``user:7`` and ``item:7``) never shares
a vocabulary row.
"""
from __future__ import annotations

import farmhash

HASH_FUNCTION = "farmhash.fingerprint64(field + '=' + key) as int64 == tf.bitcast(tf.fingerprint(s), tf.int64)"
_SEP = "="
_TWO_64 = 1 << 64
_TWO_63 = 1 << 63


def feature_key(field: str, key: str) -> str:
    """Returns the string that is hashed for feature ``key`` of ``field``."""
    return f"{field}{_SEP}{key}"


def to_signed64(unsigned: int) -> int:
    """Maps an unsigned 64-bit integer to the int64 with the same bits."""
    return unsigned - _TWO_64 if unsigned >= _TWO_63 else unsigned


def string_hash(text: str) -> int:
    """FarmHash Fingerprint64 of ``text`` (UTF-8) as a signed int64."""
    return to_signed64(farmhash.fingerprint64(text))


def feature_hash(field: str, key: str) -> int:
    """Stable signed 64-bit id of feature ``key`` in ``field``."""
    return string_hash(feature_key(field, key))


def field_hash(field: str) -> int:
    """Stable signed 64-bit id of a field name: what a record carries for each feature's field.

    Records name fields by this hash rather than by a dense field id, so the ETL can write them
    before it knows every field (fields first seen in the data get their ids when the schema is
    assembled); the featurization layer maps the hash to the schema's field id.
    """
    return string_hash(field)
