"""Parameter-server training with ``tf.distribute.ParameterServerStrategy`` and ``Model.fit``.

Roles come from ``TF_CONFIG`` (chief, worker, ps), so one code path serves both
ways to run:

* a local cluster of processes on loopback, started and torn down by

      python -m trainer.distributed launch --workers 2 --ps 2 -- --data data/etl --model ffm --run_dir runs/ps

  (``make train DISTRIBUTE=ps WORKERS=2 PS=2``); every process is killed at the
  end, also on failure or Ctrl-C, and a job whose parameter server died is
  restarted (``--max_restarts``) and resumes from its last checkpoint;
* real machines: each worker and parameter server runs
  ``python -m trainer.distributed server`` and the chief runs
  ``python -m trainer.distributed chief <trainer flags>``, each with its own
  ``TF_CONFIG`` (docs/DISTRIBUTED.md).

Embedding tables are sharded across the parameter servers by
``MinSizePartitioner`` (shards of at least ``--min_shard_bytes``, at most one
per parameter server), so a table sized from the schema's ``num_features``
splits evenly. Each worker reads a disjoint subset of the TFRecord shards. The
chief coordinates, checkpoints every epoch and, at the end, copies the sharded
variables into an ordinary single-process model, which it evaluates and saves
exactly like ``trainer.train`` does: the export of a distributed run is an
ordinary SavedModel with no parameter-server dependency.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

from trainer.run_files import CLUSTER_FILE, PS_CHECKPOINT_DIR as CHECKPOINT_DIR  # noqa: F401  (names for callers)

# Exit status of a chief whose job failed because a parameter server is gone.
PS_FAILURE_EXIT = 75


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_cluster(workers: int, ps: int) -> dict:
    """Cluster spec of one chief, ``workers`` workers and ``ps`` parameter servers on loopback."""
    if workers < 1 or ps < 1:
        raise ValueError(f"need at least one worker and one parameter server (got {workers}, {ps})")
    return {"chief": [f"127.0.0.1:{free_port()}"],
            "worker": [f"127.0.0.1:{free_port()}" for _ in range(workers)],
            "ps": [f"127.0.0.1:{free_port()}" for _ in range(ps)]}


def tf_config(cluster: dict, task_type: str, index: int) -> str:
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


def run_server() -> None:
    """Runs this process's worker or ps role from TF_CONFIG until killed."""
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if resolver.task_type not in ("worker", "ps"):
        raise SystemExit(f"server role must be worker or ps, TF_CONFIG says {resolver.task_type!r}")
    # Workers run the training closures: keep them to one intra-op thread each on small machines.
    server = tf.distribute.Server(resolver.cluster_spec(), job_name=resolver.task_type,
                                  task_index=resolver.task_id, protocol="grpc", start=True)
    server.join()


def train_ps(cfg, num_ps: int | None = None, min_shard_bytes: int = 64 << 10) -> dict:
    """Trains ``cfg`` on the cluster in TF_CONFIG (this process is the chief); returns eval metrics.

    The loop of ``trainer.train`` with the model under ``ParameterServerStrategy``: the same
    compiled loss, metrics and per-task weights (``build_and_compile``, ``train_dataset``), the
    same end of epoch (``epochs.EpochRecorder``: evaluation, history.json, early stopping) and
    the same finish (``finish_run``: metrics.json, the report). ``Model.fit`` under the strategy
    reports no validation, so at every epoch end the chief reads the epoch's checkpoint into an
    ordinary copy of the model and the recorder evaluates that copy.
    """
    import tensorflow as tf
    import tf_keras as keras

    from trainer import run_files
    from trainer import train as trainer_lib
    from trainer.epochs import EpochRecorder
    from trainer.models import build_model

    manager_dir = os.path.join(cfg.run_dir, run_files.PS_CHECKPOINT_DIR)
    resumed = bool(tf.train.latest_checkpoint(manager_dir))
    schema = trainer_lib.start_run(cfg, resumed)
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    num_ps = num_ps or len(resolver.cluster_spec().as_dict().get("ps", []))
    num_workers = len(resolver.cluster_spec().as_dict().get("worker", []))
    partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=min_shard_bytes, max_shards=num_ps)
    strategy = tf.distribute.ParameterServerStrategy(resolver, variable_partitioner=partitioner)
    with strategy.scope():
        model = trainer_lib.build_and_compile(cfg, schema)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")

    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=epoch_var)
    manager = tf.train.CheckpointManager(ckpt, manager_dir, max_to_keep=2)
    initial_epoch = 0
    # The chief's ordinary (unsharded) copy of the model: warm start, per-epoch evaluation, the export.
    plain = trainer_lib.init_model(build_model(cfg.model, schema), schema)
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint)
        initial_epoch = int(epoch_var.numpy())
        print(f"distributed: resumed from {manager.latest_checkpoint} at epoch {initial_epoch}", flush=True)
    elif cfg.train.warm_start:
        # Yesterday's values are mapped into the plain model (vocabulary rows remapped by feature
        # hash, as in one process), then restored into the sharded variables through a checkpoint,
        # which stores each table whole and splits it across the parameter servers on restore.
        from trainer.warm_start import warm_start

        print("train: " + warm_start(plain, schema, cfg.train.warm_start).summary(), flush=True)
        path = tf.train.Checkpoint(model=plain).write(os.path.join(cfg.run_dir, "warm_start", "weights"))
        tf.train.Checkpoint(model=model).read(path).expect_partial()

    train_files = []
    for pattern in schema.split_files("train"):
        train_files.extend(sorted(tf.io.gfile.glob(pattern)))
    tasks = model.tasks

    def dataset_fn(ctx):
        # Disjoint TFRecord shards per worker input pipeline, each with its own shuffle seed.
        files = train_files[ctx.input_pipeline_id::ctx.num_input_pipelines] or train_files
        return trainer_lib.train_dataset(cfg, schema, tasks, repeat=True, files=files,
                                         seed=cfg.train.seed + ctx.input_pipeline_id)

    steps_per_epoch = max(1, trainer_lib.steps_per_epoch(cfg, schema) or 1)
    recorder = EpochRecorder(cfg, schema, plain, resumed, prefix="distributed")
    plain_ckpt = tf.train.Checkpoint(model=plain)

    class EpochCheckpoint(keras.callbacks.Callback):
        """Checkpoints the cluster every epoch and hands the epoch to the recorder."""

        train_seconds = 0.0  # fit time without the chief's evaluations (timing.json)

        def on_train_begin(self, logs=None):
            recorder.begin()

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.time()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.time() - self.start
            EpochCheckpoint.train_seconds += seconds
            epoch_var.assign(epoch + 1)
            path = manager.save(checkpoint_number=epoch + 1)
            plain_ckpt.read(path).expect_partial()
            if recorder.epoch_end(epoch + 1, steps_per_epoch, seconds, logs)["stop"]:
                self.model.stop_training = True

    start = time.time()
    if initial_epoch < cfg.train.epochs and not recorder.stopped:
        # verbose=0: the recorder prints the line per epoch (there is no progress bar under PSS).
        model.fit(keras.utils.experimental.DatasetCreator(dataset_fn), epochs=cfg.train.epochs,
                  initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch,
                  callbacks=[EpochCheckpoint()], verbose=0)
    elapsed = time.time() - start
    last_epoch = int(epoch_var.numpy())
    steps_run = steps_per_epoch * max(0, last_epoch - initial_epoch)
    fit_seconds = EpochCheckpoint.train_seconds
    with open(os.path.join(cfg.run_dir, run_files.TIMING_FILE), "w", encoding="utf-8") as f:
        json.dump({"train_seconds": fit_seconds, "steps": steps_run, "batch_size": cfg.data.batch_size,
                   "examples_per_second": steps_run * cfg.data.batch_size / fit_seconds if fit_seconds else None}, f)
    shards = {}
    for v in model.variables:
        if "/part_" in v.name:
            shards.setdefault(v.name.split("/part_")[0], []).append(int(v.shape[0]))
    print("distributed: sharded tables " + json.dumps(shards, sort_keys=True), flush=True)

    # An ordinary model with the trained values: evaluated and saved as a single-process run.
    # The values travel through a checkpoint, which reads them from the parameter servers and
    # stores each ShardedVariable whole (reading the chief's cached copies could be stale).
    final = manager.save(checkpoint_number=last_epoch + 1)
    tf.train.Checkpoint(model=plain).read(final).expect_partial().assert_existing_objects_matched()
    recorder.end(last_epoch)
    return trainer_lib.finish_run(cfg, schema, plain, elapsed,
                                  f"{cfg.model.name} (ps: {num_workers} workers, {num_ps} ps)")


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def launch(train_args: list[str], workers: int, ps: int, run_dir: str, max_restarts: int = 1) -> int:
    """Starts a local cluster, runs the chief to completion, tears everything down.

    Returns:
      The chief's exit status (0 on success).
    """
    attempt = 0
    while True:
        cluster = local_cluster(workers, ps)
        procs = []
        try:
            env = dict(os.environ)
            for job in ("ps", "worker"):
                for i in range(len(cluster[job])):
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "trainer.distributed", "server"],
                        env={**env, "TF_CONFIG": tf_config(cluster, job, i)}, start_new_session=True))
            chief = subprocess.Popen([sys.executable, "-m", "trainer.distributed", "chief", *train_args],
                                     env={**env, "TF_CONFIG": tf_config(cluster, "chief", 0)},
                                     start_new_session=True)
            procs.append(chief)
            os.makedirs(run_dir, exist_ok=True)
            roles = [("ps", i) for i in range(ps)] + [("worker", i) for i in range(workers)] + [("chief", 0)]
            with open(os.path.join(run_dir, CLUSTER_FILE), "w", encoding="utf-8") as f:
                json.dump({"cluster": cluster, "attempt": attempt,
                           "pids": {f"{r}:{i}": p.pid for (r, i), p in zip(roles, procs)}}, f)
            rc = chief.wait()
        finally:
            _kill(procs)
        if rc == PS_FAILURE_EXIT and attempt < max_restarts:
            attempt += 1
            print(f"distributed: a parameter server failed; restarting the cluster "
                  f"(attempt {attempt}/{max_restarts}), resuming from the last checkpoint", flush=True)
            continue
        return rc


def _is_ps_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return any(s in text for s in ("/job:ps", "job:ps", "UnavailableError", "Unavailable", "failed to connect"))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("launch", "server", "chief"):
        raise SystemExit("usage: python -m trainer.distributed {launch|server|chief} ...")
    role, rest = argv[0], argv[1:]
    if role == "server":
        run_server()
        return
    if role == "chief":
        from trainer import train as trainer_lib

        p = argparse.ArgumentParser(add_help=False)
        p.add_argument("--min_shard_bytes", type=int, default=64 << 10)
        extra, train_argv = p.parse_known_args(rest)
        cfg = trainer_lib.resolve_from_args(trainer_lib.parse_args(train_argv))
        try:
            train_ps(cfg, min_shard_bytes=extra.min_shard_bytes)
        except Exception as e:  # noqa: BLE001  (classify, then re-raise as an exit status)
            if _is_ps_failure(e):
                print(f"distributed: parameter server failure: {type(e).__name__}: {str(e)[:300]}", flush=True)
                os._exit(PS_FAILURE_EXIT)
            raise
        # The coordinator's threads keep the process alive; the work is done and saved.
        sys.stdout.flush()
        os._exit(0)
    p = argparse.ArgumentParser(description="Run a local parameter-server cluster for trainer flags after --")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ps", type=int, default=2)
    p.add_argument("--max_restarts", type=int, default=1, help="cluster restarts after a parameter-server failure")
    p.add_argument("--min_shard_bytes", type=int, default=64 << 10, help="smallest embedding shard")
    args, train_args = p.parse_known_args(rest)
    if train_args and train_args[0] == "--":
        train_args = train_args[1:]
    from trainer import train as trainer_lib

    cfg = trainer_lib.resolve_from_args(trainer_lib.parse_args(train_args))
    rc = launch(["--min_shard_bytes", str(args.min_shard_bytes), *train_args], args.workers, args.ps,
                cfg.run_dir, args.max_restarts)
    raise SystemExit(rc)


if __name__ == "__main__":
    from trainer import quiet

    quiet.filter_stderr()  # before TensorFlow's first import (a local cluster's processes share the launcher's)
    main()
