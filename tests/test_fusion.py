"""The fusion output ``ctr^a * cvr^b * bid`` on multi-task exports: config, the raw Predict signatures
(serving_default, rank) through the TF1 Session loader, bids from the Examples, refusals, warm-up and
verification."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import yaml
from conftest import MTL_FUSION

from export import exporter, signatures, warmup
from export.verify import example_bids
from feature_schema import load_schema
from serving import protocol
from serving.examples import ExampleBuilder
from trainer import config as config_lib

A, B = MTL_FUSION["a"], MTL_FUSION["b"]


def with_bid(example: bytes, *bids, kind: str = "float") -> bytes:
    ex = tf.train.Example.FromString(example)
    feature = ex.features.feature["bid"]
    if kind == "float":
        feature.float_list.value.extend(bids)
    else:
        feature.bytes_list.value.extend(str(b).encode() for b in bids)
    return ex.SerializeToString()


@pytest.fixture(scope="module")
def served(mtl_fusion_export, tiny_etl, tiny_raw):
    schema = load_schema(tiny_etl)
    builder = ExampleBuilder(schema)
    with open(os.path.join(tiny_raw[0], "eval.libffm"), "rb") as f:
        feats = [builder.parse(line)[1] for line in f.read().splitlines()[:200]]
    sm = exporter.SessionModel(mtl_fusion_export["path"])
    yield {**mtl_fusion_export, "sm": sm, "builder": builder, "feats": feats, "schema": schema}
    sm.close()


def test_fusion_score_by_hand():
    # 0.04^0.5 * 0.5^2 * 3 = 0.2 * 0.25 * 3 = 0.15; 0.25^0.5 * 0.1^2 * 2 = 0.5 * 0.01 * 2 = 0.01; a = 0: ctr drops out.
    got = signatures.fusion_score(tf.constant([0.04, 0.25]), tf.constant([0.5, 0.1]), tf.constant([3.0, 2.0]), 0.5, 2.0)
    np.testing.assert_allclose(got.numpy(), [0.15, 0.01], rtol=1e-6)
    got = signatures.fusion_score(tf.constant([0.3]), tf.constant([0.2]), tf.constant([1.5]), 0.0, 1.0)
    np.testing.assert_allclose(got.numpy(), [0.3], rtol=1e-6)


def test_config_defaults_validation_and_round_trip(tmp_path):
    assert config_lib.resolve("").fusion is None
    cfg = config_lib.resolve("", overrides={"fusion": {}})
    assert cfg.fusion == config_lib.FusionConfig(1.0, 1.0, "ctr", "cvr", "bid")
    cfg = config_lib.resolve("", overrides={"fusion": {"a": 2, "cvr_output": "conversion"}})
    config_lib.save(cfg, str(tmp_path / "c.yaml"))
    assert config_lib.load(str(tmp_path / "c.yaml")).fusion == config_lib.FusionConfig(a=2.0, cvr_output="conversion")
    with pytest.raises(ValueError, match="fusion.a"):
        config_lib.FusionConfig(a=-1.0)
    with pytest.raises(ValueError, match="unknown config keys at fusion"):
        config_lib.resolve("", overrides={"fusion": {"bid": "x"}})


def test_only_the_raw_predict_signatures_carry_fusion(served):
    sigs = served["sm"].signatures
    outputs = {name: set(sigs[name].outputs) for name in signatures.SIGNATURES}
    assert outputs["serving_default"] == outputs["rank"] == {"click", "conversion", "fusion"}
    assert outputs["predict_hashed"] == outputs["predict_ids"] == {"click", "conversion"}
    assert outputs["classification"] == {"scores", "classes"} and outputs["regression"] == {"outputs"}
    # The resolved config travels with the export.
    with open(os.path.join(served["path"], protocol.ASSETS_EXTRA, "config.yaml"), encoding="utf-8") as f:
        assert yaml.safe_load(f)["fusion"] == MTL_FUSION


def test_fusion_is_ctr_a_cvr_b_bid_of_each_example(served):
    bids = np.round(np.linspace(0.1, 5.0, len(served["feats"])), 3)
    raw = [with_bid(served["builder"].example(f), b) for f, b in zip(served["feats"], bids)]
    out = served["sm"].run_examples("serving_default", raw)
    click, conv = out["click"].astype(np.float64), out["conversion"].astype(np.float64)
    assert np.std(click) > 0 and np.std(conv) > 0
    np.testing.assert_allclose(out["fusion"], click ** A * conv ** B * bids, rtol=1e-5, atol=1e-9)
    # The bid changes fusion only: Classify scores the same Examples without bids alike.
    plain = served["sm"].run_examples("classification", [served["builder"].example(f) for f in served["feats"]])
    np.testing.assert_allclose(plain["scores"][:, 1], out["click"], atol=1e-6)


def test_rank_takes_a_candidates_bid_else_the_contexts(served):
    builder, feats = served["builder"], served["feats"][:6]
    ctx_fields = {"user", "query", "hour", "device"}
    context = with_bid(builder.example([f for f in feats[0] if f[0] in ctx_fields]), 2.0)
    own = [0.5, None, 4.0, None, 1.25, 0.0]
    cands = [builder.example([f for f in fs if f[0] not in ctx_fields]) for fs in feats]
    cands = [c if b is None else with_bid(c, b) for c, b in zip(cands, own)]
    ranked = served["sm"].rank(context, cands)
    bids = np.array([2.0 if b is None else b for b in own])
    np.testing.assert_allclose(ranked["fusion"], ranked["click"].astype(np.float64) ** A
                               * ranked["conversion"].astype(np.float64) ** B * bids, rtol=1e-5, atol=1e-9)
    # rank == the flat path on the merged Examples (the candidate's bid, else the context's).
    flat = [with_bid(builder.example([f for f in fs if f[0] not in ctx_fields]
                                     + [f for f in feats[0] if f[0] in ctx_fields]), b) for fs, b in zip(feats, bids)]
    want = served["sm"].run_examples("serving_default", flat)
    for k in ("click", "conversion", "fusion"):
        np.testing.assert_allclose(ranked[k], want[k], atol=1e-5)


def test_requests_without_a_valid_bid_are_refused_naming_the_feature(served):
    sm, builder, feats = served["sm"], served["builder"], served["feats"]
    good = with_bid(builder.example(feats[0]), 1.0)
    invalid = "bid feature named bid must hold one finite value >= 0"
    bad = {
        "missing": (builder.example(feats[1]), "lack the float feature named bid"),
        "two values": (with_bid(builder.example(feats[1]), 1.0, 2.0), invalid),
        "negative": (with_bid(builder.example(feats[1]), -1.0), invalid),
        "nan": (with_bid(builder.example(feats[1]), float("nan")), invalid),
        "bytes": (with_bid(builder.example(feats[1]), 1.0, kind="bytes"), "feature: bid"),
    }
    for example, message in bad.values():
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            sm.run_examples("serving_default", [good, example])
    # rank: a candidate without a bid whose context has none either.
    ctx = builder.example([f for f in feats[0] if f[0] == "user"])
    with pytest.raises(tf.errors.InvalidArgumentError, match="rank: candidates .* lack the float feature named bid"):
        sm.rank(ctx, [with_bid(builder.example(feats[1]), 1.0), builder.example(feats[2])])
    # Classify and Regress accept the bid feature and need none.
    assert sm.run_examples("regression", [good, bad["missing"][0]])["outputs"].shape == (2,)



def test_exporter_refuses_outputs_the_model_lacks(mtl_fusion_export, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(mtl_fusion_export["run_dir"], run)
    path = os.path.join(run, "config.yaml")
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    for fusion, message in (({"ctr_output": "ctr"}, "fusion.ctr_output 'ctr' is not an output of the model"),
                            ({"cvr_output": "ctcvr"}, "fusion.cvr_output 'ctcvr'"),
                            ({"bid_feature": "price"}, "fusion.bid_feature 'price' is a feature of the schema")):
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump({**cfg, "fusion": {**MTL_FUSION, **fusion}}, f)
        base = str(tmp_path / "export")
        with pytest.raises(ValueError, match=message):
            exporter.export(run, base, "m")
        assert not os.path.exists(base)  # nothing written


def test_warmup_and_verification_send_bids(served):
    check = served["check"]
    assert check["per_signature"]["serving_default.fusion"] <= 1e-5
    assert check["per_signature"]["rank.fusion"] <= 1e-5
    logs = exporter.read_warmup(os.path.join(served["path"], protocol.ASSETS_EXTRA, protocol.WARMUP_FILE))
    raw = [log.predict_log.request for log in logs if log.predict_log.request.model_spec.signature_name
           in ("serving_default", "rank")]
    assert len(raw) == 4
    for req in raw:
        examples = list(protocol.to_ndarray(req.inputs["examples"]))
        bids = example_bids(examples, "bid")
        if req.model_spec.signature_name == "serving_default":
            assert not np.isnan(bids).any() and np.all(bids > 0)
        else:  # every third candidate takes the context's bid
            ctx = example_bids([protocol.to_ndarray(req.inputs["context"]).item()], "bid")[0]
            assert ctx > 0 and list(np.flatnonzero(np.isnan(bids))) == list(range(1, len(examples), 3))
        # Replayed through the loader, as TF Serving does before the version takes traffic.
        feeds = {k: protocol.to_ndarray(t) for k, t in req.inputs.items()}
        out = served["sm"].run(req.model_spec.signature_name, feeds)
        assert np.all(np.isfinite(out["fusion"])) and np.all(out["fusion"] >= 0)
    # The flat twin of the synthesized rank request gives each candidate its own bid, else the context's.
    feats = warmup.with_bids([[("user", "u1", 1.0), ("item", "i1", 1.0)]] * 4, "bid")
    assert [f[-1][2] for f in feats] == [0.25, 1.0, 1.75, 2.5]
    flat = warmup.merged_features(served["schema"], feats, "bid")
    assert [[v for name, _, v in f if name == "bid"] for f in flat] == [[0.25], [0.25], [1.75], [2.5]]


def test_client_scores_log_lines_on_a_fusion_export_with_a_bid(served, tiny_raw, capsys):
    """`serving.client score --bid 2` on log lines: fusion = ctr^a * cvr^b * 2 over real gRPC."""
    from serving import client as client_lib
    from serving import server

    path = served["path"]
    manager = server.ModelManager(server.single_model_config("mtlf", os.path.dirname(path)),
                                  session_config=server.session_config())
    srv = server.Server(manager, port=0)
    srv.start()
    try:
        lines = os.path.join(tiny_raw[0], "eval.libffm")
        client_lib.main(["score", "--server", srv.target, "--model", "mtlf", "--schema", path, "--bid", "2", lines])
    finally:
        srv.stop()
    rows = [dict(kv.split("=") for kv in line.split("\t")) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 4000 and {"click", "conversion", "fusion"} <= set(rows[0])
    for r in rows[:50]:
        want = float(r["click"]) ** A * float(r["conversion"]) ** B * 2.0
        assert abs(float(r["fusion"]) - want) <= 1e-5 * max(1.0, want) + 2e-6
