"""The client builds raw Examples with the ETL's own parser and featurizes nothing; the graph does it."""
from __future__ import annotations

import collections
import dataclasses
import os

import pytest
import tensorflow as tf

from etl import parsing
from feature_schema import load_schema
from featurization import Featurizer, raw
from serving import examples as examples_lib
from serving import protocol
from trainer import data


def _rows(out):
    """Per example: the sorted (field id, row, value) of a featurized batch."""
    ids, vals, flds = out["ids"], out["values"], out["fields"]
    per = collections.defaultdict(list)
    for (i, _), f, r, v in zip(ids.indices.numpy(), flds.values.numpy(), ids.values.numpy(), vals.values.numpy()):
        per[i].append((int(f), int(r), round(float(v), 5)))
    return [tuple(sorted(per[i])) for i in range(int(ids.dense_shape[0]))]


def test_value_suffix_is_the_graphs():
    assert protocol.VALUE_SUFFIX == raw.VALUE_SUFFIX


def test_examples_hold_the_logs_fields_as_written(tiny_etl):
    schema = load_schema(tiny_etl)
    b = examples_lib.ExampleBuilder(schema)
    labels, feats = b.parse(b"1,0 user:u7:1 item:i3:1 position:p2:1 tag:x:2.5")
    assert labels == (1.0, 0.0) and feats[0] == ("user", "u7", 1.0)
    ex = tf.train.Example.FromString(b.example(feats + [("price", "price", 12.5)])).features.feature
    assert list(ex["user"].bytes_list.value) == [b"u7"] and "user:value" not in ex
    assert list(ex["tag"].bytes_list.value) == [b"x"] and list(ex["tag:value"].float_list.value) == [2.5]
    assert list(ex["price"].float_list.value) == [12.5]  # a binned field: the raw number
    # A request line without labels.
    assert b.parse("user:u7:1")[0] is None
    for bad, reason in ((b"1,0 user:u7", parsing.BAD_TOKEN), (b"1,0 user:u7:x", parsing.BAD_VALUE),
                        (b"", parsing.EMPTY)):
        with pytest.raises(parsing.ParseError) as err:
            b.parse(bad)
        assert err.value.reason == reason


def test_every_eval_line_featurizes_in_the_graph_as_its_etl_record(tiny_raw, tiny_etl):
    """libffm and libfm lines (item table joined in the graph, binned price, missing fields, unseen keys)
    map to exactly the rows and values of the ETL's records (multisets: shard order differs)."""
    raw_dir, _ = tiny_raw
    schema = load_schema(tiny_etl)
    want = collections.Counter()
    for features, _, _ in data.make_dataset(schema, "eval", 4096):
        want.update(_rows(features))
    fz = Featurizer(schema, raw_examples=True)
    field_map = examples_lib.read_field_map(os.path.join(raw_dir, "field_map.tsv"))
    for fmt, fmap in (("libffm", None), ("libfm", field_map)):
        b = examples_lib.ExampleBuilder(dataclasses.replace(schema, format=fmt), fmap)
        with open(os.path.join(raw_dir, f"eval.{fmt}"), "rb") as f:
            exs = [b.line_example(line)[1] for line in f.read().splitlines()]
        got = collections.Counter()
        for i in range(0, len(exs), 4096):
            got.update(_rows(fz.from_examples(tf.constant(exs[i:i + 4096]))))
        assert got == want, fmt
