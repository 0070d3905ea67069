"""Reliability: partial exports are never visible; killed ETL and training jobs rerun to clean results."""
from __future__ import annotations

import os
import threading

import pytest

from export import exporter

REQUIRED = ("saved_model.pb", os.path.join("variables", "variables.index"),
            os.path.join("assets.extra", "schema.json"), os.path.join("assets.extra", "tf_serving_warmup_requests"))


def test_poller_never_sees_an_incomplete_version(served_export, tmp_path):
    base = str(tmp_path / "export")
    model_dir = os.path.join(base, "ctr")
    os.makedirs(model_dir)
    stop = threading.Event()
    seen, incomplete, polls = set(), [], [0]

    def poll():
        # What TF Serving's file-system source does: list the numeric children of the model dir.
        while not stop.is_set():
            polls[0] += 1
            for name in os.listdir(model_dir):
                if not name.isdigit():
                    continue
                path = os.path.join(model_dir, name)
                missing = [r for r in REQUIRED if not os.path.exists(os.path.join(path, r))]
                if missing and os.path.exists(path):  # still there (not deleted) yet incomplete
                    incomplete.append((name, missing))
                seen.add(name)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    published = []
    try:
        for _ in range(3):
            path, check = exporter.export(served_export["runs"]["lr"], base, "ctr", verify_examples=500)
            published.append(os.path.basename(path))
    finally:
        stop.set()
        thread.join(timeout=10)
    assert incomplete == []
    assert polls[0] > 100
    assert set(published) <= seen | set(os.listdir(model_dir))
    assert sorted(d for d in os.listdir(model_dir) if d.isdigit()) == sorted(published)


def _records(out, split):
    """Every example of a split as (labels, sorted (field hash, hash, value) features), sorted.

    Shard assignment and the order of features inside an example are the runner's business;
    the content of every example is not.
    """
    import glob

    import tensorflow as tf
    files = sorted(glob.glob(os.path.join(out, split, "*.tfrecord.gz")))
    out = []
    for r in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        f = tf.train.Example.FromString(r.numpy()).features.feature
        feats = sorted(zip(f["feat_field_hashes"].int64_list.value, f["feat_hashes"].int64_list.value,
                           f["feat_vals"].float_list.value))
        assert feats, "a record without features"
        out.append(((f["click"].float_list.value[0], f["conversion"].float_list.value[0]), tuple(feats)))
    return sorted(out)


def test_etl_killed_mid_run_then_rerun_equals_a_clean_run(tiny_raw, tmp_path):
    """SIGKILL the ETL job while it writes, rerun it into the same output: same result as a clean run."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from conftest import generated_etl_config
    from feature_schema import configs, load_schema

    raw, _ = tiny_raw
    cfg_path = str(tmp_path / "etl.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(configs.to_dict(generated_etl_config(raw, "unused")), f)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

    def cmd(out):
        return [sys.executable, "-m", "etl.pipeline", "--config", cfg_path, "--out", out]

    killed_out, clean_out = str(tmp_path / "killed"), str(tmp_path / "clean")
    # An earlier complete run is in place, then a rerun is killed mid-way.
    subprocess.run(cmd(killed_out), check=True, capture_output=True, env=env, timeout=600)
    first = load_schema(killed_out)
    proc = subprocess.Popen(cmd(killed_out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not any(d.startswith(".staging-") for d in os.listdir(killed_out)):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    time.sleep(3)  # inside the job, with staging files being written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The killed run left the earlier output readable and untouched.
    assert load_schema(killed_out).counts == first.counts
    subprocess.run(cmd(killed_out), check=True, capture_output=True, env=env, timeout=600)
    subprocess.run(cmd(clean_out), check=True, capture_output=True, env=env, timeout=600)

    rerun, clean = load_schema(killed_out), load_schema(clean_out)
    assert (rerun.fields, rerun.labels, rerun.num_features, rerun.counts) == \
        (clean.fields, clean.labels, clean.num_features, clean.counts)
    assert open(rerun.vocabulary_file()).read() == open(clean.vocabulary_file()).read()
    for split in ("train", "eval"):
        assert _records(killed_out, split) == _records(clean_out, split)
        assert len(_records(killed_out, split)) == clean.counts[split]["written"]


@pytest.mark.slow
def test_training_killed_and_resumed_ends_within_noise_of_an_uninterrupted_run(tiny_etl, tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    def cmd(run_dir):
        return [sys.executable, "-m", "trainer.train", "--data", tiny_etl, "--model", "fm", "--run_dir", run_dir,
                "--set", "data.batch_size=64", "--set", "train.epochs=2", "--set", "train.checkpoint_every_steps=50",
                "--set", "train.verbose=0", "--set", "train.report=false"]

    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    proc = subprocess.Popen(cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state = os.path.join(killed, "backup", "chief", "checkpoint")
    deadline = time.time() + 300
    while not os.path.exists(state):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(cmd(killed), check=True, capture_output=True, env=env, timeout=600)
    subprocess.run(cmd(clean), check=True, capture_output=True, env=env, timeout=600)
    auc = {name: json.load(open(os.path.join(d, "metrics.json")))["click"]["auc"]
           for name, d in (("killed", killed), ("clean", clean))}
    print("training kill: " + json.dumps(auc))
    assert abs(auc["killed"] - auc["clean"]) <= 0.01, auc
