"""Pure ETL transforms (etl/features.py, etl/tfrecord.py) on hand-derived values."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from etl import features as feat
from etl import parsing, tfrecord
from etl.parsing import ParseError
from feature_schema import ExampleKeys, FieldSpec, LabelSpec, Schema, VocabEntry, feature_hash, field_hash
from feature_schema.rules import bin_index, singleton_edge

CAT = dict(kind="categorical", min_count=2, linear_only=False, source="log", multi_hot=False)


def test_table_rows_and_entity_join():
    row = feat.table_row({"category": "c1", "brand": "", "price": "12.5"}, frozenset({"price"}))
    assert row == ("c1", None, 12.5)  # empty brand: the field will be missing
    cols = ("category", "brand", "price")
    table = {"i1": row, "i2": feat.table_row({"category": "c2", "brand": "b", "price": "abc"}, frozenset({"price"})),
             "i3": feat.table_row({"category": "c3", "brand": "b", "price": "1e39"}, frozenset({"price"}))}
    feats = (("user", "u", 1.0), ("item", "i1", 1.0), ("item", "i9", 1.0))
    # i1 adds its category and price (key: the field name); i9 is not in the table: nothing added.
    assert feat.join_entity(feats, "item", table, cols) == feats + (("category", "c1", 1.0), ("price", "price", 12.5))
    for item in ("i2", "i3"):  # not a number; beyond float32
        with pytest.raises(ParseError) as e:
            feat.join_entity((("item", item, 1.0),), "item", table, cols)
        assert e.value.reason == parsing.BAD_DICTIONARY_VALUE and item in str(e.value)


def test_finish_checks_and_normalizes_value_fields():
    proc = feat.LineProcessor(feat.LineSpec(max_features=3, known_fields=frozenset({"user", "age", "tag"}),
                                            multi_hot=frozenset({"tag"}), value_fields=frozenset({"age"})))
    assert proc.finish([("user", "u", 1.0), ("age", "x", 33.0), ("tag", "a", 1.0)]) == (
        ("user", "u", 1.0), ("age", "age", 33.0), ("tag", "a", 1.0))
    for feats, reason in (([("tag", "a", 1.0)] * 4, parsing.TOO_MANY_FEATURES),
                          ([("user", "u", 1.0), ("user", "v", 1.0)], parsing.DUPLICATE_FIELD),
                          ([("shop", "s", 1.0)], parsing.UNKNOWN_FIELD)):
        with pytest.raises(ParseError) as e:
            proc.finish(feats)
        assert e.value.reason == reason


def test_split_by_key_and_by_line():
    proc = feat.LineProcessor(feat.LineSpec(split="key", split_key="user", eval_percent=30))
    for u in range(50):
        expected = 1 if feature_hash("user", f"u{u}") % 100 < 30 else 0
        # Whatever the rest of the line, the user decides.
        assert proc.split_of(b"raw1", [("item", "i1", 1.0), ("user", f"u{u}", 1.0)]) == expected
        assert proc.split_of(b"raw2", [("user", f"u{u}", 1.0)]) == expected
    # No user feature (or a bad line): the raw line's hash decides, as in the default mode.
    assert proc.split_of(b"1 item:i:1", [("item", "i", 1.0)]) == feat.line_split(b"1 item:i:1", 30)


def test_valid_carve_uses_digits_the_eval_test_does_not_read():
    # h = 1234567 * 100 + 42: eval iff 42 < eval_percent; valid iff 4567 < valid_per_10k.
    h = 123456742
    assert feat.hash_split(h, 50) == feat.EVAL
    assert feat.hash_split(h, 40, valid_per_10k=4568) == feat.VALID
    assert feat.hash_split(h, 40, valid_per_10k=4567) == feat.TRAIN
    assert feat.hash_split(h, 40) == feat.TRAIN
    # With eval given by its own file (split "path") the eval test is off: only the carve applies.
    lines = [f"1 f:k{i}:1".encode() for i in range(2000)]
    by_path = feat.LineProcessor(feat.LineSpec(split="path", eval_percent=20, valid_per_10k=1000))
    splits = [by_path.split_of(raw) for raw in lines]
    assert set(splits) == {feat.TRAIN, feat.VALID}
    assert splits == [feat.VALID if (feat.line_hash(raw) // 100) % 10000 < 1000 else feat.TRAIN for raw in lines]
    assert 150 <= splits.count(feat.VALID) <= 250  # a tenth of 2000, within 3.5 sd


def _settings(names, **over):
    return {n: dict(CAT, **over) for n in names}


def test_assign_vocabulary_hand_derived():
    counts = [(("user", "a"), 5), (("user", "b"), 1), (("user", "c"), 5), (("item", "x"), 2), (("item", "y"), 3)]
    specs, vocab = feat.assign_vocabulary(counts, ["user", "item"], _settings(["user", "item"]))
    # user: rare 0, a 1, c 2 (tie on count -> key order); item: rare 3, y 4 (3x), x 5 (2x).
    assert [(s.name, s.offset, s.vocab_size) for s in specs] == [("user", 0, 3), ("item", 3, 3)]
    assert [(v.field, v.key, v.index, v.count) for v in vocab] == [
        ("user", "a", 1, 5), ("user", "c", 2, 5), ("item", "y", 4, 3), ("item", "x", 5, 2)]


def test_extend_vocabulary_keeps_old_rows_and_appends():
    base_specs, base_vocab = feat.assign_vocabulary(
        [(("user", "a"), 5), (("user", "c"), 4), (("item", "x"), 2)], ["user", "item"], _settings(["user", "item"]))
    # Base rows: user rare 0, a 1, c 2; item rare 3, x 4 (5 rows).
    new_counts = [(("user", "c"), 9), (("user", "d"), 3), (("user", "e"), 1), (("item", "z"), 2), (("item", "w"), 2),
                  (("query", "q1"), 4)]
    specs, vocab = feat.extend_vocabulary(base_specs, base_vocab, new_counts, ["user", "item", "query"],
                                          _settings(["user", "item", "query"]))
    rows = {(v.field, v.key): (v.index, v.count) for v in vocab}
    # Old rows unchanged (counts add up); d -> 5; item w, z -> 6, 7 (count tie: key order); e is rare;
    # the new field query gets rare row 8 and q1 -> 9.
    assert rows == {("user", "a"): (1, 5), ("user", "c"): (2, 13), ("item", "x"): (4, 2),
                    ("user", "d"): (5, 3), ("item", "w"): (6, 2), ("item", "z"): (7, 2), ("query", "q1"): (9, 4)}
    assert [(s.name, s.id, s.offset, s.vocab_size, s.extra_ranges) for s in specs] == [
        ("user", 0, 0, 3, ((5, 1),)), ("item", 1, 3, 2, ((6, 2),)), ("query", 2, 8, 2, ())]
    schema = Schema(fields=tuple(specs), labels=(LabelSpec("click", 0.5),), num_features=10,
                    max_features_per_example=3)
    assert schema.rare_ids == (0, 3, 8) and [s.num_rows for s in specs] == [4, 4, 2]
    overlapping = (specs[0], dataclasses.replace(specs[1], extra_ranges=((5, 3),)), specs[2])
    with pytest.raises(ValueError, match="gap or overlap"):  # blocks must tile the rows
        Schema(fields=overlapping, labels=(LabelSpec("click", 0.5),), num_features=10, max_features_per_example=3)


def _lower_quantiles(values):
    """m -> [min, q_1 .. q_{m-1}, max]: q_j the first value whose cumulative count exceeds (j*W - 1)/m
    (W values with weight 1), the rule of Beam's ApproximateQuantiles on a small input."""
    values = sorted(values)

    def quantiles(m):
        if not values:
            return []
        w = len(values)
        return [values[0]] + [next(v for i, v in enumerate(values, 1) if i > (j * w - 1) / m)
                              for j in range(1, m)] + [values[-1]]
    return quantiles


def test_bin_edges_zero_inflated_field_hand_derived():
    # 14 zeros (70%) and 1..6, 4 bins: 0 holds >= 1/4 of the rows, so it is heavy and gets its own
    # bin. It is the minimum, so its lower edge is left out: bin 0 = (-inf, next(0)) holds only 0.
    # The other 6 values share m = 4 - 1 = 3 bins at their lower quantiles j*6/3 (j = 1, 2):
    # the first value with rank > 5/3 is 2, with rank > 11/3 is 4.
    positives = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    edges = feat.bin_edges(4, 0.0, 6.0, [0.0], {1}, _lower_quantiles(positives))
    assert edges == (singleton_edge(0.0), 2.0, 4.0)
    values = [0.0] * 14 + positives
    assert [bin_index(v, edges) for v in values] == [0] * 14 + [1, 2, 2, 3, 3, 3]
    # Equal-frequency edges alone (no heavy rule) are the lower quantiles of all 20 values: j*20/4
    # -> ranks > 4.75, 9.75, 14.75 -> 0, 0, 1: one edge 0 (ties merge) and all zeros in one bin with
    # nothing below it, the collapse the heavy rule prevents.
    assert _lower_quantiles(values)(4)[1:-1] == [0.0, 0.0, 1.0]


def test_bin_edges_heavy_values_inside_at_the_top_and_side_by_side():
    # Heavy 5 inside (values on both sides): edges 5 and next(5). With 4 bins: m = 3 would give
    # 2 quantile edges + 2 = 5 bins, so m drops to 2: one edge, the median of the others.
    others = [1.0, 2.0, 3.0, 7.0, 8.0, 9.0]
    edges = feat.bin_edges(4, 1.0, 9.0, [5.0], {0, 1}, _lower_quantiles(others))
    # m = 2 on 6 values: the first value with rank > 5/2 is 3. Bins {1, 2}, {3}, {5}, {7, 8, 9}.
    assert edges == (3.0, 5.0, singleton_edge(5.0))
    # Heavy maximum: no upper edge (nothing above it). m = 2 on 4 values: rank > 3/2 -> 2.
    assert feat.bin_edges(3, 1.0, 9.0, [9.0], {0}, _lower_quantiles([1.0, 2.0, 3.0, 4.0])) == (2.0, 9.0)
    # Only heavy values, side by side (a field with three values): one edge between each pair.
    assert feat.bin_edges(10, 0.0, 2.0, [0.0, 1.0, 2.0], set(), _lower_quantiles([])) == (1.0, 2.0)
    # Edges are strictly increasing float32 numbers everywhere.
    for e in (edges, feat.bin_edges(5, -3.0, 3.0, [-1.5, 0.0], {0, 1, 2}, _lower_quantiles([-3.0, -2.0, 1.0, 3.0]))):
        assert all(a < b for a, b in zip(e, e[1:]))
        assert all(float(np.float32(x)) == x for x in e)


def test_record_encoder_lists_cache_and_bytes():
    enc = feat.RecordEncoder(("click",), ExampleKeys(), max_cached=2)
    feats = (("user", "u1", 1.0), ("price", "price", 12.5), ("user", "u2", 0.5), ("item", "i1", 1.0))
    expected = ([feature_hash("user", "u1"), feature_hash("price", "price"), feature_hash("user", "u2"),
                 feature_hash("item", "i1")], [1.0, 12.5, 0.5, 1.0],
                [field_hash("user"), field_hash("price"), field_hash("user"), field_hash("item")])
    assert enc.lists(feats) == expected
    assert enc.lists(feats) == expected  # again, through a cache that was cleared on the way
    parsed = tfrecord.Example.FromString(enc.encode((1.0,), feats)).features.feature
    assert (list(parsed["feat_hashes"].int64_list.value), list(parsed["feat_vals"].float_list.value),
            list(parsed["feat_field_hashes"].int64_list.value)) == expected
    assert list(parsed["click"].float_list.value) == [1.0]


def test_field_usage_and_single_row_warnings():
    specs = [FieldSpec("user", 0, "categorical", 0, 3, 0, min_count=2),
             FieldSpec("device", 1, "categorical", 3, 2, 3),
             FieldSpec("price", 2, "binned", 5, 2, 5, bin_boundaries=(10.0,)),
             FieldSpec("age", 3, "numeric", 7, 2, 7, value_stats={"count": 4.0, "mean": 30.0, "std": 0.0,
                                                                 "min": 30.0, "max": 30.0}),
             FieldSpec("promo", 4, "categorical", 9, 1, 9),
             FieldSpec("tag", 5, "categorical", 10, 2, 10, multi_hot=True)]
    vocab = [VocabEntry("user", "a", 1, 1, 2), VocabEntry("user", "b", 2, 2, 2), VocabEntry("device", "d1", 3, 4, 4),
             VocabEntry("price", "bin1", 4, 6, 4), VocabEntry("age", "age", 5, 8, 4), VocabEntry("tag", "t", 6, 11, 5)]
    counts = {("user", "a"): 2, ("user", "b"): 2, ("device", "d1"): 4, ("price", "bin1"): 4, ("age", "age"): 4,
              ("tag", "t"): 5}
    occurrences = {"user": 4, "device": 4, "price": 4, "age": 4, "tag": 5}
    usage = feat.field_usage(specs, vocab, counts, occurrences, {"tag": 3})
    assert usage["user"] == {"rows": 2, "rows_count": 4, "top": ["a", 2], "occurrences": 4, "lines": 4}
    assert usage["tag"]["lines"] == 3 and usage["promo"] == {"rows": 0, "rows_count": 0, "top": None,
                                                            "occurrences": 0, "lines": 0}
    warnings = feat.single_row_warnings(specs, usage, train_lines=4)
    # user: two rows. device: one key in every line. price: every value in bin1. age: std 0, never
    # missing. promo: missing everywhere (its rare row only). tag: one key, but missing from one line.
    assert [w.split(":")[0] for w in warnings] == ["field 'device'", "field 'price'", "field 'age'", "field 'promo'"]
    assert "every training line has key 'd1'" in warnings[0] and "all 4 training values in bin1" in warnings[1]
    assert "missing from every training line" in warnings[3]


def test_value_stats():
    # Values 1 (weight 1) and 3 (weight 3): mean 2.5, variance 0.75.
    s = feat.value_stats(4.0, 1.0 + 9.0, 1.0 + 27.0, 1.0, 3.0)
    assert s == {"count": 4.0, "mean": 2.5, "std": pytest.approx(0.75 ** 0.5), "min": 1.0, "max": 3.0}


def test_tfrecord_frame_and_version_2_example_encoding_match_tensorflow(tmp_path):
    import gzip

    import tensorflow as tf

    keys = ExampleKeys()
    enc = tfrecord.ExampleEncoder(("click", "conversion"), keys)
    blobs = [tfrecord.frame(enc.encode([-5, 2 ** 62], [1.0, 0.1], [7, -8], (1.0, 0.0))),
             tfrecord.frame(enc.encode([3], [2.5], [9], (0.0, 1.0))), tfrecord.frame(b"")]
    path = tmp_path / "x.tfrecord.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"".join(blobs))
    records = [r.numpy() for r in tf.data.TFRecordDataset([str(path)], compression_type="GZIP")]
    assert records[2] == b""
    parsed = tf.train.Example.FromString(records[0]).features.feature
    assert sorted(parsed.keys()) == ["click", "conversion", "feat_field_hashes", "feat_hashes", "feat_vals"]
    assert list(parsed["feat_hashes"].int64_list.value) == [-5, 2 ** 62]
    assert list(parsed["feat_field_hashes"].int64_list.value) == [7, -8]
    # A FloatList holds float32: 0.1 becomes the float32 nearest to it.
    assert list(parsed["feat_vals"].float_list.value) == [1.0, pytest.approx(0.1, rel=1e-7)]
    assert list(parsed["click"].float_list.value) == [1.0] and list(parsed["conversion"].float_list.value) == [0.0]
    second = tf.train.Example.FromString(records[1]).features.feature  # the reused message holds no leftovers
    assert list(second["feat_hashes"].int64_list.value) == [3] and list(second["conversion"].float_list.value) == [1.0]
