"""The featurization layer against hand-computed rows, bins, scaling and missing fields."""
from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from feature_schema import EntityTableSpec, FieldSpec, LabelSpec, Schema, VocabEntry, feature_hash, field_hash
from feature_schema import rules
from featurization import Featurizer, fingerprint_int64
from featurization.layer import PAD_FIELD_HASH
from serving import protocol

from conftest import tf1_run

# user: rare 0, u1 -> 1, u2 -> 2.  price (binned, edges 1.0, 2.5): rare 3, bin0 -> 4, bin2 -> 5 (bin1 was
# rare in training).  age (numeric, mean 30, std 10): rare 6, age -> 7.  tag (multi-hot): rare 8, t1 -> 9.
FIELDS = (FieldSpec("user", 0, "categorical", 0, 3, 0),
          FieldSpec("price", 1, "binned", 3, 3, 3, bin_boundaries=(1.0, 2.5)),
          FieldSpec("age", 2, "numeric", 6, 2, 6, value_stats={"count": 4, "mean": 30.0, "std": 10.0,
                                                               "min": 10.0, "max": 50.0}),
          FieldSpec("tag", 3, "categorical", 8, 2, 8, multi_hot=True))
VOCAB = [VocabEntry("user", "u1", feature_hash("user", "u1"), 1, 9),
         VocabEntry("user", "u2", feature_hash("user", "u2"), 2, 5),
         VocabEntry("price", "bin0", feature_hash("price", "bin0"), 4, 7),
         VocabEntry("price", "bin2", feature_hash("price", "bin2"), 5, 6),
         VocabEntry("age", "age", feature_hash("age", "age"), 7, 4),
         VocabEntry("tag", "t1", feature_hash("tag", "t1"), 9, 3)]


def _schema(fields=FIELDS, **kw):
    return Schema(fields=fields, labels=(LabelSpec("click", 0.5),), num_features=sum(f.vocab_size for f in fields),
                  max_features_per_example=5, **kw)


def _records(examples):
    """Sparse (hashes, values, field hashes) of examples given as [(field, key, value)] lists."""
    idx, h, v, fh = [], [], [], []
    for b, ex in enumerate(examples):
        for j, (field, key, value) in enumerate(ex):
            idx.append([b, j])
            h.append(feature_hash(field, key))
            v.append(value)
            fh.append(field_hash(field))
    width = max([len(ex) for ex in examples] + [0])
    shape = [len(examples), width]
    idx = np.array(idx, np.int64).reshape([-1, 2])
    return (tf.SparseTensor(idx, np.array(h, np.int64), shape), tf.SparseTensor(idx, np.array(v, np.float32), shape),
            tf.SparseTensor(idx, np.array(fh, np.int64), shape))


def _triples(out):
    """Per example: [(row, value, field id)] in the order of the sparse entries."""
    ids, vals, fields = (out[k] for k in ("ids", "values", "fields"))
    rows = [[] for _ in range(int(ids.dense_shape[0]))]
    for (b, _), r, v, f in zip(ids.indices.numpy(), ids.values.numpy(), vals.values.numpy(), fields.values.numpy()):
        rows[b].append((int(r), round(float(v), 6), int(f)))
    return rows


def test_rows_bins_scaling_and_missing_fields_by_hand():
    fz = Featurizer(_schema(), VOCAB)
    out = fz.from_records(*_records([
        [("user", "u1", 1.0), ("price", "price", 2.5), ("age", "age", 40.0), ("tag", "t1", 1.0), ("tag", "t9", 1.0)],
        [("user", "u9", 2.0), ("price", "price", 0.5)],
        [],
        [("price", "price", 1.0), ("age", "age", 25.0), ("user", "u2", 1.0)],
    ]))
    assert _triples(out) == [
        # 2.5 is an edge: bins are lower-inclusive, so it is bin 2; age (40 - 30) / 10 = 1.
        [(1, 1.0, 0), (5, 1.0, 1), (7, 1.0, 2), (9, 1.0, 3), (8, 1.0, 3)],
        # unseen user -> rare row, value kept; bin 0; missing age -> rare row, value 0 (the mean); missing tag.
        [(0, 2.0, 0), (4, 1.0, 1), (6, 0.0, 2), (8, 1.0, 3)],
        # nothing present: every field's missing row, in field order.
        [(0, 1.0, 0), (3, 1.0, 1), (6, 0.0, 2), (8, 1.0, 3)],
        # 1.0 is the first edge -> bin 1, rare in training -> price's rare row; (25 - 30) / 10 = -0.5.
        [(3, 1.0, 1), (7, -0.5, 2), (2, 1.0, 0), (8, 1.0, 3)],
    ]
    assert out["ids"].dense_shape.numpy().tolist() == [4, 5]


def test_without_fill_missing_only_the_features_are_mapped():
    fz = Featurizer(_schema(fill_missing=False), VOCAB)
    out = fz.from_records(*_records([[("user", "u2", 1.0)], [("tag", "t1", 1.0), ("age", "age", 10.0)]]))
    assert _triples(out) == [[(2, 1.0, 0)], [(9, 1.0, 3), (7, -2.0, 2)]]


def test_log1p_scaling():
    stats = {"count": 2, "mean": 1.0, "std": 0.5, "min": 0.0, "max": 9.0}
    fields = (FieldSpec("gain", 0, "numeric", 0, 2, 0, value_stats=stats, transform="log1p"),)
    fz = Featurizer(_schema(fields), [VocabEntry("gain", "gain", feature_hash("gain", "gain"), 1, 2)])
    out = _triples(fz.from_records(*_records([[("gain", "gain", 99_999.0)], [("gain", "gain", -1.0)]])))
    want = [(math.log1p(99_999.0) - 1.0) / 0.5, (-math.log1p(1.0) - 1.0) / 0.5]
    assert [r[0][0] for r in out] == [1, 1]
    np.testing.assert_allclose([r[0][1] for r in out], want, rtol=1e-5)
    assert [rules.scale_value(v, "log1p", 1.0, 0.5) for v in (99_999.0, -1.0)] == pytest.approx(want)


def test_bins_agree_with_the_documented_python_rule():
    edges = (-1.5, 0.0, rules.singleton_edge(0.0), 2.25, 10.0)  # 0.0 alone in bin 2
    fields = (FieldSpec("x", 0, "binned", 0, 7, 0, bin_boundaries=edges),)
    vocab = [VocabEntry("x", rules.bin_key(i), feature_hash("x", rules.bin_key(i)), 1 + i, 1) for i in range(6)]
    fz = Featurizer(_schema(fields), vocab)
    rng = np.random.default_rng(0)
    values = np.concatenate([np.array(edges, np.float32), [-3.0, -0.0, 1e-30, 1e-40, -1e-40, 5.0, 1e9],
                             rng.normal(0, 5, 200).astype(np.float32)]).astype(np.float32)
    out = _triples(fz.from_records(*_records([[("x", "x", float(v))] for v in values])))
    got = [r[0][0] - 1 for r in out]
    assert got == [rules.bin_index(rules.to_float32(float(v)), edges) for v in values]
    assert got[:5] == [1, 2, 3, 4, 5]  # each edge opens its bin


def test_unknown_field_hash_is_an_error_naming_it():
    fz = Featurizer(_schema(), VOCAB)
    with pytest.raises(tf.errors.InvalidArgumentError, match=str(field_hash("city"))):
        fz.from_records(*_records([[("city", "c1", 1.0)]]))


def _dense_records(examples):
    """Dense (hashes, values, field hashes) ``[batch, L]`` of examples, padded as ``trainer.data`` parses."""
    width = max([len(ex) for ex in examples] + [0])
    h, v, fh = (np.zeros([len(examples), width], dt) for dt in (np.int64, np.float32, np.int64))
    fh[:] = PAD_FIELD_HASH
    for b, ex in enumerate(examples):
        for j, (field, key, value) in enumerate(ex):
            h[b, j], v[b, j], fh[b, j] = feature_hash(field, key), value, field_hash(field)
    return tf.constant(h), tf.constant(v), tf.constant(fh)


HAND_EXAMPLES = [
    [("user", "u1", 1.0), ("price", "price", 2.5), ("age", "age", 40.0), ("tag", "t1", 1.0), ("tag", "t9", 1.0)],
    [("user", "u9", 2.0), ("price", "price", 0.5)],
    [],
    [("price", "price", 1.0), ("age", "age", 25.0), ("user", "u2", 1.0)],
]


def test_dense_layout_by_hand():
    """The same four examples as the sparse layout's hand test: user, price, age (single-valued) as
    [4, 3] columns in field order, the multi-hot tag sparse with its missing rows."""
    out = Featurizer(_schema(), VOCAB).from_dense_records(*_dense_records(HAND_EXAMPLES))
    assert out["dense_ids"].numpy().tolist() == [[1, 5, 7], [0, 4, 6], [0, 3, 6], [2, 3, 7]]
    np.testing.assert_allclose(out["dense_values"].numpy(), [[1, 1, 1], [2, 1, 0], [1, 1, 0], [1, 1, -0.5]])
    assert out["dense_fields"].numpy().tolist() == [[0, 1, 2]] * 4
    assert _triples(out) == [[(9, 1.0, 3), (8, 1.0, 3)], [(8, 1.0, 3)], [(8, 1.0, 3)], [(8, 1.0, 3)]]
    assert out["ids"].dense_shape.numpy().tolist() == [4, 2]


def _as_sorted_triples(out):
    """Per example: sorted [(row, value, field)] of both parts of a dense-layout batch (or a sparse one)."""
    rows = _triples(out)
    if "dense_ids" in out:
        for b, (i, v, f) in enumerate(zip(*(out[k].numpy() for k in ("dense_ids", "dense_values", "dense_fields")))):
            rows[b] += [(int(r), round(float(x), 6), int(g)) for r, x, g in zip(i, v, f)]
    return [sorted(r) for r in rows]


def test_dense_layout_has_the_sparse_layouts_features():
    rng = np.random.default_rng(3)
    keys = {"user": ["u1", "u2", "u7"], "price": ["price"], "age": ["age"], "tag": ["t1", "t2"]}
    examples = []
    for _ in range(64):  # each single-valued field present or missing, 0-3 tags, shuffled order
        ex = [(f, str(rng.choice(k)), float(rng.normal(20, 10))) for f, k in keys.items() if f != "tag"
              and rng.random() < 0.7]
        ex += [("tag", str(rng.choice(keys["tag"])), 1.0) for _ in range(rng.integers(0, 4))]
        examples.append([ex[i] for i in rng.permutation(len(ex))])
    fz = Featurizer(_schema(), VOCAB)
    dense = fz.from_dense_records(*_dense_records(examples))
    assert _as_sorted_triples(dense) == _as_sorted_triples(fz.from_records(*_records(examples)))


def test_dense_layout_refuses_repeats_of_a_single_valued_field_and_unknown_fields():
    fz = Featurizer(_schema(), VOCAB)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not multi_hot"):
        fz.from_dense_records(*_dense_records([[("user", "u1", 1.0)], [("user", "u1", 1.0), ("user", "u2", 1.0)]]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=str(field_hash("city"))):
        fz.from_dense_records(*_dense_records([[("city", "c1", 1.0)]]))
    with pytest.raises(ValueError, match="fill_missing"):
        Featurizer(_schema(fill_missing=False), VOCAB).from_dense_records(*_dense_records([[("user", "u1", 1.0)]]))


def test_fingerprint_matches_the_python_hash():
    keys = ["user=u1", "tag=", "城市=北京", "price=price"]
    got = fingerprint_int64(tf.constant(keys)).numpy().tolist()
    assert got == [feature_hash(*k.split("=", 1)) for k in keys]


def test_saved_model_round_trip_through_the_tf1_loader(tmp_path):
    fz = Featurizer(_schema(), VOCAB)

    class Module(tf.Module):
        def __init__(self):
            super().__init__()
            self.fz = fz

        @tf.function(input_signature=[tf.SparseTensorSpec([None, None], tf.int64),
                                      tf.SparseTensorSpec([None, None], tf.float32),
                                      tf.SparseTensorSpec([None, None], tf.int64)])
        def rows(self, h, v, f):
            out = self.fz.from_records(h, v, f)
            return {"ids": tf.sparse.to_dense(out["ids"], default_value=-1),
                    "values": tf.sparse.to_dense(out["values"])}

    m = Module()
    recs = _records([[("user", "u1", 1.0), ("price", "price", 3.0)], [("age", "age", 50.0)]])
    want = {k: t.numpy() for k, t in m.rows(*recs).items()}
    path = str(tmp_path / "fz")
    tf.saved_model.save(m, path, signatures={"serving_default": m.rows.get_concrete_function()})
    # A SparseTensor input is flattened into three inputs: indices, values, dense_shape.
    got = tf1_run(path, {name + suffix: part.numpy() for name, t in zip(("h", "v", "f"), recs)
                         for suffix, part in (("", t.indices), ("_1", t.values), ("_2", t.dense_shape))})
    assert want["ids"].tolist() == [[1, 5, 6, 8], [7, 0, 3, 8]]  # own features first, then the missing ones
    np.testing.assert_allclose(want["values"], [[1, 1, 0, 1], [2, 1, 1, 1]])
    np.testing.assert_array_equal(got["ids"], want["ids"])
    np.testing.assert_allclose(got["values"], want["values"])


def _raw_featurizer(tmp_path):
    """The hand schema plus an entity table user -> age (numeric) joined in the graph."""
    table = tmp_path / "users.tsv"
    table.write_text("user\tage\nu1\t40\nu2\t\n", encoding="utf-8")
    schema = _schema(entity_tables=(EntityTableSpec("users", str(table), "user", "user", ("age",)),))
    return Featurizer(schema, VOCAB, raw_examples=True)


def _raw(features):
    return tf.constant([protocol.raw_example(f, {"price", "age"}) for f in features])


def test_raw_examples_by_hand_with_joins_values_and_multi_hot(tmp_path):
    fz = _raw_featurizer(tmp_path)
    out = fz.from_examples(_raw([
        # u1's age (40) joins from the table: (40 - 30) / 10 = 1; tags with values 2 and 0.5.
        [("user", "u1", 1.0), ("price", "price", 2.5), ("tag", "t1", 2.0), ("tag", "t9", 0.5)],
        # The Example's own age wins over the table's; u2's table cell is empty anyway.
        [("user", "u1", 1.0), ("age", "age", 10.0)],
        [("user", "u2", 3.0)],  # empty cell: age missing (value 0); user value 3 kept
        [],
    ]))
    assert _triples(out) == [
        # Order: categorical fields, then binned/numeric ones, then joined columns, then missing.
        [(1, 1.0, 0), (9, 2.0, 3), (8, 0.5, 3), (5, 1.0, 1), (7, 1.0, 2)],
        [(1, 1.0, 0), (7, -2.0, 2), (3, 1.0, 1), (8, 1.0, 3)],
        [(2, 3.0, 0), (3, 1.0, 1), (6, 0.0, 2), (8, 1.0, 3)],
        [(0, 1.0, 0), (3, 1.0, 1), (6, 0.0, 2), (8, 1.0, 3)],
    ]


def test_raw_batch_of_many_examples_keeps_their_order(tmp_path):
    """12 Examples (ParseExample would cut 8 or more into minibatches): each row is its own Example's."""
    fz = _raw_featurizer(tmp_path)
    rows = [[("user", "u1", 1.0), ("tag", "t1", 2.0)], [], [("user", "u2", 3.0), ("price", "price", 2.5)]] * 4
    out = _triples(fz.from_examples(_raw(rows)))
    # Read off the test above: u1 joins age 40 -> (7, 1.0); price missing -> row 3, tag missing -> row 8;
    # u2 (value 3) has an empty age cell -> row 6, value 0; price 2.5 -> bin row 5.
    assert out == [
        [(1, 1.0, 0), (9, 2.0, 3), (7, 1.0, 2), (3, 1.0, 1)],
        [(0, 1.0, 0), (3, 1.0, 1), (6, 0.0, 2), (8, 1.0, 3)],
        [(2, 3.0, 0), (5, 1.0, 1), (6, 0.0, 2), (8, 1.0, 3)],
    ] * 4


def test_raw_field_of_the_wrong_type_is_refused_naming_it(tmp_path):
    fz = _raw_featurizer(tmp_path)
    ex = tf.train.Example()
    ex.features.feature["price"].bytes_list.value.append(b"2.5")  # a number field sent as bytes
    with pytest.raises(tf.errors.InvalidArgumentError, match="price"):
        fz.from_examples(tf.constant([ex.SerializeToString()] * 9))
    ex = tf.train.Example()
    ex.features.feature["user"].float_list.value.append(1.0)  # a categorical field sent as a number
    with pytest.raises(tf.errors.InvalidArgumentError, match="user"):
        fz.from_examples(tf.constant([ex.SerializeToString()]))


def test_raw_value_companion_must_match_the_keys(tmp_path):
    fz = _raw_featurizer(tmp_path)
    ex = tf.train.Example()
    ex.features.feature["tag"].bytes_list.value.extend([b"t1", b"t2"])
    ex.features.feature["tag:value"].float_list.value.extend([2.0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="tag:value"):
        fz.from_examples(tf.constant([ex.SerializeToString()]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="colour"):
        fz.from_examples(_raw([[("colour", "red", 1.0)]]))


def test_context_and_candidates_equal_the_merged_examples(tmp_path):
    fz = _raw_featurizer(tmp_path)
    context = [("user", "u1", 1.0), ("tag", "t1", 1.0)]
    cands = [[("price", "price", 0.5)], [("price", "price", 3.0), ("user", "u2", 1.0)], []]
    ranked = fz.from_context(_raw([context])[0], _raw(cands))
    merged = fz.from_examples(_raw([c + [f for f in context if f[0] not in {x[0] for x in c}] for c in cands]))
    assert [sorted(r) for r in _triples(ranked)] == [sorted(r) for r in _triples(merged)]
    # The second candidate's user (u2) overrides the context's u1, and so u1's joined age: u2 has none.
    assert sorted(_triples(ranked)[1]) == [(2, 1.0, 0), (5, 1.0, 1), (6, 0.0, 2), (9, 1.0, 3)]
