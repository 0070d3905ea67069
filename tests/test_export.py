"""Export: TF Serving layout, assets.extra, checksum manifest, every signature through the TF1 Session
loader against the in-process model (raw Examples, rank, hashed records, ids), the in-graph
featurization (vocabulary lookup, joins, unknown keys), warm-up records."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from export import exporter, warmup
from export import verify as verify_lib
from feature_schema import load_schema, read_vocabulary
from featurization import Featurizer
from serving import manifest, protocol
from serving.examples import ExampleBuilder
from trainer import data
from trainer import train as trainer_lib

N_EVAL = 4000  # the tiny log's eval split


@pytest.fixture(scope="module")
def exported(served_export, tiny_etl, tiny_raw):
    schema = load_schema(tiny_etl)
    examples = exporter.eval_examples(schema, N_EVAL)
    builder = ExampleBuilder(schema)
    with open(os.path.join(tiny_raw[0], "eval.libffm"), "rb") as f:
        raw = [builder.line_example(line)[1] for line in f.read().splitlines()]
    expected, models = {}, {}
    for v, name in ((1, "lr"), (2, "fm")):
        _, _, models[v] = trainer_lib.load_trained(served_export["runs"][name])
        expected[v] = exporter.in_process_predict(models[v], schema, examples, 1024)
    return {**served_export, "schema": schema, "examples": examples, "expected": expected, "raw": raw,
            "models": models}


def test_layout_assets_and_manifest(exported):
    model_dir = os.path.join(exported["base"], "ctr")
    assert sorted(os.listdir(model_dir)) == ["1", "2"]  # integer versions counting up, no temporary dirs
    v2 = exported["versions"][2]
    assert v2 == os.path.join(model_dir, "2")
    extra = os.path.join(v2, protocol.ASSETS_EXTRA)
    assert sorted(os.listdir(extra)) == sorted(["schema.json", "vocabulary.tsv", "config.yaml",
                                                 protocol.WARMUP_FILE, "checksums.sha256"])  # libffm: no field map
    assert load_schema(os.path.join(extra, "schema.json")).num_features == exported["schema"].num_features
    assert len(read_vocabulary(os.path.join(extra, "vocabulary.tsv"))) == len(
        read_vocabulary(exported["schema"].vocabulary_file()))
    # The manifest covers every other file, and standard tools check it.
    digests = manifest.read(v2)
    assert sorted(digests) == manifest.list_files(v2)
    assert {"saved_model.pb", "variables/variables.index", "assets.extra/tf_serving_warmup_requests"} <= set(digests)
    subprocess.run(["sha256sum", "--quiet", "-c", manifest.MANIFEST_PATH], cwd=v2, check=True)


def test_manifest_detects_tampering(exported, tmp_path):
    copy = str(tmp_path / "2")
    shutil.copytree(exported["versions"][2], copy)
    manifest.verify(copy)
    with open(os.path.join(copy, "variables", "variables.index"), "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    with pytest.raises(manifest.ChecksumError, match="differing .*variables.index"):
        manifest.verify(copy)
    os.remove(os.path.join(copy, "fingerprint.pb"))
    with pytest.raises(manifest.ChecksumError, match="missing .*fingerprint.pb"):
        manifest.verify(copy)


def test_signatures_as_tf_serving_sees_them(exported):
    sm = exporter.SessionModel(exported["versions"][2])
    try:
        sigs = sm.signatures
    finally:
        sm.close()
    dt = tf.dtypes.as_dtype
    assert sorted(s for s in sigs if not s.startswith("__")) == sorted([
        "serving_default", "rank", "predict_hashed", "predict_ids", "classification", "regression"])
    for name in ("serving_default", "predict_hashed"):
        assert sigs[name].method_name == "tensorflow/serving/predict"
        assert {k: dt(v.dtype) for k, v in sigs[name].inputs.items()} == {"examples": tf.string}
        assert set(sigs[name].outputs) == {"click"}
    rank = sigs["rank"]
    assert {k: (dt(v.dtype), len(v.tensor_shape.dim)) for k, v in rank.inputs.items()} == {
        "context": (tf.string, 0), "examples": (tf.string, 1)}
    assert sigs["predict_ids"].method_name == "tensorflow/serving/predict"
    assert {k: dt(v.dtype) for k, v in sigs["predict_ids"].inputs.items()} == {
        "ids": tf.int64, "values": tf.float32, "fields": tf.int64}
    assert set(sigs["predict_ids"].outputs) == {"click"}
    assert sigs["classification"].method_name == "tensorflow/serving/classify"
    assert set(sigs["classification"].inputs) == {"inputs"}
    assert set(sigs["classification"].outputs) == {"scores", "classes"}
    assert sigs["regression"].method_name == "tensorflow/serving/regress"
    assert set(sigs["regression"].inputs) == {"inputs"} and set(sigs["regression"].outputs) == {"outputs"}


@pytest.mark.parametrize("version", [1, 2])
def test_every_signature_matches_the_in_process_model(exported, version):
    examples, expected = exported["examples"], exported["expected"][version]["click"]
    raw = exported["raw"]
    fz = Featurizer(exported["schema"], raw_examples=True)
    want_raw = verify_lib.in_process_predict_raw(exported["models"][version], fz, raw)["click"]
    sm = exporter.SessionModel(exported["versions"][version])
    try:
        for sig in ("predict_hashed", "predict_ids"):
            got = sm.run_examples(sig, examples, exported["schema"])["click"]
            assert got.shape == (N_EVAL,)
            assert np.max(np.abs(got - expected)) <= 1e-5, sig
        got = sm.run_examples("serving_default", raw)["click"]
        assert np.max(np.abs(got - want_raw)) <= 1e-5
        # Every eval line sent raw scores as its ETL record does (records are not in line order:
        # the sorted scores of all 4,000 agree).
        assert np.max(np.abs(np.sort(got) - np.sort(expected))) <= 1e-5
        cls = sm.run_examples("classification", raw)
        assert cls["classes"].shape == (N_EVAL, 2) and set(cls["classes"].ravel()) == {b"0", b"1"}
        assert np.all(cls["classes"][:, 1] == b"1")
        assert np.max(np.abs(cls["scores"][:, 1] - got)) <= 1e-5
        assert np.max(np.abs(cls["scores"][:, 0] - (1 - got))) <= 1e-5
        reg = sm.run_examples("regression", raw)["outputs"]
        assert np.max(np.abs(reg - got)) <= 1e-5
    finally:
        sm.close()
    # The public helper used by the end-to-end test agrees.
    assert np.max(np.abs(exporter.session_predict(exported["versions"][version], examples[:50],
                                                  "predict_ids")["click"] - expected[:50])) <= 1e-5


def test_rank_equals_the_flat_path(exported, tiny_raw):
    """One context (user, query, hour, device of the first line) with 100 candidates (item, position)."""
    schema = exported["schema"]
    builder = ExampleBuilder(schema)
    with open(os.path.join(tiny_raw[0], "eval.libffm"), "rb") as f:
        feats = [builder.parse(line)[1] for line in f.read().splitlines()[:100]]
    ctx_fields = {"user", "query", "hour", "device"}
    assert warmup.context_fields(schema) == ctx_fields | {"category", "brand", "price"}
    context = builder.example([f for f in feats[0] if f[0] in ctx_fields])
    cands = [builder.example([f for f in fs if f[0] not in ctx_fields]) for fs in feats]
    flat = [builder.example([f for f in fs if f[0] not in ctx_fields] + [f for f in feats[0] if f[0] in ctx_fields])
            for fs in feats]
    sm = exporter.SessionModel(exported["versions"][2])
    try:
        ranked = sm.rank(context, cands)["click"]
        want = sm.run_examples("serving_default", flat)["click"]
        # A candidate's field overrides the context's: the same user in both scores as the candidate's.
        over = sm.rank(context, [builder.example([("user", "u_other", 1.0)] + [f for f in feats[1]
                                                                               if f[0] not in ctx_fields])])
        want_over = sm.run_examples("serving_default", [builder.example(
            [("user", "u_other", 1.0)] + [f for f in feats[1] if f[0] not in ctx_fields]
            + [f for f in feats[0] if f[0] in ctx_fields - {"user"}])])
    finally:
        sm.close()
    assert ranked.shape == (100,) and np.std(ranked) > 0
    assert np.max(np.abs(ranked - want)) <= 1e-5
    assert abs(over["click"][0] - want_over["click"][0]) <= 1e-5
    request = len(context) + sum(len(c) for c in cands)
    assert request <= 0.6 * sum(len(f) for f in flat)  # the shared fields travel once


def test_unknown_feature_key_is_refused_naming_it(exported):
    ex = tf.train.Example()
    ex.features.feature["user"].bytes_list.value.append(b"u1")
    ex.features.feature["usr"].bytes_list.value.append(b"u1")  # a typo: not a field
    sm = exporter.SessionModel(exported["versions"][2])
    try:
        with pytest.raises(tf.errors.InvalidArgumentError, match="usr"):
            sm.run_examples("serving_default", [ex.SerializeToString()])
        # The ETL's hashed records are not raw Examples: refused, not scored as all-missing.
        with pytest.raises(tf.errors.InvalidArgumentError, match="feat_hashes"):
            sm.run_examples("serving_default", exported["examples"][:1])
    finally:
        sm.close()


def test_predict_ids_padding_anywhere_is_ignored(exported):
    """Rows padded in the middle, at the end, and to different widths (field -1) score as unpadded."""
    examples, expected = exported["examples"][:64], exported["expected"][2]["click"][:64]
    rows = protocol.example_rows(examples, exported["schema"])
    rng = np.random.default_rng(0)
    width = max(len(r) for r in rows) + 5
    ids = rng.integers(-2**63, 2**63 - 1, size=(64, width), dtype=np.int64)  # junk in padding slots
    vals = rng.normal(size=(64, width)).astype(np.float32)
    fields = np.full((64, width), protocol.PAD_FIELD, np.int64)
    for i, r in enumerate(rows):
        slots = np.sort(rng.choice(width, size=len(r), replace=False))  # real features keep their order
        for s, (h, v, f) in zip(slots, r):
            ids[i, s], vals[i, s], fields[i, s] = h, v, f
    sm = exporter.SessionModel(exported["versions"][2])
    try:
        got = sm.run("predict_ids", {"ids": ids, "values": vals, "fields": fields})["click"]
    finally:
        sm.close()
    assert np.max(np.abs(got - expected)) <= 1e-5


def test_unknown_hashes_map_to_the_field_rare_id_in_graph(exported):
    """A record whose hashes are not in the vocabulary scores as its features' rare rows do in-process."""
    schema = exported["schema"]
    keys = schema.example_keys
    known = {e.hash for e in read_vocabulary(schema.vocabulary_file())}
    src = tf.train.Example.FromString(exported["examples"][0])
    hashes = list(src.features.feature[keys.hashes].int64_list.value)
    changed = [i for i, h in enumerate(hashes) if h in known][:3]
    assert changed
    for n, i in enumerate(changed):
        hashes[i] = 1000 + n  # not a feature hash of the vocabulary
        assert hashes[i] not in known
    served = tf.train.Example()
    served.CopyFrom(src)
    del served.features.feature[keys.hashes].int64_list.value[:]
    served.features.feature[keys.hashes].int64_list.value.extend(hashes)
    # Reference: the original record's rows with the changed features' rows set by hand to their
    # fields' rare rows (a record's own features are the first entries, in order).
    features, _, _ = data.parse_batch(tf.constant([exported["examples"][0]]), schema)
    rows = features["ids"].values.numpy()
    fids = features["fields"].values.numpy()
    assert all(rows[i] != schema.rare_ids[fids[i]] for i in changed)
    for i in changed:
        rows[i] = schema.rare_ids[fids[i]]
    reference = dict(features, ids=tf.SparseTensor(features["ids"].indices, rows, features["ids"].dense_shape))
    _, _, model = trainer_lib.load_trained(exported["runs"]["fm"])
    want = model(reference, training=False)["click"].numpy()
    got = exporter.session_predict(exported["versions"][2], [served.SerializeToString()])["click"]
    assert abs(got[0] - want[0]) <= 1e-6
    original = exporter.session_predict(exported["versions"][2], [exported["examples"][0]])["click"]
    assert abs(original[0] - got[0]) > 1e-6  # the rare rows really changed the score


def test_warmup_records_are_held_out_requests_for_every_signature(exported):
    path = os.path.join(exported["versions"][2], protocol.ASSETS_EXTRA, protocol.WARMUP_FILE)
    logs = exporter.read_warmup(path)
    kinds = [(log.WhichOneof("log_type"), getattr(log, log.WhichOneof("log_type")).request.model_spec.signature_name)
             for log in logs]
    per_size = [("predict_log", "predict_hashed"), ("predict_log", "predict_ids"),
                ("predict_log", "serving_default"), ("classify_log", "classification"),
                ("regress_log", "regression"), ("predict_log", "rank")]
    assert kinds == per_size * len(exporter.WARMUP_BATCH_SIZES)
    assert all(getattr(log, log.WhichOneof("log_type")).request.model_spec.name == "ctr" for log in logs)
    big = logs[6].predict_log.request  # predict_hashed at 100 examples: the first held-out records
    assert list(big.inputs["examples"].string_val) == exported["examples"][:100]
    raw = logs[8].predict_log.request.inputs["examples"].string_val  # serving_default at 100: synthesized
    first = tf.train.Example.FromString(raw[0]).features.feature
    assert "item" in first and "category" not in first  # the graph joins the item table
    sm = exporter.SessionModel(exported["versions"][2])
    try:
        out = sm.replay(logs[7])  # predict_ids at 100
        assert np.max(np.abs(out["click"] - exported["expected"][2]["click"][:100])) <= 1e-5
        reg = sm.replay(logs[10])["outputs"]  # regression at 100 == serving_default at 100
        assert np.max(np.abs(reg - sm.replay(logs[8])["click"])) <= 1e-5
        assert sm.replay(logs[11])["click"].shape == (100,)  # rank at 100
    finally:
        sm.close()


def test_failed_verification_publishes_nothing(exported, tmp_path, monkeypatch):
    base = str(tmp_path / "base")
    monkeypatch.setattr(exporter, "verify", lambda *a, **k: {"max_abs_diff": 0.5, "per_signature": {}})
    with pytest.raises(RuntimeError, match="nothing published"):
        exporter.export(exported["runs"]["lr"], base, "ctr")
    assert os.listdir(os.path.join(base, "ctr")) == []  # no version, no temporary directory


def test_publish_takes_the_next_version_and_refuses_an_existing_one(tmp_path):
    model_dir = str(tmp_path / "m")
    os.makedirs(os.path.join(model_dir, "7"))
    os.makedirs(os.path.join(model_dir, ".tmp-export-x"))  # hidden dirs are not versions
    for n in range(2):
        tmp = str(tmp_path / f"t{n}")
        os.makedirs(tmp)
        open(os.path.join(tmp, "saved_model.pb"), "w").close()
        assert exporter.publish(tmp, model_dir) == os.path.join(model_dir, str(8 + n))
    tmp = str(tmp_path / "t")
    os.makedirs(tmp)
    with pytest.raises(FileExistsError):
        exporter.publish(tmp, model_dir, version=8)
    assert exporter.publish(tmp, model_dir, version=20) == os.path.join(model_dir, "20")
    assert exporter.versions(model_dir) == [7, 8, 9, 20]
