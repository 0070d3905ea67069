"""Every eval record of the generated log and of Frappe maps, through the featurization layer, to the rows
and values the documented rules give (``feature_schema.rules``), computed here independently in plain
Python from vocabulary.tsv and schema.json: the rules the pre-streaming ETL applied when it wrote rows
into the records itself.

(A one-off comparison against that ETL's actual output, commit 431cac5, found every record of both
logs identical: docs/DESIGN.md.)
"""
from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import tensorflow as tf

from feature_schema import feature_hash, field_hash, load_schema, read_vocabulary, rules
from trainer import data

FRAPPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "frappe")


def _expected(schema, row_of, hashes, values, field_hashes):
    """(field id, row, value) of one record by the rules, missing fields appended in field order."""
    by_hash = {field_hash(f.name): f for f in schema.fields}
    out, present = [], set()
    for h, v, fh in zip(hashes, values, field_hashes):
        f = by_hash[fh]
        present.add(f.id)
        if f.kind == "binned":  # edges are float32 numbers (rules); the record's value is one
            edges = [rules.to_float32(e) for e in f.bin_boundaries or ()]
            h, v = feature_hash(f.name, rules.bin_key(rules.bin_index(v, edges))), 1.0
        elif f.kind == "numeric":
            st = f.value_stats
            v = rules.scale_value(v, f.transform, st["mean"], st["std"])
        out.append((f.id, row_of.get(h, f.rare_id), v))
    if schema.fill_missing:
        out += [(f.id, f.rare_id, 0.0 if f.kind == "numeric" else 1.0) for f in schema.fields if f.id not in present]
    return out


def _check_every_eval_record(etl_dir):
    schema = load_schema(etl_dir)
    k = schema.example_keys
    files = sorted(p for pattern in schema.split_files("eval") for p in tf.io.gfile.glob(pattern))
    row_of = {e.hash: e.index for e in read_vocabulary(schema.vocabulary_file())}
    records = [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    want = []
    for r in records:
        f = tf.train.Example.FromString(r).features.feature
        want.append(_expected(schema, row_of, f[k.hashes].int64_list.value, f[k.values].float_list.value,
                              f[k.field_hashes].int64_list.value))
    got = []
    featurizer = data.Featurizer(schema)
    for start in range(0, len(records), 4096):
        features, _, _ = data.parse_batch(tf.constant(records[start:start + 4096]), schema, featurizer)
        ids, vals, flds = features["ids"], features["values"], features["fields"]
        per = collections.defaultdict(list)
        for (b, _), fid, row, v in zip(ids.indices.numpy(), flds.values.numpy(), ids.values.numpy(),
                                       vals.values.numpy()):
            per[b].append((int(fid), int(row), float(v)))
        got.extend(per[b] for b in range(int(ids.dense_shape[0])))
    assert len(got) == len(want) == schema.splits["eval"]["examples"]
    for g, w in zip(got, want):  # same file order: record by record, entry by entry
        assert [(a, b) for a, b, _ in g] == [(a, b) for a, b, _ in w]
        np.testing.assert_allclose([v for *_, v in g], [v for *_, v in w], rtol=1e-6, atol=1e-6)
    _check_dense_layout(schema, featurizer, records, want)
    return schema


def _check_dense_layout(schema, featurizer, records, want):
    """The dense layout of the same records: single-valued fields as columns in field order, the
    multi-hot fields' entries (own, then missing) sparse, with the rules' rows and values."""
    single = set(schema.single_field_ids)
    assert single, "the check needs single-valued fields"
    got_dense, got_sparse = [], []
    for start in range(0, len(records), 4096):
        features, _, _ = data.parse_batch(tf.constant(records[start:start + 4096]), schema, featurizer, dense=True)
        d = [features[k].numpy() for k in ("dense_fields", "dense_ids", "dense_values")]
        got_dense.extend(zip(*d))
        ids, vals, flds = features["ids"], features["values"], features["fields"]
        per = collections.defaultdict(list)
        for (b, _), fid, row, v in zip(ids.indices.numpy(), flds.values.numpy(), ids.values.numpy(),
                                       vals.values.numpy()):
            per[b].append((int(fid), int(row), float(v)))
        got_sparse.extend(per[b] for b in range(len(d[0])))
    for (fids, rows, values), sparse, w in zip(got_dense, got_sparse, want):
        cols = sorted(e for e in w if e[0] in single)
        assert (fids.tolist(), rows.tolist()) == ([f for f, _, _ in cols], [r for _, r, _ in cols])
        np.testing.assert_allclose(values, [v for *_, v in cols], rtol=1e-6, atol=1e-6)
        multi = [e for e in w if e[0] not in single]
        assert [(a, b) for a, b, _ in sparse] == [(a, b) for a, b, _ in multi]
        np.testing.assert_allclose([v for *_, v in sparse], [v for *_, v in multi], rtol=1e-6, atol=1e-6)


def test_generated_log(tiny_etl):
    schema = _check_every_eval_record(tiny_etl)
    assert any(f.kind == "binned" for f in schema.fields) and schema.entity_tables


@pytest.mark.skipif(not os.path.isdir(FRAPPE), reason="../shared/data/frappe not present")
def test_frappe(tmp_path):
    import apache_beam as beam

    from etl import pipeline
    from etl.config import EtlConfig

    cfg = EtlConfig(input=os.path.join(FRAPPE, "frappe.validation.libfm"),
                    eval_input=os.path.join(FRAPPE, "frappe.test.libfm"), format="libfm",
                    field_map=os.path.join(FRAPPE, "frappe.fields.tsv"), out=str(tmp_path / "etl"), num_shards=2)
    with beam.Pipeline() as p:
        pipeline.build_pipeline(p, cfg)
    pipeline.write_schema(cfg)
    schema = _check_every_eval_record(cfg.out)
    assert schema.splits["eval"]["examples"] == 28_860
