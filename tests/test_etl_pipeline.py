"""Beam ETL on the DirectRunner: transforms with TestPipeline/assert_that and whole jobs."""
from __future__ import annotations

import glob
import json
import os

import apache_beam as beam
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from etl import parsing, pipeline, transforms
from etl.config import EtlConfig, FieldConfig
from etl.parsing import Feature
from feature_schema import load_schema, read_vocabulary


def _reasons(records):
    return sorted(json.loads(r)["reason"] for r in records)


def test_parse_logs_routes_each_malformed_line_to_dead_letter():
    cfg = EtlConfig(input="unused", format="libffm", labels=("click", "conversion"), max_features=3,
                    strict_fields=True, fields=(FieldConfig("user"), FieldConfig("item")))
    lines = [b"1,0 user:a:1 item:x:2", b"", b"1,0 user:a:1 \xff", b"x,0 user:a:1", b"1 user:a:1",
             b"1,0 user:a", b"1,0 user:a:nan", b"1,0 user:a:1 user:b:1", b"1,0 shop:s:1",
             b"1,0 user:a:1 item:x:1 item:y:1 item:z:1"]
    with TestPipeline() as p:
        out = p | beam.Create(lines) | transforms.ParseLogs("train", cfg)
        assert_that(out.examples, equal_to([((1.0, 0.0), (Feature("user", "a", 1.0), Feature("item", "x", 2.0)))]),
                    label="good")
        assert_that(out.dead | beam.combiners.ToList() | beam.Map(_reasons), equal_to([sorted([
            parsing.EMPTY, parsing.NON_UTF8, parsing.BAD_LABEL, parsing.LABEL_COUNT, parsing.BAD_TOKEN,
            parsing.NON_FINITE, parsing.DUPLICATE_FIELD, parsing.UNKNOWN_FIELD, parsing.TOO_MANY_FEATURES])]),
            label="dead")


def test_dead_letter_keeps_exact_raw_bytes():
    import base64
    rec = json.loads(transforms.dead_letter("train", b"1 a:\xff\n", "non_utf8", "x"))
    assert base64.b64decode(rec["line_b64"]) == b"1 a:\xff\n"
    assert rec["line"] == "1 a:\\xff" and rec["reason"] == "non_utf8" and rec["split"] == "train"


def test_count_features_and_bins_with_test_pipeline():
    examples = [((1.0,), (Feature("user", "a", 1.0), Feature("price", "price", float(v)))) for v in range(1, 101)]
    with TestPipeline() as p:
        pc = p | beam.Create(examples)
        counts = pc | transforms.CountFeatures()
        bounds = pc | transforms.ComputeBinBoundaries({"price": 4})
        assert_that(counts | beam.Filter(lambda kv: kv[0][0] == "user"), equal_to([(("user", "a"), 100)]),
                    label="counts")
        # Quartiles of 1..100: min 1, edges at 25, 50, 75 (approximately, exact on this small input), max 100.
        assert_that(bounds, equal_to([("price", (25.0, 50.0, 75.0))]), label="bounds")


def _write(path, lines):
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")


def _read_examples(out, split):
    files = sorted(glob.glob(os.path.join(out, split, "part-*.tfrecord.gz")))
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP")
    return [tf.train.Example.FromString(r.numpy()) for r in ds]


def _run(cfg):
    with beam.Pipeline() as p:
        pipeline.build_pipeline(p, cfg)
    return pipeline.write_schema(cfg)


def test_rare_ids_vocabulary_and_sparse_examples_hand_derived(tmp_path):
    train = tmp_path / "train.libffm"
    evalf = tmp_path / "eval.libffm"
    _write(train, [b"1 user:a:1 item:x:1", b"0 user:a:1 item:y:1", b"0 user:b:1 item:x:1",
                   b"not a line", b"1 user:a:1 item:x:1", b"0 user:a:1"])
    _write(evalf, [b"1 user:b:1 item:x:1", b"0 user:new:1 item:x:1"])
    out = str(tmp_path / "out")
    cfg = EtlConfig(input=str(train), eval_input=str(evalf), format="libffm", out=out, min_count=2,
                    num_shards=1, fields=(FieldConfig("user"), FieldConfig("item")))
    schema = _run(cfg)
    # user: a (4x) kept, b (1x) rare; item: x (3x) kept, y (1x) rare. Rows: user rare 0, a 1; item rare 2, x 3.
    assert [(f.name, f.offset, f.vocab_size) for f in schema.fields] == [("user", 0, 2), ("item", 2, 2)]
    assert schema.num_features == 4
    assert schema.counts["train"] == {"read": 6, "written": 5, "dead_lettered": 1}
    assert schema.counts["eval"] == {"read": 2, "written": 2, "dead_lettered": 0}
    assert schema.labels[0].positives == 2 and abs(schema.labels[0].positive_rate - 0.4) < 1e-9
    vocab = read_vocabulary(schema.vocabulary_file())
    assert [(v.field, v.key, v.index, v.count) for v in vocab] == [("user", "a", 1, 4), ("item", "x", 3, 3)]
    ids = sorted(tuple(e.features.feature["feat_ids"].int64_list.value) for e in _read_examples(out, "train"))
    # The last line has no item: the missing field is filled with item's rare id 2.
    assert ids == sorted([(1, 3), (1, 2), (0, 3), (1, 3), (1, 2)])
    eval_ids = sorted(tuple(e.features.feature["feat_ids"].int64_list.value) for e in _read_examples(out, "eval"))
    assert eval_ids == [(0, 3), (0, 3)]  # b and the unseen "new" are both user-rare
    dead = [json.loads(line) for line in open(glob.glob(os.path.join(out, "dead_letter", "train-*"))[0])]
    assert [(d["reason"], d["line"]) for d in dead] == [(parsing.BAD_LABEL, "not a line")]


def test_generated_log_with_entity_join_and_bins(tiny_etl, tiny_raw):
    _, truth = tiny_raw
    schema = load_schema(tiny_etl)
    assert [f.name for f in schema.fields] == ["user", "item", "category", "brand", "price", "position", "hour",
                                               "device", "query"]
    assert schema.field("category").source == "dict:items"
    assert schema.field("position").linear_only
    price = schema.field("price")
    # Up to 9 edges for 10 bins; tied quantiles (popular items share a price) merge.
    assert price.kind == "binned" and 5 <= len(price.bin_boundaries) <= 9
    assert all(a < b for a, b in zip(price.bin_boundaries, price.bin_boundaries[1:]))
    assert price.vocab_size <= 1 + len(price.bin_boundaries) + 1
    for split, n in (("train", truth["config"]["n_train"]), ("eval", truth["config"]["n_eval"])):
        c = schema.counts[split]
        assert c["read"] == n == c["written"] + c["dead_lettered"]
    assert schema.label_names == ("click", "conversion")
    # Every example carries all 9 fields once (entity join + missing-field fill).
    ex = _read_examples(tiny_etl, "eval")[0]
    assert sorted(ex.features.feature["feat_fields"].int64_list.value) == list(range(9))


def test_libfm_with_field_map_gives_same_fields_as_libffm(tiny_raw, tmp_path):
    raw, _ = tiny_raw
    cfg = EtlConfig(input=os.path.join(raw, "train.libfm"), eval_input=os.path.join(raw, "eval.libfm"),
                    format="libfm", field_map=os.path.join(raw, "field_map.tsv"), labels=("click", "conversion"),
                    out=str(tmp_path / "fm"), num_shards=1)
    schema = _run(cfg)
    assert sorted(f.name for f in schema.fields) == ["device", "hour", "item", "position", "query", "user"]
    assert schema.counts["train"]["dead_lettered"] == 0
