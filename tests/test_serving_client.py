"""The client's line featurizer reproduces the ETL's features (hashes, values, field ids) on raw logs."""
from __future__ import annotations

import collections
import os

import pytest
import tensorflow as tf

from export import exporter
from feature_schema import feature_hash, load_schema
from serving import client as client_lib
from serving import protocol


def _etl_multiset(tiny_etl):
    schema = load_schema(tiny_etl)
    rows = protocol.example_rows(exporter.eval_examples(schema, 100_000), schema)
    return schema, collections.Counter(tuple(sorted(r)) for r in rows)


def test_libffm_and_libfm_lines_featurize_like_the_etl(tiny_raw, tiny_etl):
    """Every eval line, with the item table joined, binned price and missing fields filled, gives
    exactly the features the Beam ETL wrote for it (compared as multisets: shard order differs)."""
    raw, _ = tiny_raw
    schema, want = _etl_multiset(tiny_etl)
    items = client_lib.read_tsv_table(os.path.join(raw, "items.tsv"), "item")
    assert any(f.kind == "binned" for f in schema.fields)  # the price bins are exercised
    fz = client_lib.LineFeaturizer(schema, "libffm", joins=[("item", items)])
    with open(os.path.join(raw, "eval.libffm")) as f:
        got = collections.Counter(tuple(sorted(fz.features(line))) for line in f)
    assert got == want
    fz = client_lib.LineFeaturizer(schema, "libfm", client_lib.read_field_map(os.path.join(raw, "field_map.tsv")),
                                   joins=[("item", items)])
    with open(os.path.join(raw, "eval.libfm")) as f:
        got = collections.Counter(tuple(sorted(fz.features(line))) for line in f)
    assert got == want


def test_featurizer_example_and_id_lines(tiny_etl):
    schema = load_schema(tiny_etl)
    fz = client_lib.LineFeaturizer(schema, "libffm")
    feats = fz.features("1,0 user:u1:1 hour:h3:1")
    assert len(feats) == 2  # the served graph adds the missing fields
    user, hour = schema.field("user"), schema.field("hour")
    assert feats[:2] == [(feature_hash("user", "u1"), 1.0, user.id), (feature_hash("hour", "h3"), 1.0, hour.id)]
    ex = tf.train.Example.FromString(fz.example("user:u1:1 hour:h3:1"))
    assert list(ex.features.feature[schema.example_keys.hashes].int64_list.value) == [f[0] for f in feats]
    line = " ".join(f"{fid}:{h}:{v}" for h, v, fid in feats)
    assert client_lib.parse_id_line(line) == feats
    for bad in ("user:u1", "nope:x:1", "user:u1:x"):
        with pytest.raises(ValueError):
            fz.features(bad)
