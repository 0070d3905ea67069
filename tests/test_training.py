"""Training loop: kill-and-resume, early stopping, per-task weights, optimizers, config, CLI."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from feature_schema import configs
from trainer import config as config_lib
from trainer import data
from trainer import epochs as epochs_lib
from trainer import evaluation, experiments
from trainer import train as trainer_lib
from trainer.epochs import LoglossPatience
from trainer.models import MODELS, build_model


def _progress(run_dir):
    with open(os.path.join(run_dir, trainer_lib.PROGRESS_FILE)) as f:
        return [json.loads(line) for line in f]


def test_killed_run_resumes_from_the_checkpointed_step(tiny_etl, tmp_path):
    run_dir = str(tmp_path / "run")
    batch, epochs, every = 64, 2, 20
    steps_per_epoch = math.ceil(12_000 / batch)  # the tiny set's train split
    cmd = [sys.executable, "-m", "trainer.train", "--data", tiny_etl, "--model", "fm", "--run_dir", run_dir,
           "--set", f"data.batch_size={batch}", "--set", f"train.epochs={epochs}",
           "--set", f"train.checkpoint_every_steps={every}", "--set", "train.verbose=0",
           "--set", "train.report=false"]
    backup_state = os.path.join(run_dir, trainer_lib.BACKUP_DIR, "chief", "checkpoint")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not os.path.exists(backup_state) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "training ended before its first checkpoint; nothing to kill"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(run_dir, "metrics.json"))
    reader = tf.train.load_checkpoint(os.path.dirname(backup_state))
    saved_step = int(reader.get_tensor("model/optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))
    assert 0 < saved_step < epochs * steps_per_epoch and saved_step % every == 0

    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    starts = [r for r in _progress(run_dir) if r["event"] == "start"]
    end = [r for r in _progress(run_dir) if r["event"] == "end"][-1]
    # The first run started at 0; the second continued at the checkpointed step (not 0) and ran
    # exactly the remaining steps: no step repeated, none skipped.
    assert [s["step"] for s in starts] == [0, saved_step]
    assert end["step"] == epochs * steps_per_epoch
    with open(os.path.join(run_dir, "metrics.json")) as f:
        assert 0.6 < json.load(f)["click"]["auc"] <= 1.0
    # The backup is removed once training finished; the resolved config sits next to the weights.
    assert not os.path.exists(backup_state)
    assert config_lib.load(os.path.join(run_dir, "config.yaml")).data.batch_size == batch


class _Scalar(keras.Model):
    def __init__(self):
        super().__init__()
        self.w = tf.Variable(0.0)

    def call(self, x):
        return x * self.w


def test_early_stopping_rule_stops_after_patience_and_restores_the_best_epoch(tmp_path):
    model = _Scalar()
    rule = LoglossPatience(str(tmp_path / "best"), patience=2)
    # Selection logloss per epoch: best at epoch 2 (weight 2.0), then two epochs without improvement.
    for epoch, (w, ll) in enumerate([(1.0, 0.50), (2.0, 0.40), (3.0, 0.45), (4.0, 0.41)], 1):
        model.w.assign(w)
        if rule.update(epoch, ll):
            tf.train.Checkpoint(model=model).write(rule.weights_path)
        assert rule.stopped == (epoch == 4)
    rule.restore_best(model, last_epoch=4)
    assert float(model.w.numpy()) == 2.0
    # A resumed run (a fresh rule on the same directory) keeps the counters.
    again = LoglossPatience(str(tmp_path / "best"), patience=2)
    assert again.state == {"best": 0.40, "best_epoch": 2, "wait": 2, "last_epoch": 4} and again.stopped


def test_selection_logloss_weights_tasks_and_counts_conditioned_tasks_on_their_subset():
    results = {"click": {"logloss": 0.3}, "conversion": {"logloss": 0.1, "given_click": {"logloss": 0.4}}}
    tcfg = config_lib.TrainConfig(loss_weights={"conversion": 2.0})
    assert evaluation.selection_logloss(results, ("click", "conversion"), tcfg) == pytest.approx(0.3 + 2 * 0.1)
    tcfg = config_lib.TrainConfig(loss_weights={"conversion": 2.0}, task_condition={"conversion": "click"})
    assert evaluation.selection_logloss(results, ("click", "conversion"), tcfg) == pytest.approx(0.3 + 2 * 0.4)


def test_epoch_examples_counts_the_partial_batch_of_each_pass():
    # 1000 examples in batches of 300: passes of 4 steps (300, 300, 300, 100).
    assert epochs_lib.epoch_examples(4, 300, 1000) == 1000
    assert epochs_lib.epoch_examples(8, 300, 1000) == 2000
    assert epochs_lib.epoch_examples(2, 300, 1000) == 600  # half a pass
    assert epochs_lib.epoch_examples(5, 300, None) == 1500  # split size unknown


def test_task_weights_positive_weight_and_condition():
    tcfg = config_lib.TrainConfig(pos_weight={"click": 3.0}, task_condition={"conversion": "click"})
    labels = {"click": tf.constant([1.0, 0.0, 1.0]), "conversion": tf.constant([1.0, 0.0, 0.0])}
    w = tf.constant([1.0, 2.0, 0.5])
    out = trainer_lib.task_weights(labels, w, ("click", "conversion"), tcfg, training=True)
    np.testing.assert_allclose(out["click"].numpy(), [3.0, 2.0, 1.5])       # positives x3
    np.testing.assert_allclose(out["conversion"].numpy(), [1.0, 0.0, 0.5])  # clicked impressions only
    # Evaluation keeps the condition but not the positive weight.
    out = trainer_lib.task_weights(labels, w, ("click", "conversion"), tcfg, training=False)
    np.testing.assert_allclose(out["click"].numpy(), [1.0, 2.0, 0.5])


def test_adagrad_step_matches_libffm():
    # libffm: G starts at 1; G += g^2; w -= eta * g / sqrt(G). With the rate scaled by a batch of 4,
    # a batch-mean gradient g/4 ... here the gradient is given directly.
    opt = trainer_lib.make_optimizer(config_lib.OptimizerConfig("adagrad", 0.2, initial_accumulator_value=1.0,
                                                                scale_lr_by_batch=True), batch_size=4)
    w = tf.Variable([1.0])
    opt.apply_gradients([(tf.constant([0.5]), w)])
    np.testing.assert_allclose(w.numpy(), [1.0 - 0.8 * 0.5 / math.sqrt(1.25)], rtol=1e-6)
    ftrl = trainer_lib.make_optimizer(config_lib.OptimizerConfig("ftrl", 0.1, l1=0.01))
    assert isinstance(ftrl, keras.optimizers.Ftrl)
    with pytest.raises(ValueError, match="FTRL"):
        config_lib.OptimizerConfig("adam", l1=0.1)


def test_config_rejects_unknown_keys_and_bad_tasks(tiny_etl, tmp_path):
    with pytest.raises(ValueError, match="unknown config keys"):
        config_lib.resolve("", overrides={"model": {"nmae": "fm"}})
    with pytest.raises(ValueError, match="not tasks of the model"):
        trainer_lib.train(config_lib.resolve("", overrides={
            "data": {"path": tiny_etl}, "model": {"name": "lr"}, "run_dir": str(tmp_path),
            "train": {"pos_weight": {"conversion": 2.0}}}))
    cfg = config_lib.resolve("generated_ffm", overrides=configs.parse_overrides(
        ["model.task_fields={conversion: [price]}", "train.loss_weights={click: 0.5}"]))
    assert cfg.model.task_fields == {"conversion": ("price",)} and cfg.train.loss_weights == {"click": 0.5}
    path = str(tmp_path / "c.yaml")
    config_lib.save(cfg, path)
    assert config_lib.load(path) == cfg


def test_help_lists_every_model_and_experiment():
    epilog = trainer_lib._help_epilog()
    for name in list(MODELS) + list(experiments.EXPERIMENTS):
        assert f"  {name} " in epilog


def _with_valid_split(etl_dir: str, out_dir: str, files_of: str) -> str:
    """A copy of an ETL output whose schema has a ``valid`` split reading ``files_of``'s records."""
    import shutil

    shutil.copytree(etl_dir, out_dir)
    path = os.path.join(out_dir, "schema.json")
    schema = json.load(open(path))
    schema["splits"]["valid"] = dict(schema["splits"][files_of])
    json.dump(schema, open(path, "w"))
    return out_dir


def _fm_run(data_dir: str, run_dir: str, epochs: int, **train) -> dict:
    return trainer_lib.train(config_lib.resolve("", overrides={
        "data": {"path": data_dir, "batch_size": 128}, "model": {"name": "fm"},
        "optimizer": {"learning_rate": 0.01}, "run_dir": run_dir,
        "train": {"epochs": epochs, "verbose": 0, "report": False, **train}}))


def test_history_has_one_entry_per_epoch_and_the_restored_best_epoch_is_what_metrics_report(tiny_etl, tmp_path):
    run_dir = str(tmp_path / "run")
    results = _fm_run(tiny_etl, run_dir, 4, early_stopping_patience=10)
    history = json.load(open(os.path.join(run_dir, "history.json")))
    assert [e["epoch"] for e in history] == [1, 2, 3, 4]
    for e in history:
        assert e["examples"] == 12_000  # one pass over the tiny train split per epoch
        assert e["examples_per_sec"] == pytest.approx(e["examples"] / e["train_seconds"], rel=1e-3)
        assert set(e["eval"]) == {"click"} and "valid" not in e  # no valid split: eval selects
        assert e["selection_logloss"] == e["eval"]["click"]["logloss"]
    seconds = [e["seconds"] for e in history]
    assert seconds == sorted(seconds) and seconds[0] >= history[0]["train_seconds"]
    lls = [e["eval"]["click"]["logloss"] for e in history]
    best = 1 + lls.index(min(lls))
    state = json.load(open(os.path.join(run_dir, "best", "state.json")))
    assert state["best_epoch"] == best == history[-1]["best_epoch"]
    # metrics.json is the restored best epoch's model: the eval metrics recorded at that epoch.
    assert results["click"]["logloss"] == pytest.approx(history[best - 1]["eval"]["click"]["logloss"], abs=1e-9)
    assert results["click"]["auc"] == pytest.approx(history[best - 1]["eval"]["click"]["auc"], abs=1e-9)
    assert not os.path.exists(os.path.join(run_dir, "metrics_valid.json"))


def test_a_valid_split_selects_and_eval_is_still_reported(tiny_etl, tmp_path):
    # The planted valid split is the training data itself: its logloss keeps falling while the
    # eval logloss turns up after epoch 2 at this rate, so the two splits pick different epochs.
    data_dir = _with_valid_split(tiny_etl, str(tmp_path / "etl"), files_of="train")
    run_dir = str(tmp_path / "run")
    results = _fm_run(data_dir, run_dir, 4, early_stopping_patience=10)
    history = json.load(open(os.path.join(run_dir, "history.json")))
    valid_ll = [e["valid"]["click"]["logloss"] for e in history]
    eval_ll = [e["eval"]["click"]["logloss"] for e in history]
    assert [e["selection_logloss"] for e in history] == valid_ll
    best = 1 + valid_ll.index(min(valid_ll))
    assert best == 4 and 1 + eval_ll.index(min(eval_ll)) < 4
    assert json.load(open(os.path.join(run_dir, "best", "state.json")))["best_epoch"] == best
    # metrics.json reports eval, metrics_valid.json valid, both of the selected epoch.
    assert results["click"]["logloss"] == pytest.approx(eval_ll[best - 1], abs=1e-9)
    valid = json.load(open(os.path.join(run_dir, "metrics_valid.json")))
    assert valid["click"]["logloss"] == pytest.approx(valid_ll[best - 1], abs=1e-9)
    assert valid["click"]["examples"] == 12_000 and results["click"]["examples"] == 4_000


def test_same_seed_same_metrics_on_a_loaded_machine(tiny_etl, tmp_path):
    """Op determinism and fixed seeds: a run with two CPU hogs competing for the cores gives the
    idle run's metrics to the last digit."""
    def run(d):
        return trainer_lib.train(config_lib.resolve("", overrides={
            "data": {"path": tiny_etl, "batch_size": 128},
            "model": {"name": "deepfm", "hidden_units": [32], "dropout": 0.2, "embedding_dim": 8},
            "optimizer": {"name": "adagrad", "learning_rate": 0.05},
            "run_dir": str(tmp_path / d), "train": {"epochs": 1, "steps_per_epoch": 40, "verbose": 0,
                                                    "report": False}}))["click"]

    idle = run("idle")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        loaded = run("loaded")
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    from tensorflow.python.framework import config as tf_config

    assert tf_config.is_op_determinism_enabled()  # train.op_determinism defaults to true
    assert (loaded["auc"], loaded["logloss"]) == (idle["auc"], idle["logloss"])


def test_output_without_a_terminal_is_one_line_per_epoch_and_no_start_up_noise(tiny_etl, tmp_path):
    run_dir = str(tmp_path / "run")
    out = subprocess.run([sys.executable, "-m", "trainer.train", "--data", tiny_etl, "--model", "fm",
                          "--run_dir", run_dir, "--set", "train.epochs=2", "--set", "train.report=false",
                          "--set", "data.batch_size=512"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    # train.verbose=1 (the default) but stdout is a pipe: no progress bar, one line per epoch.
    lines = out.stdout.splitlines()
    assert [line.split(" - ")[0] for line in lines if line.startswith("train: epoch")] == \
        ["train: epoch 1/2", "train: epoch 2/2"]
    assert re.search(r"train: epoch 2/2 - [\d,]+ examples/s \(\d+\.\ds training", out.stdout)
    assert "ETA" not in out.stdout and "[====" not in out.stdout
    for noise in ("cuInit", "oneDNN", "absl::InitializeLog", "cuda drivers", "retracing", "apitools"):
        assert noise not in out.stdout + out.stderr, noise
    assert out.stderr.strip() == ""


def test_start_up_noise_is_dropped_and_everything_else_kept():
    from trainer import quiet

    captured = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
        "I0000 00:00:1796055016.527409    9309 port.cc:153] oneDNN custom operations are on. You may see "
        "slightly different numerical results due to floating-point round-off errors.\n",
        "I0000 00:00:1796055016.527771    9309 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
        "GPU will not be used.\n",
        "E0000 00:00:1796055018.709247    9309 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
        "Failed call to cuInit: UNKNOWN ERROR (303)\n",
        "E0000 00:00:1796059963.912592   17668 node_def_util.cc:682] NodeDef mentions attribute "
        "use_unbounded_threadpool which is not in the op definition: Op<name=MapDataset; ...>\n",
        "E0000 00:00:1796055018.709247    9309 some_op.cc:10] a real error\n",
    ]
    assert quiet.keep_lines(captured) == [captured[-1]]
    # Without the "no cuda drivers" line a cuInit failure is a real driver problem: it stays.
    assert quiet.keep_lines(captured[3:]) == [captured[3], captured[-1]]


def test_filtered_stderr_keeps_a_killed_commands_last_words(tmp_path):
    """The filter is a child process: what a command wrote before SIGKILL still arrives, without the
    noise, and a command whose stderr is a file has it all there when it has exited."""
    code = ("import os, signal, sys; from trainer import quiet; quiet.filter_stderr(); "
            "sys.stderr.write('I0000 00:00:1.2 1 port.cc:153] oneDNN custom operations are on. x\\n'); "
            "sys.stderr.write('last words\\n'); sys.stderr.flush(); "
            "os.kill(os.getpid(), signal.SIGKILL) if sys.argv[1] == 'kill' else None")
    root = os.path.join(os.path.dirname(__file__), "..")
    killed = subprocess.run([sys.executable, "-c", code, "kill"], capture_output=True, text=True, cwd=root,
                            timeout=60)
    assert killed.returncode == -signal.SIGKILL and killed.stderr == "last words\n"
    with open(tmp_path / "log", "w") as log:
        done = subprocess.run([sys.executable, "-c", code, "exit"], stdout=log, stderr=subprocess.STDOUT,
                              cwd=root, timeout=60)
    assert done.returncode == 0 and open(tmp_path / "log").read() == "last words\n"


def test_op_determinism_follows_the_config():
    from tensorflow.python.framework import config as tf_config

    trainer_lib.set_determinism(config_lib.TrainConfig(op_determinism=False))
    assert not tf_config.is_op_determinism_enabled()
    trainer_lib.set_determinism(config_lib.TrainConfig())
    assert tf_config.is_op_determinism_enabled()


def test_trainer_modules_import_each_other_without_cycles():
    """Module-level and deferred imports alike: trainer modules form a DAG (train <-> report <->
    warm_start, config <-> experiments and models <-> mlr/retrieval/sequence used to be cycles)."""
    import ast
    import glob

    root = os.path.join(os.path.dirname(__file__), "..")
    graph = {}
    for path in glob.glob(os.path.join(root, "trainer", "**", "*.py"), recursive=True):
        name = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
        graph[name] = deps
    graph = {n: {d for d in deps if d in graph and d != n} for n, deps in graph.items()}
    assert {"trainer.train", "trainer.report", "trainer.config", "trainer.experiments"} <= set(graph)
    # The models package: its registry (base) imports no model module, and __init__ imports them all.
    assert {"trainer.models.base", "trainer.models.sequence"} <= set(graph)

    def visit(node, path):
        for dep in graph[node]:
            assert dep not in path, " -> ".join([*path, dep])
            visit(dep, [*path, dep])

    for name in graph:
        visit(name, [name])


def test_a_bfloat16_run_is_reloaded_in_float32_with_its_weights(tiny_etl, tmp_path):
    run_dir = str(tmp_path / "run")
    trainer_lib.train(config_lib.resolve("", overrides={
        "data": {"path": tiny_etl, "batch_size": 256},
        "model": {"name": "deepfm", "embedding_dim": 4, "hidden_units": [16], "mlp_dtype": "bfloat16"},
        "optimizer": {"learning_rate": 0.01}, "run_dir": run_dir,
        "train": {"epochs": 1, "steps_per_epoch": 5, "verbose": 0, "report": False}}))
    assert config_lib.load(os.path.join(run_dir, "config.yaml")).model.mlp_dtype == "bfloat16"
    cfg, schema, model = evaluation.load_trained(run_dir)
    assert cfg.model.mlp_dtype == "float32"
    assert [layer.compute_dtype for layer in model.mlp.dense] == ["float32"]
    # The trained weights, not a fresh initialisation: the same model in bfloat16 predicts within
    # bfloat16's rounding of the float32 one.
    bf16 = evaluation.init_model(build_model(dataclasses.replace(cfg.model, mlp_dtype="bfloat16"), schema), schema)
    bf16.set_weights(model.get_weights())
    features, _, _ = next(iter(data.make_dataset(schema, "eval", 256)))
    task = model.tasks[0]
    p32, p16 = model(features)[task].numpy(), bf16(features)[task].numpy()
    np.testing.assert_allclose(p16, p32, atol=2e-2)
    fresh = evaluation.init_model(build_model(cfg.model, schema), schema)
    assert not np.allclose(fresh(features)[task].numpy(), p32, atol=1e-3)
