"""The featurization layer on sequence and vector fields, against hand-computed rows, positions and vectors."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from feature_schema import FieldSpec, LabelSpec, Schema, VectorFieldSpec, VocabEntry, feature_hash, field_hash
from featurization import Featurizer
from featurization import sequence as seq_lib
from serving import protocol
from trainer.models.sequence import sequence_rows

from conftest import tf1_run

# user: rare 0, u1 -> 1.  item: rare 2, i1 -> 3, i2 -> 4.  hist (sequence of item keys, max 3): rare 5 only.
FIELDS = (FieldSpec("user", 0, "categorical", 0, 2, 0),
          FieldSpec("item", 1, "categorical", 2, 3, 2),
          FieldSpec("hist", 2, "categorical", 5, 1, 5, multi_hot=True, sequence=True, max_length=3,
                    vocabulary_of="item"))
VOCAB = [VocabEntry("user", "u1", feature_hash("user", "u1"), 1, 5),
         VocabEntry("item", "i1", feature_hash("item", "i1"), 3, 5),
         VocabEntry("item", "i2", feature_hash("item", "i2"), 4, 5)]
# item_vec: i1 -> (1, 2), i3 -> (5, 6) (i3 has no row of its own, but a vector); i2 has none.
VECTORS = "item\titem_vec\ni1\t1,2\ni3\t5,6\n"
HIST = 2


def _schema(tmp_path, vectors=True):
    extra = {}
    if vectors:
        path = tmp_path / "vectors.tsv"
        path.write_text(VECTORS, encoding="utf-8")
        extra["vector_fields"] = (VectorFieldSpec("item_vec", 2, "item", str(path), "item", 2),)
    return Schema(fields=FIELDS, labels=(LabelSpec("click", 0.5),), num_features=6, max_features_per_example=6,
                  **extra)


def _records(examples):
    """Sparse (hashes, values, field hashes) as the ETL writes them: hist keys hashed as items."""
    idx, h, v, fh = [], [], [], []
    for b, ex in enumerate(examples):
        for j, (field, key) in enumerate(ex):
            idx.append([b, j])
            h.append(feature_hash("item" if field == "hist" else field, key))
            v.append(1.0)
            fh.append(field_hash(field))
    shape = [len(examples), max(len(ex) for ex in examples)]
    idx = np.array(idx, np.int64).reshape([-1, 2])
    return (tf.SparseTensor(idx, np.array(h, np.int64), shape), tf.SparseTensor(idx, np.array(v, np.float32), shape),
            tf.SparseTensor(idx, np.array(fh, np.int64), shape))


def _triples(out):
    rows = [[] for _ in range(int(out["ids"].dense_shape[0]))]
    for (b, _), r, f in zip(out["ids"].indices.numpy(), out["ids"].values.numpy(), out["fields"].values.numpy()):
        rows[b].append((int(r), int(f)))
    return rows


EXAMPLES = [
    # hist of four keys: the fourth is beyond max_length; i3 has no item row: hist's rare row.
    [("user", "u1"), ("item", "i1"), ("hist", "i2"), ("hist", "i3"), ("hist", "i1"), ("hist", "i2")],
    [("item", "i3")],                                      # no user, no hist: their missing rows
    [("hist", "i1"), ("user", "u1"), ("hist", "i2")],      # interleaved: hist keeps its order
]


def _check_hand_computed(out):
    assert _triples(out) == [
        [(1, 0), (3, 1), (4, HIST), (5, HIST), (3, HIST)],
        [(2, 1), (0, 0), (5, HIST)],
        [(3, HIST), (1, 0), (4, HIST), (2, 1)],
    ]
    v = out["vectors"]
    np.testing.assert_array_equal(v["item"]["item_vec"].numpy(), [[1, 2], [5, 6], [0, 0]])
    np.testing.assert_array_equal(v["hist"]["item_vec"].numpy(), [
        [[0, 0], [5, 6], [1, 2]],      # i2 has no vector; i3 has one though it has no row
        [[0, 0], [0, 0], [0, 0]],      # the missing row has no key
        [[1, 2], [0, 0], [0, 0]]])
    rows, mask = sequence_rows(out, HIST, 3)
    np.testing.assert_array_equal(rows.numpy(), [[4, 5, 3], [5, 0, 0], [3, 4, 0]])
    np.testing.assert_array_equal(mask.numpy(), [[1, 1, 1], [1, 0, 0], [1, 1, 0]])


def test_records_keep_order_truncate_and_join_vectors_by_hand(tmp_path):
    fz = Featurizer(_schema(tmp_path), VOCAB)
    _check_hand_computed(fz.from_records(*_records(EXAMPLES)))


def test_raw_examples_hash_sequence_keys_as_items_and_truncate(tmp_path):
    fz = Featurizer(_schema(tmp_path), VOCAB, raw_examples=True)
    raw = [protocol.raw_example([(f, k, 1.0) for f, k in ex]) for ex in EXAMPLES]
    out = fz.from_examples(tf.constant(raw))
    # Raw entries come field by field (user, item, hist): only the third example's order differs.
    assert _triples(out)[:2] == _triples(fz.from_records(*_records(EXAMPLES)))[:2]
    assert _triples(out)[2] == [(1, 0), (3, HIST), (4, HIST), (2, 1)]
    np.testing.assert_array_equal(out["vectors"]["hist"]["item_vec"].numpy()[0], [[0, 0], [5, 6], [1, 2]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="item_vec"):  # vectors come from the table only
        fz.from_examples(tf.constant([protocol.raw_example([("item_vec", "x", 1.0)])]))


def test_rank_shares_the_context_sequence_and_equals_the_flat_path(tmp_path):
    fz = Featurizer(_schema(tmp_path), VOCAB, raw_examples=True)
    context = [("user", "u1", 1.0)] + [("hist", k, 1.0) for k in ("i3", "i1", "i2", "i1")]
    cands = [[("item", "i1", 1.0)], [("item", "i2", 1.0), ("hist", "i2", 1.0)]]
    ranked = fz.from_context(tf.constant(protocol.raw_example(context)),
                             tf.constant([protocol.raw_example(c) for c in cands]))
    flat = fz.from_examples(tf.constant([protocol.raw_example(c + [f for f in context if f[0] not in {x[0] for x in c}])
                                         for c in cands]))
    assert [sorted(r) for r in _triples(ranked)] == [sorted(r) for r in _triples(flat)]
    assert sorted(_triples(ranked)[0]) == sorted([(3, 1), (1, 0), (5, HIST), (3, HIST), (4, HIST)])
    for key in ("item", "hist"):
        np.testing.assert_array_equal(ranked["vectors"][key]["item_vec"].numpy(), flat["vectors"][key]["item_vec"].numpy())
    np.testing.assert_array_equal(ranked["vectors"]["hist"]["item_vec"].numpy()[0], [[5, 6], [1, 2], [0, 0]])
    # The candidate's own one-key hist overrides the context's four.
    np.testing.assert_array_equal(sequence_rows(ranked, HIST, 3)[1].numpy()[1], [1, 0, 0])


def test_without_vector_fields_the_batch_has_no_vectors(tmp_path):
    out = Featurizer(_schema(tmp_path, vectors=False), VOCAB).from_records(*_records(EXAMPLES))
    assert set(out) == {"ids", "values", "fields"}
    assert _triples(out)[0] == [(1, 0), (3, 1), (4, HIST), (5, HIST), (3, HIST)]


def test_ranks_and_slots_by_hand():
    np.testing.assert_array_equal(seq_lib.ranks_within(tf.constant([5, 2, 5, 5, 2, 9], tf.int64)).numpy(),
                                  [0, 0, 1, 2, 1, 0])
    # Entries not in (example, column) order: positions follow the columns.
    indices = tf.constant([[1, 3], [0, 2], [1, 0], [0, 0], [1, 1], [0, 1]], tf.int64)
    fids = tf.constant([7, 7, 7, 4, 7, 7], tf.int64)
    values = tf.constant([13.0, 2.0, 10.0, 0.0, 11.0, 1.0])
    dense, mask = seq_lib.dense_sequence(values, indices, fids, tf.constant(3, tf.int64), 7, 2)
    np.testing.assert_array_equal(dense.numpy(), [[1, 2], [10, 11], [0, 0]])  # (1, 3) is the third: dropped
    np.testing.assert_array_equal(mask.numpy(), [[1, 1], [1, 1], [0, 0]])
    keep = seq_lib.within_max_length(tf.constant([0, 0, 0, 1, 0], tf.int64), tf.constant([1, 2, 1, 1, 1], tf.int64),
                                     tf.constant([9, 2, 9], tf.int64), 3)
    np.testing.assert_array_equal(keep.numpy(), [True, True, True, True, False])


def test_saved_model_round_trip_through_the_tf1_loader(tmp_path):
    fz = Featurizer(_schema(tmp_path), VOCAB, raw_examples=True)

    class Module(tf.Module):
        def __init__(self):
            super().__init__()
            self.fz = fz

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def serve(self, examples):
            out = self.fz.from_examples(examples)
            rows, mask = sequence_rows(out, HIST, 3)
            return {"rows": rows, "mask": tf.cast(mask, tf.int32), "hist_vec": out["vectors"]["hist"]["item_vec"],
                    "item_vec": out["vectors"]["item"]["item_vec"]}

    m = Module()
    raw = np.array([protocol.raw_example([(f, k, 1.0) for f, k in ex]) for ex in EXAMPLES], dtype=object)
    want = {k: t.numpy() for k, t in m.serve(tf.constant(raw)).items()}
    path = str(tmp_path / "fz")
    tf.saved_model.save(m, path, signatures={"serving_default": m.serve.get_concrete_function()})
    got = tf1_run(path, {"examples": raw})
    np.testing.assert_array_equal(want["rows"], [[4, 5, 3], [5, 0, 0], [3, 4, 0]])
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
