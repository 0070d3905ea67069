"""ParameterServerStrategy training on a local cluster of processes (chief, workers, parameter servers)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from export import exporter
from feature_schema import load_schema

ENV = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _launch(data, run_dir, model, epochs, extra=(), workers=2, ps=2, min_shard_bytes=512):
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.distributed", "launch", "--workers", str(workers), "--ps", str(ps),
         "--min_shard_bytes", str(min_shard_bytes), "--", "--data", data, "--model", model, "--run_dir", run_dir,
         "--set", f"train.epochs={epochs}", "--set", "train.verbose=2", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def _single(data, run_dir, model, epochs, extra=()):
    out = subprocess.run([sys.executable, "-m", "trainer.train", "--data", data, "--model", model,
                          "--run_dir", run_dir, "--set", f"train.epochs={epochs}", "--set", "train.verbose=2",
                          *extra], capture_output=True, text=True, env=ENV, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.load(open(os.path.join(run_dir, "metrics.json")))


def _auc(run_dir, task="click"):
    return json.load(open(os.path.join(run_dir, "metrics.json")))[task]["auc"]


def test_local_cluster_shards_tables_and_exports_an_ordinary_savedmodel(tiny_etl, tmp_path):
    run_dir = str(tmp_path / "ps")
    proc = _launch(tiny_etl, run_dir, "fm", epochs=2,
                   extra=("--set", "data.batch_size=128", "--set", "optimizer.learning_rate=0.01",
                          "--set", "train.early_stopping_patience=1"))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    # Early stopping under PS: the chief evaluated both epochs' checkpoints, and the saved model is
    # the best epoch's (its eval logloss is the best one the stopper recorded).
    state = json.load(open(os.path.join(run_dir, "best", "state.json")))
    assert state["last_epoch"] == 2 and state["best_epoch"] in (1, 2)
    assert len(re.findall(r"distributed: epoch \d/2 - [\d,]+ examples/s .* - eval click AUC", out)) == 2
    assert abs(json.load(open(os.path.join(run_dir, "metrics.json")))["click"]["logloss"] - state["best"]) < 1e-6
    schema = load_schema(tiny_etl)
    # MinSizePartitioner split each table across the 2 parameter servers, rows adding up to the vocabulary.
    shards = json.loads(re.search(r"distributed: sharded tables (\{.*\})", out).group(1))
    for name in ("fm/linear/w", "fm/fm_interaction/v"):
        assert len(shards[name]) == 2 and sum(shards[name]) == schema.num_features, shards
    assert _auc(run_dir) > 0.6
    # Every process of the cluster is gone.
    pids = json.load(open(os.path.join(run_dir, "cluster.json")))["pids"].values()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # The export is an ordinary SavedModel: the TF Serving loader check passes.
    path, check = exporter.export(run_dir, export_base=str(tmp_path / "export"))
    assert check["max_abs_diff"] <= 1e-5 and os.path.basename(path).isdigit()


def _wait_for(path, proc, timeout=300):
    start = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() - start < timeout, f"{path} never appeared"
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("role", ["worker:1", "ps:0"])
def test_killed_worker_or_parameter_server(tiny_etl, tmp_path, role):
    """A killed worker: the coordinator reschedules its work. A killed ps: the cluster restarts from a checkpoint."""
    run_dir = str(tmp_path / role.replace(":", "_"))
    proc = _launch(tiny_etl, run_dir, "fm", epochs=4, extra=("--set", "data.batch_size=64"))
    _wait_for(os.path.join(run_dir, "ps_checkpoints", "ckpt-1.index"), proc)
    pid = json.load(open(os.path.join(run_dir, "cluster.json")))["pids"][role]
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    if role.startswith("ps"):
        assert "restarting the cluster" in out
        assert re.search(r"resumed from .*ckpt-\d+ at epoch [1-3]", out), out[-3000:]
    else:
        assert "restarting the cluster" not in out
    assert _auc(run_dir) > 0.6


@pytest.fixture(scope="module")
def medium_etl(tmp_path_factory):
    """A 60k/20k generated log over the tiny fixture's cardinalities: enough data that two runs of a
    deep model converge to the same quality, and an eval set where 0.005 AUC is above the noise."""
    import dataclasses

    import apache_beam as beam

    from etl import pipeline
    from generator.clicklog import generate
    from tests.conftest import TINY, generated_etl_config

    raw, out = str(tmp_path_factory.mktemp("medium-raw")), str(tmp_path_factory.mktemp("medium-etl"))
    generate(raw, dataclasses.replace(TINY, n_train=60_000, n_eval=20_000, seed=12))
    cfg = generated_etl_config(raw, out, num_shards=4)
    with beam.Pipeline() as p:
        pipeline.build_pipeline(p, cfg)
    pipeline.write_schema(cfg)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model,extra,epochs", [
    # AdaGrad on the batch sum (accumulator start 1/256^2), the recipe of frappe_ffm.
    ("ffm", ("--set", "optimizer.name=adagrad", "--set", "optimizer.learning_rate=0.1",
             "--set", "optimizer.initial_accumulator_value=1.5e-5", "--set", "data.batch_size=256"), 3),
    ("deepfm", ("--set", "optimizer.learning_rate=0.002", "--set", "data.batch_size=256"), 3),
])
def test_distributed_quality_matches_single_process(medium_etl, tmp_path, model, extra, epochs):
    """The issue's bar: FFM and DeepFM on a 2-worker, 2-ps cluster within 0.005 AUC of one process."""
    single = _single(medium_etl, str(tmp_path / "single"), model, epochs, extra)["click"]["auc"]
    proc = _launch(medium_etl, str(tmp_path / "ps"), model, epochs, extra)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    assert abs(_auc(str(tmp_path / "ps")) - single) <= 0.005, (_auc(str(tmp_path / "ps")), single)


def test_warm_start_on_the_cluster_carries_yesterdays_weights(tiny_etl, tmp_path):
    """WARM_START with DISTRIBUTE=ps: with a zero learning rate the cluster's model must be exactly
    yesterday's, so its eval metrics equal the single-process run it started from."""
    extra = ("--set", "data.batch_size=256", "--set", "optimizer.name=sgd")
    yesterday = _single(tiny_etl, str(tmp_path / "day1"), "fm", 1, extra)["click"]
    run_dir = str(tmp_path / "day2")
    proc = _launch(tiny_etl, run_dir, "fm", 1, (*extra, "--set", "optimizer.learning_rate=0.0",
                                              "--set", f"train.warm_start={tmp_path / 'day1'}"))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert "warm start" in out
    today = json.load(open(os.path.join(run_dir, "metrics.json")))["click"]
    assert abs(today["auc"] - yesterday["auc"]) < 1e-6 and abs(today["logloss"] - yesterday["logloss"]) < 1e-6


@pytest.mark.slow
def test_pos_weight_and_task_condition_change_the_cluster_as_they_change_one_process(tiny_etl, tmp_path):
    """The cluster trains on the single-process loss with its per-task weights and reports the same
    metrics (``given_click`` included). Expected by hand: positives weighted x4 scale a calibrated model's odds by 4, so
    the click calibration moves from ~1 to at most 4 / (1 + 3 r) (r = train CTR; the mean of the
    concave 4p / (1 + 3p) is below its value at the mean); conversion trained on clicked
    impressions only predicts P(conversion | click), calibrated on clicks (``given_click``) and
    about P(conversion | click) / P(conversion) over all impressions."""
    base = ("--set", "model.tasks=[click,conversion]", "--set", "model.hidden_units=[32]",
            "--set", "model.tower_units=[16]", "--set", "optimizer.learning_rate=0.01",
            "--set", "data.batch_size=256", "--set", "train.report=false")
    weighted = (*base, "--set", "train.pos_weight={click: 4.0}", "--set", "train.task_condition={conversion: click}")
    runs = {}
    for name, extra in (("plain", base), ("weighted", weighted)):
        runs[f"single-{name}"] = _single(tiny_etl, str(tmp_path / f"single-{name}"), "mtl", 2, extra)
        proc = _launch(tiny_etl, str(tmp_path / f"ps-{name}"), "mtl", 2, extra, workers=1, ps=1)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
        runs[f"ps-{name}"] = json.load(open(os.path.join(tmp_path, f"ps-{name}", "metrics.json")))
    labels = {lab.name: lab for lab in load_schema(tiny_etl).labels}
    ctr = labels["click"].positive_rate
    cvr_given_click = labels["conversion"].positives / labels["click"].positives
    bound = 4 / (1 + 3 * ctr)
    for where in ("single", "ps"):
        plain, weighted_run = runs[f"{where}-plain"], runs[f"{where}-weighted"]
        assert 0.8 < plain["click"]["calibration"] < 1.25, (where, plain["click"])
        assert 0.75 * bound < weighted_run["click"]["calibration"] <= 1.1 * bound, (where, weighted_run["click"])
        assert 0.6 < plain["conversion"]["calibration"] < 1.6 and "given_click" not in plain["conversion"]
        conv = weighted_run["conversion"]
        assert 0.75 < conv["given_click"]["calibration"] < 1.3, (where, conv)
        assert conv["calibration"] > 0.5 * cvr_given_click / labels["conversion"].positive_rate, (where, conv)
    # With one worker the cluster runs the single-process loop step for step (same seed, same
    # files, one step at a time): the same metrics, with the weights and without.
    for name in ("plain", "weighted"):
        for task in ("click", "conversion"):
            single, ps = runs[f"single-{name}"][task], runs[f"ps-{name}"][task]
            assert ps["auc"] == pytest.approx(single["auc"], rel=1e-3), (name, task, ps, single)
            assert ps["calibration"] == pytest.approx(single["calibration"], rel=1e-3), (name, task, ps, single)
    assert runs["ps-weighted"]["conversion"]["given_click"]["auc"] == pytest.approx(
        runs["single-weighted"]["conversion"]["given_click"]["auc"], rel=1e-3)
