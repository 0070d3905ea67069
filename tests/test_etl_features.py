"""Pure ETL transforms (etl/features.py, etl/tfrecord.py) on hand-derived values."""
from __future__ import annotations

import dataclasses

import pytest

from etl import features as feat
from etl import parsing, tfrecord
from etl.parsing import ParseError
from feature_schema import ExampleKeys, FieldSpec, Schema, LabelSpec, VocabEntry, feature_hash, field_hash

CAT = dict(kind="categorical", min_count=2, linear_only=False, source="log", multi_hot=False)


def test_row_features_and_entity_join():
    row = feat.row_features({"category": "c1", "brand": "", "price": "12.5"}, frozenset({"price"}))
    assert row == (("category", "c1", 1.0), ("price", "price", 12.5))  # empty brand: field missing
    table = {"i1": row, "i2": feat.row_features({"price": "abc"}, frozenset({"price"}))}
    feats = (("user", "u", 1.0), ("item", "i1", 1.0), ("item", "i9", 1.0))
    assert feat.join_entity(feats, "item", table) == feats + row  # i9 is not in the table: nothing added
    with pytest.raises(ParseError) as e:
        feat.join_entity((("item", "i2", 1.0),), "item", table)
    assert e.value.reason == parsing.BAD_DICTIONARY_VALUE


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


def test_sparse_example_bins_rare_missing():
    specs = [FieldSpec("user", 0, "categorical", 0, 2, 0), FieldSpec("price", 1, "binned", 2, 3, 2,
                                                                     bin_boundaries=(10.0, 20.0)),
             FieldSpec("age", 2, "numeric", 5, 2, 5)]
    vocab = [VocabEntry("user", "a", feature_hash("user", "a"), 1, 7), VocabEntry("price", "bin0", 11, 3, 4),
             VocabEntry("price", "bin2", 12, 4, 4), VocabEntry("age", "age", 13, 6, 9)]
    layout = feat.lookup_layout(specs, vocab)
    ex = feat.to_sparse_example((1.0,), [("user", "zz", 1.0), ("price", "price", 25.0)], layout)
    # zz is unknown -> user rare 0; 25 >= 20 -> bin2 (row 4, its vocabulary hash); age missing -> rare 5.
    assert ex.ids == (0, 4, 5) and ex.values == (1.0, 1.0, 1.0) and ex.fields == (0, 1, 2)
    assert ex.hashes == (feature_hash("user", "zz"), 12, feature_hash("age", feat.MISSING_KEY))
    ex = feat.to_sparse_example((0.0,), [("age", "age", 33.5), ("price", "price", 10.0)], layout, fill_missing=False)
    assert ex.ids == (6, 2) and ex.values == (33.5, 1.0)  # 10 -> bin1, not in the vocabulary -> price rare 2
    with pytest.raises(ParseError) as e:
        feat.to_sparse_example((0.0,), [("shop", "s", 1.0)], layout)
    assert e.value.reason == parsing.UNKNOWN_FIELD


def test_value_stats_and_quantile_resampling():
    # Values 1 (weight 1) and 3 (weight 3): mean 2.5, variance 0.75.
    s = feat.value_stats(4.0, 1.0 + 9.0, 1.0 + 27.0, 1.0, 3.0)
    assert s == {"count": 4.0, "mean": 2.5, "std": pytest.approx(0.75 ** 0.5), "min": 1.0, "max": 3.0}
    assert feat.resample_quantiles([0, 1, 2, 3, 4, 5, 6, 7, 8], 4) == [0, 2, 4, 6, 8]
    assert feat.boundaries_from_quantiles([1, 5, 5, 9, 12], 4) == (5.0, 9.0)


def test_tfrecord_frame_and_example_encoding_match_tensorflow(tmp_path):
    import gzip

    import tensorflow as tf

    keys = ExampleKeys()
    enc = tfrecord.ExampleEncoder(("click", "conversion"), keys)
    features = [("user", "a", 1.0), ("price", "price", 2.5)]
    hashes = [feature_hash("user", "a"), feature_hash("price", "price")]
    blobs = [tfrecord.frame(enc.encode(hashes, (1.0, 2.5), (field_hash("user"), field_hash("price")), (1.0, 0.0))),
             tfrecord.frame(feat.serialize_example((1.0, 0.0), features, ("click", "conversion"), keys)),
             tfrecord.frame(b"")]
    path = tmp_path / "x.tfrecord.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"".join(blobs))
    records = [r.numpy() for r in tf.data.TFRecordDataset([str(path)], compression_type="GZIP")]
    assert records[2] == b"" and records[0] == records[1]
    parsed = tf.train.Example.FromString(records[0]).features.feature
    assert list(parsed["feat_hashes"].int64_list.value) == hashes
    assert list(parsed["feat_field_hashes"].int64_list.value) == [field_hash("user"), field_hash("price")]
    assert list(parsed["feat_vals"].float_list.value) == [1.0, 2.5]
    assert list(parsed["click"].float_list.value) == [1.0] and list(parsed["conversion"].float_list.value) == [0.0]
