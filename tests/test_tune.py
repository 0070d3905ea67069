"""Hyper-parameter search: space parsing, trial tables, resume, subprocess workers, failed trials."""
from __future__ import annotations

import json
import math
import os
import random
import re

import numpy as np
import pytest

from trainer import config as config_lib
from trainer import tune


def test_parse_grid_values():
    assert tune.parse_grid("model.embedding_dim=8,16,32") == ("model.embedding_dim", [8, 16, 32])
    # YAML 1.1 reads 1e-3 as a string; the tuner reads it as the number.
    assert tune.parse_grid("model.l2_embedding=1e-3,5e-4") == ("model.l2_embedding", [1e-3, 5e-4])
    assert tune.parse_grid("optimizer.name=adam,adagrad") == ("optimizer.name", ["adam", "adagrad"])
    assert tune.parse_grid("model.hidden_units=[[256,128],[64]]") == ("model.hidden_units", [[256, 128], [64]])
    with pytest.raises(ValueError, match="KEY=VALUES"):
        tune.parse_grid("model.embedding_dim")
    assert tune.parse_point("data.batch_size=64 optimizer.learning_rate=2e-1") == {
        "data.batch_size": 64, "optimizer.learning_rate": 0.2}


def test_grid_and_random_trials():
    grid = [("a", [1, 2]), ("b", ["x", "y", "z"])]
    points = tune.grid_trials(grid)
    assert points == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"},
                      {"a": 2, "b": "x"}, {"a": 2, "b": "y"}, {"a": 2, "b": "z"}]
    drawn = tune.random_trials(grid, [], 4, seed=7)
    assert len(drawn) == 4 and all(p in points for p in drawn)
    assert len({tuple(sorted(p.items())) for p in drawn}) == 4  # distinct grid points
    assert drawn == tune.random_trials(grid, [], 4, seed=7)  # reproducible
    assert sorted(map(str, tune.random_trials(grid, [], 99, seed=1))) == sorted(map(str, points))
    key, dist = tune.parse_dist("optimizer.learning_rate=log:1e-3:1e-1")
    assert key == "optimizer.learning_rate" and dist == tune.Dist("log", 1e-3, 1e-1)
    mixed = tune.random_trials(grid, [(key, dist), ("c", tune.Dist("int", 2, 4))], 200, seed=3)
    lr = np.array([p[key] for p in mixed])
    assert lr.min() >= 1e-3 and lr.max() <= 1e-1
    # Log-uniform: about half the draws below the geometric mean 1e-2.
    assert 0.4 < np.mean(lr < 1e-2) < 0.6
    assert {p["c"] for p in mixed} == {2, 3, 4} and {p["a"] for p in mixed} == {1, 2}
    with pytest.raises(ValueError, match="lo > 0"):
        tune.Dist("log", 0.0, 1.0)
    assert tune.Dist("uniform", 0.5, 0.5).sample(random.Random(0)) == 0.5


def test_bad_key_fails_before_any_training(tmp_path):
    base = config_lib.configs.to_dict(config_lib.ExperimentConfig())
    with pytest.raises(ValueError, match="unknown config keys"):
        tune.search(base, [{"model.embedding_dim": 4}, {"model.bogus": 1}], str(tmp_path))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("trial-")]


def _entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


@pytest.fixture(scope="module")
def lr_search(tiny_etl, tmp_path_factory):
    """A two-trial grid search of LR in this process (the second trial's L2 is crushing)."""
    out = str(tmp_path_factory.mktemp("tune") / "lr")
    argv = ["--data", tiny_etl, "--model", "lr", "--set", "train.epochs=1", "--set", "train.verbose=0", "--set", "train.report=false",
            "--set", "optimizer.learning_rate=0.1", "--grid", "model.l2_linear=0,100", "--out", out]
    return argv, out, tune.main(argv)


def test_two_trial_grid_table(lr_search, tiny_etl):
    argv, out, result = lr_search
    trials = result["trials"]
    assert [t["values"] for t in trials] == [{"model.l2_linear": 0}, {"model.l2_linear": 100}]
    assert [t["status"] for t in trials] == ["ok", "ok"]
    assert [t["epochs"] for t in trials] == ["1", "1"]  # one epoch, no early stopping
    for t in trials:
        with open(os.path.join(t["run_dir"], "metrics.json")) as f:
            assert t["metrics"] == json.load(f)  # the table holds each run's own eval metrics
        cfg = config_lib.load(os.path.join(t["run_dir"], "config.yaml"))
        assert cfg.model.l2_linear == t["values"]["model.l2_linear"] and cfg.model.name == "lr"
        assert cfg.train.epochs == 1 and cfg.data.path == tiny_etl
    free, crushed = trials[0]["metrics"]["click"], trials[1]["metrics"]["click"]
    # Crushing L2 leaves only the bias: the prediction is the base rate, logloss its entropy.
    assert crushed["logloss"] == pytest.approx(_entropy(crushed["positive_rate"]), abs=0.01)
    assert free["logloss"] < crushed["logloss"] - 0.005 and free["auc"] > crushed["auc"] + 0.1
    assert result["task"] == "click" and result["metric"] == "logloss"
    assert result["best"]["index"] == 0 and result["best"]["values"] == {"model.l2_linear": 0}

    md = open(os.path.join(out, "trials.md")).read()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert len(rows) == 2
    cells = [r.strip("| ").split(" | ") for r in rows]
    assert [c[:3] for c in cells] == [["1", "000", "0"], ["2", "001", "100"]]
    assert cells[0][3:6] == [f"{free['auc']:.4f}", f"{free['logloss']:.4f}", f"{free['calibration']:.3f}"]
    assert "model.l2_linear=0,100" in md  # the command that produced the table


def test_rerun_reuses_finished_trials(lr_search):
    argv, out, first = lr_search
    mtime = os.path.getmtime(os.path.join(first["trials"][0]["run_dir"], "metrics.json"))
    again = tune.main(argv)
    assert [t["status"] for t in again["trials"]] == ["cached", "cached"]
    assert [t["metrics"] for t in again["trials"]] == [t["metrics"] for t in first["trials"]]
    assert os.path.getmtime(os.path.join(again["trials"][0]["run_dir"], "metrics.json")) == mtime


def test_subprocess_workers_and_failed_trial(lr_search, tiny_etl, tmp_path):
    _, _, inproc = lr_search
    base = config_lib.configs.to_dict(config_lib.resolve("", "", {
        "data": {"path": tiny_etl}, "model": {"name": "lr"}, "optimizer": {"learning_rate": 0.1},
        "train": {"epochs": 1, "verbose": 0, "report": False}}))
    result = tune.search(base, [{"model.l2_linear": 0}, {"model.name": "no_such_model"}], str(tmp_path),
                         workers=2)
    ok, failed = result["trials"]
    assert ok["status"] == "ok" and failed["status"] == "failed"
    assert "unknown model" in failed["error"] and math.isinf(
        tune.objective(tune.Trial(**failed), "logloss", "click"))
    assert os.path.exists(os.path.join(ok["run_dir"], "train.log"))
    # Same config as the in-process trial 0: same model up to shuffling order across file shards.
    same = inproc["trials"][0]["metrics"]["click"]
    assert ok["metrics"]["click"]["logloss"] == pytest.approx(same["logloss"], abs=0.01)
    assert ok["metrics"]["click"]["auc"] == pytest.approx(same["auc"], abs=0.01)
    md = open(tmp_path / "trials.md").read()
    assert "| - | 001 |" in md and "failed: " in md


def test_seeds_repeat_each_point_and_rank_on_valid_when_present():
    assert tune.parse_seeds("42,1,2") == [42, 1, 2]
    with pytest.raises(ValueError, match="repeats"):
        tune.parse_seeds("1,1")
    assert tune.with_seeds([{"a": 1}, {"a": 2}], [7, 8]) == [
        {"a": 1, "train.seed": 7}, {"a": 1, "train.seed": 8}, {"a": 2, "train.seed": 7}, {"a": 2, "train.seed": 8}]
    with pytest.raises(ValueError, match="ambiguous"):
        tune.with_seeds([{"train.seed": 3}], [1])
    # Valid metrics rank a trial when its run has them; its eval metrics are only reported.
    m = lambda ll, auc: {"click": {"logloss": ll, "auc": auc, "calibration": 1.0}}  # noqa: E731
    a = tune.Trial(0, {"x": 1, "train.seed": 1}, "a", "ok", metrics=m(0.1, 0.9), valid=m(0.5, 0.6))
    b = tune.Trial(1, {"x": 2, "train.seed": 1}, "b", "ok", metrics=m(0.3, 0.7), valid=m(0.4, 0.7))
    c = tune.Trial(2, {"x": 2, "train.seed": 2}, "c", "ok", metrics=m(0.2, 0.8), valid=m(0.2, 0.8))
    assert tune.objective(a, "logloss", "click") == 0.5
    assert [t.index for t in tune.ranked([a, b, c], "logloss", "click")] == [2, 1, 0]
    summary = tune.seed_summary([a, b, c], "logloss", "click")
    assert [s["values"] for s in summary] == [{"x": 2}, {"x": 1}]  # mean valid logloss 0.3 < 0.5
    x2 = summary[0]
    assert x2["seeds"] == [1, 2] and x2["objective"] == pytest.approx(0.3)
    assert x2["valid"]["click"]["logloss"] == {"mean": pytest.approx(0.3), "sd": pytest.approx(0.1 * math.sqrt(2))}
    assert x2["eval"]["click"]["auc"] == {"mean": pytest.approx(0.75), "sd": pytest.approx(0.05 * math.sqrt(2))}
    assert summary[1]["seeds"] == [1] and summary[1]["eval"]["click"]["logloss"]["sd"] == 0.0


def test_seed_search_without_out_writes_to_a_temporary_directory(tiny_etl, tmp_path, monkeypatch, capsys):
    import shutil
    import tempfile

    from tests.test_training import _with_valid_split

    data = _with_valid_split(tiny_etl, str(tmp_path / "etl"), files_of="eval")
    monkeypatch.chdir(tmp_path)
    result = tune.main(["--data", data, "--model", "lr", "--set", "train.epochs=1", "--set", "train.verbose=0",
                        "--set", "train.report=false", "--set", "optimizer.learning_rate=0.1",
                        "--seeds", "3,4"])
    out = re.search(r"tune: writing to (\S+)", capsys.readouterr().out).group(1)
    try:
        assert not os.path.exists(tmp_path / "runs")  # nothing under runs/ unless asked
        assert os.path.dirname(out) == tempfile.gettempdir()
        assert [t["values"] for t in result["trials"]] == [{"train.seed": 3}, {"train.seed": 4}]
        for t in result["trials"]:
            assert config_lib.load(os.path.join(t["run_dir"], "config.yaml")).train.seed == t["values"]["train.seed"]
            # The valid split here holds the eval records: both metrics files agree.
            assert t["valid"]["click"]["logloss"] == pytest.approx(t["metrics"]["click"]["logloss"], abs=1e-9)
        lls = [t["valid"]["click"]["logloss"] for t in result["trials"]]
        assert lls[0] != lls[1]  # the seed changes the run
        (row,) = result["summary"]
        assert row["values"] == {} and row["seeds"] == [3, 4]
        assert row["valid"]["click"]["logloss"]["mean"] == pytest.approx(np.mean(lls))
        assert row["valid"]["click"]["logloss"]["sd"] == pytest.approx(np.std(lls, ddof=1))
        md = open(os.path.join(out, "trials.md")).read()
        assert "Ranked by valid logloss" in md and "Mean ± sd over seeds 3, 4" in md
    finally:
        shutil.rmtree(out)
