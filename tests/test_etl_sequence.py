"""Sequence and vector fields in the ETL: config checks, truncation, the key namespace, vector tables."""
from __future__ import annotations

import dataclasses

import glob
import os

import apache_beam as beam
import pytest
import tensorflow as tf

from etl import features as feat
from etl import parsing, pipeline, plan as plan_lib
from etl.config import EntityTableConfig, EtlConfig, FieldConfig, fields_from_tsv
from feature_schema import ExampleKeys, Schema, feature_hash, field_hash, load_schema, read_vocabulary, tables


# ---------------------------------------------------------------- config and pure functions

@pytest.mark.parametrize("kwargs, message", [
    (dict(sequence=True), "max_length >= 1"),
    (dict(sequence=True, max_length=5, kind="numeric"), "a sequence is categorical"),
    (dict(max_length=5), "need sequence: true"),
    (dict(vocabulary_of="item"), "need sequence: true"),
    (dict(sequence=True, max_length=5, vocabulary_of="hist"), "names the field itself"),
    (dict(kind="vector"), "kind vector needs dim >= 1"),
    (dict(dim=4), "only it takes dim"),
    (dict(kind="vector", dim=4, min_count=1), "a vector field takes no"),
])
def test_field_config_rejects_inconsistent_sequence_and_vector_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FieldConfig("hist", **kwargs)


def test_sequence_is_multi_hot_and_fields_tsv_takes_the_new_columns():
    assert FieldConfig("hist", sequence=True, max_length=20).is_multi_hot
    tsv = "field\tkind\tsequence\tmax_length\tvocabulary_of\tdim\nitem\t\t\t\t\t\nhist\t\ttrue\t20\titem\t\nv\tvector\t\t\t\t8\n"
    fields = fields_from_tsv(tsv)["fields"]
    assert fields[1] == {**fields[1], "name": "hist", "sequence": True, "max_length": 20, "vocabulary_of": "item"}
    assert fields[2]["kind"] == "vector" and fields[2]["dim"] == 8


def test_truncate_keeps_the_first_keys_of_each_sequence_in_order():
    f = [("user", "u", 1.0), ("hist", "a", 1.0), ("item", "i", 1.0), ("hist", "b", 1.0), ("hist", "a", 1.0),
         ("hist", "c", 1.0), ("tag", "x", 1.0), ("tag", "y", 1.0)]
    kept, dropped = feat.truncate_sequences(f, {"hist": 2, "tag": 5})
    assert kept == (("user", "u", 1.0), ("hist", "a", 1.0), ("item", "i", 1.0), ("hist", "b", 1.0),
                    ("tag", "x", 1.0), ("tag", "y", 1.0))
    assert dropped == {"hist": 2}
    assert feat.truncate_sequences(f, {"hist": 4}) == (tuple(f), {})


def test_record_encoder_hashes_sequence_keys_as_the_vocabulary_of_field():
    enc = feat.RecordEncoder(("click",), ExampleKeys(), namespaces={"hist": "item"})
    hashes, _, fields = enc.lists([("item", "i1", 1.0), ("hist", "i1", 1.0), ("hist", "i7", 1.0)])
    assert hashes == [feature_hash("item", "i1"), feature_hash("item", "i1"), feature_hash("item", "i7")]
    assert fields == [field_hash("item"), field_hash("hist"), field_hash("hist")]


def test_sequence_keys_never_get_rows_of_their_own():
    settings = {"item": dict(kind="categorical", min_count=1, linear_only=False, source="log", multi_hot=False),
                "hist": dict(kind="categorical", min_count=1, linear_only=False, source="log", multi_hot=True,
                             sequence=True, max_length=3, vocabulary_of="item")}
    specs, vocab = feat.assign_vocabulary([(("item", "i1"), 4), (("hist", "i2"), 9)], ["item", "hist"], settings)
    assert [(e.field, e.key, e.index) for e in vocab] == [("item", "i1", 1)]
    assert (specs[1].vocab_size, specs[1].sequence, specs[1].max_length, specs[1].vocabulary_of) == (1, True, 3, "item")


# ---------------------------------------------------------------- vector tables

def _vector_table(path, rows, header="item\titem_vec"):
    path.write_text(header + "\n" + "".join(f"{k}\t{v}\n" for k, v in rows), encoding="utf-8")
    return str(path)


def test_read_vectors_rounds_to_float32_and_keeps_file_order(tmp_path):
    path = _vector_table(tmp_path / "v.tsv", [("i2", "0.1,2,-3"), ("i1", "1e-3,0,4.5")])
    keys, vectors = tables.read_vectors(path, "item", "item_vec", 3)
    assert keys == ["i2", "i1"]
    assert vectors == [[pytest.approx(0.1, rel=1e-7), 2.0, -3.0], [pytest.approx(1e-3, rel=1e-7), 0.0, 4.5]]


@pytest.mark.parametrize("rows, message", [
    ([("i1", "1,2")], r"v.tsv:2 \(key 'i1'\): 2 values, the field's dim is 3"),
    ([("i1", "1,2,3"), ("i2", "1,nan,3")], r"v.tsv:3 \(key 'i2'\): value 1 'nan' is not finite"),
    ([("i1", "1,2,3"), ("i2", "1,2,1e39")], r"v.tsv:3 .*value 2 '1e39' is not finite in float32"),
    ([("i1", "1,x,3")], r"v.tsv:2 .*value 1 'x' is not a number"),
    ([("i1", "1,2,3"), ("i1", "1,2,3")], r"v.tsv:3: key 'i1' appears twice"),
    ([("", "1,2,3")], r"v.tsv:2: empty key"),
])
def test_bad_vector_rows_are_errors_naming_the_row(tmp_path, rows, message):
    path = _vector_table(tmp_path / "v.tsv", rows)
    with pytest.raises(ValueError, match=message):
        tables.read_vectors(path, "item", "item_vec", 3)


def test_parquet_vector_tables_hold_a_list_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "v.parquet")
    pq.write_table(pa.table({"item": ["i1", "i2"], "item_vec": [[1.0, 2.0], [3.0, 4.0]]}), path)
    assert tables.read_vectors(path, "item", "item_vec", 2) == (["i1", "i2"], [[1.0, 2.0], [3.0, 4.0]])
    pq.write_table(pa.table({"item": ["i1", "i2"], "item_vec": [[1.0, 2.0], [3.0]]}), path)
    with pytest.raises(ValueError, match=r"v.parquet row 1 \(key 'i2'\): 1 values"):
        tables.read_vectors(path, "item", "item_vec", 2)
    with pytest.raises(ValueError, match=r"columns \['vec'\] not in"):
        tables.read_vectors(path, "item", "vec", 2)


# ---------------------------------------------------------------- the whole job

TRAIN = [b"1,0 user:u1:1 item:i1:1 hist:i2:1 hist:i1:1 hist:i9:1 hist:i3:1",
         b"0,0 user:u2:1 item:i2:1 hist:i1:1",
         b"1,0 user:u1:1 item:i1:1",
         b"0,0 user:u2:1 item:i3:1 hist:i1:1 hist:i1:1 hist:i2:1 hist:i2:1 hist:i3:1"]
EVAL = [b"1,0 user:u1:1 item:i2:1 hist:i2:1 hist:i3:1 hist:i4:1 hist:i5:1",
        b"0,0 user:u3:1 item:i1:1 item_vec:x:1"]


def _job(tmp_path, vectors="item\titem_vec\ni1\t1,0,0\ni2\t0,1,0.5\n", limit=64 << 20):
    d = tmp_path / "in"
    d.mkdir(exist_ok=True)
    (d / "train.libffm").write_bytes(b"\n".join(TRAIN) + b"\n")
    (d / "eval.libffm").write_bytes(b"\n".join(EVAL) + b"\n")
    (d / "items.tsv").write_text("item\tcategory\ni1\tc1\ni2\tc2\n", encoding="utf-8")
    (d / "item_vectors.tsv").write_text(vectors, encoding="utf-8")
    return EtlConfig(
        input=str(d / "train.libffm"), eval_input=str(d / "eval.libffm"), labels=("click", "conversion"),
        out=str(tmp_path / "out"), min_count=2, num_shards=1, strict_fields=True, side_input_max_bytes=limit,
        fields=(FieldConfig("user"), FieldConfig("item"), FieldConfig("category"),
                FieldConfig("hist", sequence=True, max_length=3, vocabulary_of="item"),
                FieldConfig("item_vec", kind="vector", dim=3)),
        entity_tables=(EntityTableConfig("items", str(d / "items.tsv"), "item"),
                       EntityTableConfig("item_vectors", str(d / "item_vectors.tsv"), "item")))


def _records(out, split):
    files = sorted(glob.glob(os.path.join(out, split, "part-*.tfrecord.gz")))
    out = []
    for r in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        f = tf.train.Example.FromString(r.numpy()).features.feature
        out.append(list(zip(f["feat_field_hashes"].int64_list.value, f["feat_hashes"].int64_list.value)))
    return out


@pytest.mark.parametrize("limit,inline", [(64 << 20, 1 << 20), (64 << 20, 0), (0, 1 << 20)],
                         ids=["inline", "side_input", "keyed"])
def test_job_truncates_hashes_in_the_item_namespace_and_records_the_vector_field(tmp_path, limit, inline):
    cfg = dataclasses.replace(_job(tmp_path, limit=limit), inline_max_bytes=inline)
    with beam.Pipeline() as p:
        pipeline.build_pipeline(p, cfg)
    schema = pipeline.write_schema(cfg)
    hist = schema.field("hist")
    assert (hist.sequence, hist.max_length, hist.vocabulary_of, hist.multi_hot, hist.vocab_size) == (
        True, 3, "item", True, 1)
    # i1 is the one item seen twice as an item; i2's three hist occurrences do not make it frequent.
    vocab = read_vocabulary(schema.vocabulary_file())
    assert sorted((e.field, e.key, e.count) for e in vocab if e.field in ("item", "hist")) == [("item", "i1", 2)]
    assert schema.counts["train"]["truncated"] == {"hist": {"lines": 2, "keys": 3}}
    assert schema.counts["eval"]["truncated"] == {"hist": {"lines": 1, "keys": 1}}
    assert schema.counts["eval"]["dead_letter_reasons"] == {parsing.UNKNOWN_FIELD: 1}  # a line sent item_vec
    (vec,) = schema.vector_fields
    assert (vec.name, vec.dim, vec.key_field, vec.key_column, vec.rows, vec.source) == (
        "item_vec", 3, "item", "item", 2, "dict:item_vectors")
    assert [t.name for t in schema.entity_tables] == ["items"]  # the vectors are not joined into records
    assert "item_vec" not in [f.name for f in schema.fields]
    # The first training line: user, item, the first three hist keys hashed as items, then the join.
    h, ih = field_hash("hist"), lambda k: feature_hash("item", k)
    want = [(field_hash("user"), feature_hash("user", "u1")), (field_hash("item"), ih("i1")),
            (h, ih("i2")), (h, ih("i1")), (h, ih("i9")), (field_hash("category"), feature_hash("category", "c1"))]
    assert want in _records(cfg.out, "train")
    # The schema round-trips through JSON with its new parts.
    again = load_schema(cfg.out)
    assert again.vector_fields == schema.vector_fields and again.field("hist") == hist


def test_bad_vector_table_stops_the_job_naming_the_line(tmp_path):
    cfg = _job(tmp_path, vectors="item\titem_vec\ni1\t1,0,0\ni2\t0,1\n")
    with pytest.raises(ValueError, match=r"item_vectors.tsv:3 \(key 'i2'\): 2 values, the field's dim is 3"):
        plan_lib.plan_job(cfg)


def test_vector_field_needs_a_table_and_a_categorical_key(tmp_path):
    cfg = _job(tmp_path)
    with pytest.raises(ValueError, match="columns of no entity table"):
        plan_lib.plan_job(EtlConfig(**{**cfg.__dict__, "entity_tables": cfg.entity_tables[:1]}))
    bad = EtlConfig(**{**cfg.__dict__, "fields": cfg.fields[:3] + (FieldConfig("hist", sequence=True, max_length=3,
                                                                               vocabulary_of="nope"),) + cfg.fields[4:]})
    with pytest.raises(ValueError, match="vocabulary_of 'nope' must name a categorical field"):
        plan_lib.plan_job(bad)


def test_schema_checks_vocabulary_of_and_vector_keys():
    from feature_schema import FieldSpec, LabelSpec, VectorFieldSpec

    item = FieldSpec("item", 0, "categorical", 0, 2, 0)
    hist = FieldSpec("hist", 1, "categorical", 2, 1, 2, multi_hot=True, sequence=True, max_length=4,
                     vocabulary_of="user")
    with pytest.raises(ValueError, match="vocabulary_of 'user' must name a categorical field"):
        Schema(fields=(item, hist), labels=(LabelSpec("click", 0.1),), num_features=3, max_features_per_example=5)
    with pytest.raises(ValueError, match="a sequence is categorical and multi-hot"):
        FieldSpec("hist", 1, "categorical", 2, 1, 2, sequence=True, max_length=4)
    vec = VectorFieldSpec("item_vec", 4, "hist", "v.tsv", "item", 3)
    ok_hist = FieldSpec("hist", 1, "categorical", 2, 1, 2, multi_hot=True, sequence=True, max_length=4,
                        vocabulary_of="item")
    with pytest.raises(ValueError, match="key_field 'hist' must be a categorical field that is not a sequence"):
        Schema(fields=(item, ok_hist), labels=(LabelSpec("click", 0.1),), num_features=3, max_features_per_example=5,
               vector_fields=(vec,))
