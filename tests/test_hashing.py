"""The ETL's FarmHash feature ids equal the serving graph's tf.fingerprint ids."""
from __future__ import annotations

import random

import numpy as np
import tensorflow as tf

from feature_schema import feature_hash, feature_key, string_hash
from feature_schema.hashing import to_signed64


def _strings(n: int) -> list[str]:
    rng = random.Random(3)
    alphabet = "abcxyz0123456789=_:-/ éü北京🙂"
    out = ["", "a", "user=123", "user_city=beijing", "x" * 5000]
    seen = set(out)
    while len(out) < n:
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def test_farmhash_matches_tf_fingerprint_on_1200_strings():
    strings = _strings(1200)
    ours = np.array([string_hash(s) for s in strings], dtype=np.int64)
    # tf.fingerprint gives 8 bytes per string; read little-endian they are Fingerprint64.
    theirs = tf.bitcast(tf.fingerprint(tf.constant(strings)), tf.int64).numpy().ravel()
    assert len(set(strings)) == len(strings)
    np.testing.assert_array_equal(ours, theirs)


def test_feature_hash_is_field_qualified():
    assert feature_key("user", "7") == "user=7"
    assert feature_hash("user", "7") == string_hash("user=7")
    assert feature_hash("user", "7") != feature_hash("item", "7")


def test_signed_conversion():
    assert to_signed64(0) == 0
    assert to_signed64(2**63 - 1) == 2**63 - 1
    assert to_signed64(2**63) == -(2**63)
    assert to_signed64(2**64 - 1) == -1
    # Known value: Fingerprint64("a") = 12917804110809363939 (pyfarmhash).
    assert string_hash("a") == 12917804110809363939 - 2**64
