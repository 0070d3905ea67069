"""Names of the files a training run writes into its run directory (no TensorFlow).

One place for the layout, so that the training loop, the PS chief, the tuner (which
must stay TensorFlow-free), the warm start and the report agree on it:

  config.yaml          the resolved ExperimentConfig
  backup/              kill-safe checkpoints (Keras BackupAndRestore), removed at the end
  best/state.json      early-stopping counters; best/weights: the best epoch's weights
  progress.jsonl       one line per start/epoch/end with the optimizer step
  history.json         one entry per epoch: seconds, examples/s, metrics per split
  model/weights        final weights (read by ``evaluation.load_trained`` and the exporter)
  metrics.json         per-task metrics on the eval split (what the run reports)
  metrics_valid.json   the same on the valid split, when the schema has one (what selects)
  report/              ROC and reliability plots (``trainer.report``)
  tensorboard/         TensorBoard logs
  ps_checkpoints/      per-epoch checkpoints of a parameter-server run
  cluster.json         ports and pids of a local parameter-server cluster
  timing.json          training seconds and throughput of a parameter-server run
"""
from __future__ import annotations

import os

CONFIG_FILE = "config.yaml"
BACKUP_DIR = "backup"
BEST_DIR = "best"
BEST_STATE = os.path.join(BEST_DIR, "state.json")
PROGRESS_FILE = "progress.jsonl"
HISTORY_FILE = "history.json"
WEIGHTS_DIR = "model"
METRICS_FILE = "metrics.json"
VALID_METRICS_FILE = "metrics_valid.json"
REPORT_DIR = "report"
TENSORBOARD_DIR = "tensorboard"
PS_CHECKPOINT_DIR = "ps_checkpoints"
CLUSTER_FILE = "cluster.json"
TIMING_FILE = "timing.json"


def weights_prefix(run_dir: str) -> str:
    """Checkpoint prefix of a run's final weights."""
    return os.path.join(run_dir, WEIGHTS_DIR, "weights")
