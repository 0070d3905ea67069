"""Training speed: FFM time to libffm's best logloss, DeepFM against DeepCTR, per-model step throughput.

    python -m bench.bench_train [--etl data/frappe,data/etl] [--data ../shared/data]
        [--ffm_experiment frappe_ffm_fast] [--ffm_train PATH] [--deepfm_experiment frappe_deepfm_deepctr]
        [--rounds 2] [--batch_sizes 1024,4096] [--steps 20] [--models lr,fm,...] [--skip ffm,deepfm,steps]
        [--ffm_levers] [--deepfm_levers] [--quality] [--out runs/bench/train.json]

In one run, on Frappe (``make etl`` output ``data/frappe``, built first when missing):

* **FFM vs libffm, time to quality.** libffm's ``ffm-train -k 32 -l 0.001 -r 0.2 -s 1 -t 200 --auto-stop``
  (k and lambda from ``--ffm_experiment``; 1 thread; from PATH or ``--ffm_train``; build it from
  https://github.com/ycjuan/libffm with ``make``) on the same train/test files gives its best eval
  logloss and its ``tr_time`` column at that iteration (training seconds, its evaluation passes
  excluded). Then ``--ffm_experiment`` trains the way ``make train`` does (same datasets, an eval pass
  after every epoch) until its eval logloss is at or below libffm's best. Its time counts from the
  start of ``fit`` (graph tracing and XLA compilation included, model construction excluded, as
  libffm's timer starts after its model is allocated): "train" leaves the eval passes out like
  libffm's column, "with eval" keeps them. Bar: train time / libffm's time <= 5 (goal <= 1).
* **DeepFM vs DeepCTR 0.9.4** at DeepCTR's shape (embedding 10, DNN 400-400, batch 1024, Adam 1e-3;
  DeepCTR's default L2 1e-5 on embeddings and linear weights): examples/s of a whole training epoch
  (the best of epochs 2-3, so tracing and compilation are left out) of ``deepctr.models.DeepFM`` on
  label-encoded NumPy arrays and of ``--deepfm_experiment``: with the training input ``make train``
  gives it (the headline ratio; for ``frappe_deepfm_deepctr`` the split featurized once and held in
  memory, ``data.featurize_once`` auto, reshuffled every epoch as Keras does with DeepCTR's arrays),
  and as context on the cached TFRecord pipeline parsed every epoch (``data.featurize_once=false``),
  on one pass of its batches replayed from memory (no reshuffle), and on the pipeline with the
  settings before the speed work (``DEEPFM_BEFORE``: float32 DNN, one step per execution, sparse
  layout, parsed every epoch), next to the DNN alone (float32) on random arrays (a ceiling for a
  float32 DeepFM at that shape). The six alternate ``--rounds`` times; the best round of each counts.
  Also printed: the headline ratio per round, and the ratio of examples per CPU-second of the process
  (ours and DeepCTR), which moves less when other jobs share the cores.
  Needs the ``bench`` extra (DeepCTR, pandas, scikit-learn). Bar: >= 1.5x (goal 3x).
* **Step throughput** of every registered model (its default config, ``train.jit_compile`` off and on)
  and of the input pipeline alone, at each ``--batch_sizes``: ``--steps`` timed ``fit`` steps after as
  many warm-up steps. A model runs on the first ``--etl`` directory whose schema it accepts
  (multi-task models need the generated log's two labels: ``data/etl``, built by ``make etl``).
* ``--ffm_levers``: the FFM measurement again for each speed lever added one at a time to
  ``frappe_ffm`` (``FFM_LEVERS``): the layers before the speed work (git revision
  ``BASELINE_REVISION``), the field-space layer, XLA, steps per execution, rate, batch size, L2 off.
  Each FFM measurement runs in a fresh process.
* ``--deepfm_levers``: the DeepFM rate (with its training input) again for each speed lever added one at a
  time to ``--deepfm_experiment``'s settings before the speed work (``DEEPFM_LEVERS``: inter-op
  threads, steps per execution, XLA, the DNN in bfloat16, the dense layout of single-valued fields
  ``data.dense_ids``, the split featurized once ``data.featurize_once``), each in a fresh process,
  alternated with DeepCTR ``--rounds`` times.
* ``--quality``: trains ``frappe_ffm``, ``frappe_deepfm`` and ``frappe_wide_deep`` as ``make train``
  does and checks README's bars (FFM AUC >= 0.955 and logloss <= 0.219; the others AUC >= 0.945 and
  logloss <= 0.290). About 10 minutes.

Prints the tables and the bars (met / not met) with the load average, and writes ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAPPE_TRAIN = "frappe.validation.libfm"
FRAPPE_EVAL = "frappe.test.libfm"
FRAPPE_FIELDS = "frappe.fields.tsv"
LIBFFM_ETA = 0.2  # libffm's tuned rate on Frappe (the grid)
FFM_BAR, FFM_GOAL = 5.0, 1.0
DEEPFM_BAR, DEEPFM_GOAL = 1.5, 3.0
# DeepCTR's benchmark shape: the comparison.
DEEPCTR_SHAPE = {"embedding_dim": 10, "hidden_units": (400, 400), "batch_size": 1024, "learning_rate": 1e-3,
                 "l2": 1e-5}
QUALITY_BARS = {"frappe_ffm": (0.955, 0.219), "frappe_deepfm": (0.945, 0.290),
                "frappe_wide_deep": (0.945, 0.290)}


def _frappe_make_args(data_root: str, out: str) -> list[str]:
    f = os.path.join(data_root, "frappe")
    return ["make", "etl", f"INPUT={os.path.join(f, FRAPPE_TRAIN)}", f"EVAL_INPUT={os.path.join(f, FRAPPE_EVAL)}",
            "FORMAT=libfm", f"FIELD_MAP={os.path.join(f, FRAPPE_FIELDS)}", f"OUT={out}"]


def ensure_etl(path: str, data_root: str) -> bool:
    """Builds the default ETL outputs when missing; returns whether ``path`` holds a schema."""
    if os.path.exists(os.path.join(path, "schema.json")):
        return True
    norm = os.path.normpath(path)
    if norm == os.path.normpath("data/frappe") and os.path.isdir(os.path.join(data_root, "frappe")):
        cmd = _frappe_make_args(data_root, path)
    elif norm == os.path.normpath("data/etl"):
        cmd = ["make", "etl"]
    else:
        print(f"bench_train: {path} has no schema.json, skipped (run `make etl ... OUT={path}`)")
        return False
    print(f"bench_train: building {path}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return True


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_seconds() -> float:
    """CPU seconds of this process (all threads): less sensitive than wall time to other jobs."""
    t = os.times()
    return t.user + t.system


class EpochClock(keras.callbacks.Callback):
    """Per epoch: wall seconds since ``fit`` began (eval included), training seconds so far (eval
    passes left out), the epoch's own training wall and CPU seconds and its logs; stops at
    ``target`` eval logloss."""

    def __init__(self, target: float | None = None):
        super().__init__()
        self.target = target
        self.epochs = []

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()
        self.train_seconds = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()
        self.epoch_cpu = _cpu_seconds()
        self.epoch_train = None

    def on_test_begin(self, logs=None):
        if self.epoch_train is None:  # the eval pass that follows the epoch's training steps
            self.epoch_train = time.perf_counter() - self.epoch_start
            self.epoch_train_cpu = _cpu_seconds() - self.epoch_cpu

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        if self.epoch_train is None:
            self.epoch_train, self.epoch_train_cpu = now - self.epoch_start, _cpu_seconds() - self.epoch_cpu
        train = self.epoch_train
        self.train_seconds += train
        self.epochs.append({"epoch": epoch + 1, "seconds": now - self.start, "train_seconds": self.train_seconds,
                            "epoch_train_seconds": train, "epoch_train_cpu_seconds": self.epoch_train_cpu,
                            **{k: float(v) for k, v in (logs or {}).items()}})
        if self.target is not None and logs and logs.get("val_logloss", math.inf) <= self.target:
            self.model.stop_training = True


# ---------------------------------------------------------------------------------------------- FFM


def frappe_field_ids(frappe_dir: str) -> dict[str, int]:
    """Feature -> field index of the Frappe field map (fields numbered in order of appearance)."""
    field_of, ids = {}, {}
    with open(os.path.join(frappe_dir, FRAPPE_FIELDS), encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            field_of[row["feature"]] = ids.setdefault(row["field"], len(ids))
    return field_of


def libfm_to_libffm(src: str, dst: str, field_of: dict[str, int]) -> None:
    """Rewrites ``label feat:val ...`` as libffm's ``0|1 field:feat:val ...`` (label > 0 is positive)."""
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            toks = ["1" if float(parts[0]) > 0 else "0"]
            for tok in parts[1:]:
                feat, val = tok.rsplit(":", 1)
                toks.append(f"{field_of[feat]}:{feat}:{val}")
            out.write(" ".join(toks) + "\n")


def parse_libffm_log(stdout: str) -> dict:
    """Best iteration of an ``ffm-train -p ... --auto-stop`` log.

    Rows are ``iter tr_logloss va_logloss tr_time`` (cumulative training seconds); with auto-stop the
    last row (the first rise) has no time and the model kept is the iteration before it.
    """
    rows = [line.split() for line in stdout.splitlines()]
    rows = [r for r in rows if len(r) >= 3 and r[0].isdigit()]
    timed = [r for r in rows if len(r) == 4]
    if not timed:
        raise RuntimeError(f"unexpected ffm-train output:\n{stdout}")
    best = min(timed, key=lambda r: float(r[2]))
    return {"best_iteration": int(best[0]), "best_logloss": float(best[2]), "seconds": float(best[3]),
            "iterations_run": int(rows[-1][0]), "per_iteration": [[int(r[0]), float(r[2])] + r[3:] for r in rows]}


def run_libffm(binary: str, frappe_dir: str, k: int, lam: float, eta: float = LIBFFM_ETA) -> dict:
    """libffm with auto-stop on the Frappe test file: its best eval logloss and training seconds there."""
    field_of = frappe_field_ids(frappe_dir)
    cmd = [binary, "-k", str(k), "-l", str(lam), "-r", str(eta), "-s", "1", "-t", "200", "--auto-stop"]
    with tempfile.TemporaryDirectory() as tmp:
        tr, va = os.path.join(tmp, "tr.ffm"), os.path.join(tmp, "va.ffm")
        libfm_to_libffm(os.path.join(frappe_dir, FRAPPE_TRAIN), tr, field_of)
        libfm_to_libffm(os.path.join(frappe_dir, FRAPPE_EVAL), va, field_of)
        # ffm-train writes <basename>.bin caches into its working directory.
        out = subprocess.run(cmd + ["-p", va, tr, os.path.join(tmp, "model")], capture_output=True, text=True,
                             check=True, cwd=tmp)
    return {"command": " ".join([os.path.basename(binary)] + cmd[1:]), **parse_libffm_log(out.stdout)}


def _datasets(cfg, schema, model):
    """Training and eval datasets exactly as ``trainer.train.train`` builds them."""
    from trainer import data, train

    examples = schema.splits["train"]["examples"]
    steps = cfg.train.steps_per_epoch or math.ceil(examples / cfg.data.batch_size)
    train_ds = train.train_dataset(cfg, schema, model.tasks, repeat=True)
    eval_ds = train._select(data.make_dataset(schema, "eval", cfg.data.eval_batch_size), model.tasks, cfg.train,
                            training=False)
    eval_steps = math.ceil(schema.splits["eval"]["examples"] / cfg.data.eval_batch_size)
    return train_ds, eval_ds, steps, eval_steps


def ffm_time_to_logloss(experiment: str, data_path: str, target: float, max_epochs: int,
                        overrides: dict | None = None, revision: str = "") -> dict:
    """``_ffm_time_to_logloss`` in a fresh process, as ``make train`` runs (one-time costs such as
    initialising XLA's compiler fall on every run alike); ``revision``: with ``trainer/layers.py``
    and ``trainer/models.py`` (a module before ``trainer/models/`` became a package) as of that git revision."""
    payload = {"experiment": experiment, "data_path": data_path, "target": target, "max_epochs": max_epochs,
               "overrides": overrides or {}, "revision": revision}
    out = subprocess.run([sys.executable, "-m", "bench.bench_train", "--ffm_run", json.dumps(payload)],
                         capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT)]
    if out.returncode or not lines:
        raise RuntimeError(f"FFM run {payload} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


RESULT = "bench_train result: "


def _load_revision(revision: str) -> None:
    """Imports ``trainer.layers`` and ``trainer.models`` as of a git revision (before anything imports them).

    The files are written by ``git show`` into a temporary directory and imported from there under
    the package's names, so the rest of the trainer uses them.
    """
    import importlib.util

    import trainer

    tmp = tempfile.mkdtemp(prefix=f"bench-train-{revision}-")
    for name in ("layers", "models"):
        path = os.path.join(tmp, f"{name}.py")
        with open(path, "w") as f:
            f.write(subprocess.run(["git", "show", f"{revision}:trainer/{name}.py"], cwd=REPO, capture_output=True,
                                   text=True, check=True).stdout)
        spec = importlib.util.spec_from_file_location(f"trainer.{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module.__name__] = module
        spec.loader.exec_module(module)
        setattr(trainer, name, module)


def _ffm_time_to_logloss(experiment: str, data_path: str, target: float, max_epochs: int,
                         overrides: dict | None = None, revision: str = "") -> dict:
    """Trains a named experiment as ``make train`` does until its eval logloss reaches ``target``."""
    if revision:
        _load_revision(revision)
    from feature_schema import configs, load_schema
    from trainer import config as config_lib
    from trainer import train

    keras.backend.clear_session()
    cfg = config_lib.resolve(experiment, "", configs.deep_merge(overrides or {}, {"data": {"path": data_path}}))
    keras.utils.set_random_seed(cfg.train.seed)
    schema = load_schema(data_path)
    model = train.init_model(train.build_and_compile(cfg, schema), schema)
    train_ds, eval_ds, steps, eval_steps = _datasets(cfg, schema, model)
    clock = EpochClock(target)
    # validation_steps: Keras needs the eval size when steps_per_execution > 1.
    model.fit(train_ds, validation_data=eval_ds, validation_steps=eval_steps, epochs=max_epochs,
              steps_per_epoch=steps, callbacks=[clock], verbose=0)
    reached = [e for e in clock.epochs if e["val_logloss"] <= target]
    first = reached[0] if reached else None
    steady = [e["epoch_train_seconds"] for e in clock.epochs[1:]]
    steady_cpu = [e["epoch_train_cpu_seconds"] for e in clock.epochs[1:]]
    examples = steps * cfg.data.batch_size
    return {"experiment": experiment, "overrides": overrides or {}, "revision": revision, "k": cfg.model.embedding_dim,
            "lambda": cfg.model.l2_embedding,
            "batch_size": cfg.data.batch_size, "learning_rate": cfg.optimizer.learning_rate,
            "jit_compile": cfg.train.jit_compile, "steps_per_execution": cfg.train.steps_per_execution,
            "target_logloss": target, "reached": first is not None,
            "epochs": first["epoch"] if first else None,
            "train_seconds": first["train_seconds"] if first else None,
            "seconds_with_eval": first["seconds"] if first else None,
            "best_logloss": min(e["val_logloss"] for e in clock.epochs),
            "first_epoch_train_seconds": clock.epochs[0]["epoch_train_seconds"],
            "steady_examples_per_s": examples / float(np.median(steady)) if steady else None,
            "steady_examples_per_cpu_s": examples / float(np.median(steady_cpu)) if steady_cpu else None,
            "history": clock.epochs}


# One lever at a time on top of the rows before it, on frappe_ffm: (name, overrides, git revision of
# trainer/layers.py and trainer/models.py or ""). A name starting with a space is measured on top of
# the row before it without being kept for the next rows.
BASELINE_REVISION = "120b071"  # the layers before the speed work: [B, n, F, k] lookup, [B, n, n, k] gather
FFM_LEVERS = [
    ("before: layers of " + BASELINE_REVISION, {"train": {"jit_compile": False}}, BASELINE_REVISION),
    (" same, train.jit_compile", {"train": {"jit_compile": True}}, BASELINE_REVISION),
    ("field-space FFM, dense gradients (no XLA)", {"train": {"jit_compile": False}}, ""),
    ("+ train.jit_compile (XLA)", {"train": {"jit_compile": True}}, ""),
    (" + train.steps_per_execution=16", {"train": {"steps_per_execution": 16}}, ""),
    ("+ rate 1.0", {"optimizer": {"learning_rate": 1.0}}, ""),
    ("+ batch 1862, eval batch 4810 (one shape per step) = frappe_ffm_fast",
     {"data": {"batch_size": 1862, "eval_batch_size": 4810},
      "optimizer": {"initial_accumulator_value": 1.0 / 1862 ** 2}}, ""),
    (" + train.steps_per_execution=16", {"train": {"steps_per_execution": 16}}, ""),
    (" without L2 (lambda 0: what L2 on touched rows costs)", {"model": {"l2_embedding": 0.0}}, ""),
]


def ffm_levers(data_path: str, target: float, max_epochs: int) -> list[dict]:
    """FFM_LEVERS: time to ``target`` of each row, each in a fresh process."""
    from feature_schema import configs

    rows, kept = [], {}
    for name, overrides, revision in FFM_LEVERS:
        cfg = configs.deep_merge(kept, overrides)
        if not name.startswith(" "):
            kept = cfg
        r = ffm_time_to_logloss("frappe_ffm", data_path, target, max_epochs, cfg, revision)
        rows.append({"lever": name.strip(), **{k: v for k, v in r.items() if k != "history"}})
        print(f"bench_train: FFM {name.strip()}: {_fmt_rate(r['steady_examples_per_s'])}/s, "
              f"epochs {r['epochs']}, {r['train_seconds']} s", flush=True)
    return rows


# ------------------------------------------------------------------------------------------- DeepFM


def frappe_arrays(frappe_dir: str):
    """Frappe's train split as DeepCTR takes it: ({field: label-encoded ids}, labels, vocabulary sizes)."""
    field_name = {}
    with open(os.path.join(frappe_dir, FRAPPE_FIELDS), encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            field_name[row["feature"]] = row["field"]
    fields = list(dict.fromkeys(field_name.values()))
    codes = {name: {} for name in fields}
    x = {name: [] for name in fields}
    y = []
    with open(os.path.join(frappe_dir, FRAPPE_TRAIN), encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            y.append(1.0 if float(parts[0]) > 0 else 0.0)
            for tok in parts[1:]:
                feat = tok.rsplit(":", 1)[0]
                name = field_name[feat]
                x[name].append(codes[name].setdefault(feat, len(codes[name])))
    return ({n: np.asarray(v, np.int32) for n, v in x.items()}, np.asarray(y, np.float32),
            {n: len(c) for n, c in codes.items()})


def _best_epoch_rates(clock: EpochClock, examples: int) -> tuple[float, float]:
    """(examples/s, examples per CPU-second of the process) of the best training epoch after the first
    (tracing and compilation left out). The CPU figure moves less with other jobs on the machine: it
    drops out the time the process waits for a core, not the cores it uses."""
    later = clock.epochs[1:]
    return (examples / min(e["epoch_train_seconds"] for e in later),
            examples / min(e["epoch_train_cpu_seconds"] for e in later))


def deepctr_rate(frappe_dir: str, epochs: int = 3) -> tuple[float, float]:
    """(examples/s, examples per CPU-second) of DeepCTR 0.9.4's DeepFM at DeepCTR's shape (best of epochs 2..)."""
    from deepctr.feature_column import SparseFeat
    from deepctr.models import DeepFM

    keras.backend.clear_session()
    x, y, vocab = frappe_arrays(frappe_dir)
    s = DEEPCTR_SHAPE
    columns = [SparseFeat(n, vocabulary_size=v, embedding_dim=s["embedding_dim"]) for n, v in vocab.items()]
    model = DeepFM(columns, columns, dnn_hidden_units=s["hidden_units"], l2_reg_linear=s["l2"],
                   l2_reg_embedding=s["l2"], task="binary")
    model.compile(keras.optimizers.Adam(s["learning_rate"]), "binary_crossentropy")
    clock = EpochClock()
    model.fit(x, y, batch_size=s["batch_size"], epochs=epochs, verbose=0, callbacks=[clock])
    return _best_epoch_rates(clock, len(y))


# The settings of frappe_deepfm_deepctr before this speed work: float32 DNN, one step per execution,
# the sparse layout.
DEEPFM_BEFORE = {"model": {"mlp_dtype": "float32"}, "train": {"steps_per_execution": 1},
                 "data": {"dense_ids": False, "featurize_once": False}}
# The TFRecord pipeline parsed and featurized every epoch (the training input before featurize-once).
PARSE_EVERY_EPOCH = {"data": {"featurize_once": False}}


def ours_deepfm_rate(experiment: str, data_path: str, in_memory: bool, epochs: int = 3,
                     overrides: dict | None = None) -> tuple[float, object, float]:
    """(examples/s, resolved config, examples per CPU-second) of a whole training epoch of a named DeepFM
    experiment (best of epochs 2..).

    ``in_memory``: one pass of the training input's batches replayed from memory (no per-epoch
    reshuffle); else the training input ``make train`` uses (``trainer.train.train_dataset``).
    ``overrides``: config overrides on top of the experiment (``DEEPFM_BEFORE``, ``PARSE_EVERY_EPOCH``).
    """
    from feature_schema import configs, load_schema
    from trainer import config as config_lib
    from trainer import train

    keras.backend.clear_session()
    cfg = config_lib.resolve(experiment, "", configs.deep_merge(overrides or {}, {"data": {"path": data_path}}))
    keras.utils.set_random_seed(cfg.train.seed)
    schema = load_schema(data_path)
    model = train.init_model(train.build_and_compile(cfg, schema), schema)
    train_ds, _, steps, _ = _datasets(cfg, schema, model)
    if in_memory:
        train_ds = train_ds.take(steps).cache().repeat()
    clock = EpochClock()
    model.fit(train_ds, epochs=epochs, steps_per_epoch=steps, callbacks=[clock], verbose=0)
    wall, cpu = _best_epoch_rates(clock, steps * cfg.data.batch_size)
    return wall, cfg, cpu


def mlp_only_rate(examples: int, fields: int, epochs: int = 3) -> float:
    """Examples/s of DeepCTR's shape's DNN alone (fields x 10 inputs -> 400 -> 400 -> 1, Adam) on random
    arrays in memory: a ceiling for any DeepFM at that shape, whose other parts only add time."""
    s = DEEPCTR_SHAPE
    keras.backend.clear_session()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(examples, fields * s["embedding_dim"])).astype(np.float32)
    y = (rng.random(examples) < 0.33).astype(np.float32)
    model = keras.Sequential([keras.layers.Dense(u, activation="relu") for u in s["hidden_units"]]
                             + [keras.layers.Dense(1, activation="sigmoid")])
    model.compile(keras.optimizers.Adam(s["learning_rate"]), "binary_crossentropy")
    clock = EpochClock()
    model.fit(x, y, batch_size=s["batch_size"], epochs=epochs, verbose=0, callbacks=[clock])
    return examples / min(e["epoch_train_seconds"] for e in clock.epochs[1:])


# One lever at a time on ``--deepfm_experiment``, from the settings before the speed work: (name,
# overrides). A name starting with a space is measured on top of the kept rows without being kept.
# Names are keys: each must be unique.
DEEPFM_LEVERS = [
    ("before: float32 DNN, 1 step per execution", DEEPFM_BEFORE),
    (" + inter-op threads 1 (TF_NUM_INTEROP_THREADS=1)", {"_env": {"TF_NUM_INTEROP_THREADS": "1"}}),
    ("+ train.steps_per_execution=8", {"train": {"steps_per_execution": 8}}),
    (" + train.jit_compile (XLA), float32 DNN", {"train": {"jit_compile": True}}),
    ("+ model.mlp_dtype=bfloat16", {"model": {"mlp_dtype": "bfloat16"}}),
    (" + train.jit_compile (XLA), bfloat16 DNN", {"train": {"jit_compile": True}}),
    (" + steps_per_execution=32", {"train": {"steps_per_execution": 32}}),
    ("+ data.dense_ids (single-valued fields as dense [batch, fields] ids)", {"data": {"dense_ids": True}}),
    (" + inter-op threads 1 on dense ids", {"_env": {"TF_NUM_INTEROP_THREADS": "1"}}),
    ("+ data.featurize_once auto (held in memory, permuted every epoch) = frappe_deepfm_deepctr",
     {"data": {"featurize_once": None}}),
]


def _deepfm_rate_process(experiment: str, data_path: str, overrides: dict) -> float:
    """``ours_deepfm_rate`` (its training input) in a fresh process (thread settings apply at start-up)."""
    overrides = dict(overrides)
    env = {**os.environ, **overrides.pop("_env", {})}
    payload = {"experiment": experiment, "data_path": data_path, "overrides": overrides}
    out = subprocess.run([sys.executable, "-m", "bench.bench_train", "--deepfm_run", json.dumps(payload)],
                         capture_output=True, text=True, check=False, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT)]
    if out.returncode or not lines:
        raise RuntimeError(f"DeepFM run {payload} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def deepfm_levers(experiment: str, data_path: str, frappe_dir: str, rounds: int) -> dict:
    """DEEPFM_LEVERS, each in a fresh process, alternated with DeepCTR ``rounds`` times (best of each)."""
    from feature_schema import configs

    if len({name.strip() for name, _ in DEEPFM_LEVERS}) != len(DEEPFM_LEVERS):
        raise ValueError("DEEPFM_LEVERS: lever names must be unique (they key the rates)")
    named, kept = [], {}
    for name, overrides in DEEPFM_LEVERS:
        cfg = configs.deep_merge(kept, overrides)
        if not name.startswith(" "):
            kept = {k: v for k, v in cfg.items() if k != "_env"}
        named.append((name.strip(), cfg))
    rates = {name: [] for name, _ in named}
    rates["DeepCTR 0.9.4"] = []
    for r in range(rounds):
        rates["DeepCTR 0.9.4"].append(deepctr_rate(frappe_dir)[0])
        for name, cfg in named:
            rates[name].append(_deepfm_rate_process(experiment, data_path, cfg))
        print(f"bench_train: DeepFM levers round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()),
              flush=True)
    deepctr = max(rates["DeepCTR 0.9.4"])
    return {"deepctr_examples_per_s": deepctr, "rounds": rates,
            "rows": [{"lever": name, "overrides": cfg, "examples_per_s": max(rates[name]),
                      "ratio": max(rates[name]) / deepctr} for name, cfg in named]}


def deepfm_vs_deepctr(experiment: str, data_path: str, frappe_dir: str, rounds: int) -> dict:
    try:
        import deepctr  # noqa: F401
    except ImportError:
        return {"deepctr": "not installed (pip install '.[bench]')"}
    from feature_schema import load_schema
    from trainer import train

    rates = {"ours": [], "ours_parse_every_epoch": [], "ours_in_memory": [], "ours_before": [], "deepctr": [],
             "mlp_only": []}
    cpu = {"ours": [], "deepctr": []}  # examples per CPU-second: the ratio that moves less under load
    cfg = None
    for r in range(rounds):
        rate, cfg, cpu_rate = ours_deepfm_rate(experiment, data_path, in_memory=False)
        rates["ours"].append(rate)
        cpu["ours"].append(cpu_rate)
        rates["ours_parse_every_epoch"].append(
            ours_deepfm_rate(experiment, data_path, False, overrides=PARSE_EVERY_EPOCH)[0])
        rates["ours_before"].append(ours_deepfm_rate(experiment, data_path, False, overrides=DEEPFM_BEFORE)[0])
        rates["ours_in_memory"].append(ours_deepfm_rate(experiment, data_path, in_memory=True)[0])
        rate, cpu_rate = deepctr_rate(frappe_dir)
        rates["deepctr"].append(rate)
        cpu["deepctr"].append(cpu_rate)
        rates["mlp_only"].append(mlp_only_rate(57_722, 10))
        print(f"bench_train: DeepFM round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()),
              flush=True)
    m = cfg.model
    best = {k: max(v) for k, v in rates.items()}
    return {"experiment": experiment, "embedding_dim": m.embedding_dim, "hidden_units": list(m.hidden_units),
            "batch_size": cfg.data.batch_size, "optimizer": cfg.optimizer.name,
            "jit_compile": cfg.train.jit_compile, "steps_per_execution": cfg.train.steps_per_execution,
            "featurize_once": train.featurizes_once(cfg, load_schema(data_path)),
            "ours_examples_per_s": best["ours"], "ours_in_memory_examples_per_s": best["ours_in_memory"],
            "ours_parse_every_epoch_examples_per_s": best["ours_parse_every_epoch"],
            "ratio_parse_every_epoch": best["ours_parse_every_epoch"] / best["deepctr"],
            "deepctr_examples_per_s": best["deepctr"], "mlp_only_examples_per_s": best["mlp_only"],
            "mlp_dtype": m.mlp_dtype, "ours_before_examples_per_s": best["ours_before"],
            "before_overrides": DEEPFM_BEFORE, "ratio_before": best["ours_before"] / best["deepctr"],
            "rounds": rates, "rounds_per_cpu_second": cpu,
            "ratio_per_round": [o / d for o, d in zip(rates["ours"], rates["deepctr"])],
            "ratio_per_cpu_second": max(cpu["ours"]) / max(cpu["deepctr"]),
            "ratio": best["ours"] / best["deepctr"], "ratio_in_memory": best["ours_in_memory"] / best["deepctr"]}


# --------------------------------------------------------------------------------- step throughput


def input_rate(schema, batch: int, steps: int, cache: bool) -> float:
    """Examples/s of the training pipeline alone, timed over ``steps`` batches after ``steps`` warm-up."""
    from trainer import data

    ds = data.make_dataset(schema, "train", batch, shuffle_buffer=50_000, seed=1, cache=cache, repeat=True,
                           drop_remainder=True, deterministic=True)
    it = iter(ds)
    per_pass = math.ceil(schema.splits["train"]["examples"] / batch)
    # Warm-up: at least one full pass when caching, so that the timed part reads the cache.
    warm = max(steps, per_pass + 1 if cache else steps)
    for _ in range(warm):
        next(it)
    # Timed over at least three passes: a few batches would mostly time one refill of the
    # example-level shuffle buffer at a pass boundary (20 batches of 4096 read 80k of the 57k-line set).
    timed = max(steps, 3 * per_pass)
    t = time.perf_counter()
    for _ in range(timed):
        next(it)
    return timed * batch / (time.perf_counter() - t)


def train_rate(model_name: str, schema, data_path: str, batch: int, steps: int, jit: bool) -> float:
    """Examples/s of ``steps`` training steps of a model (second of two epochs of ``steps``)."""
    from trainer import config as config_lib
    from trainer import data, train

    keras.backend.clear_session()
    cfg = config_lib.resolve("", "", {"data": {"path": data_path, "batch_size": batch, "cache": True},
                                      "model": {"name": model_name}, "train": {"jit_compile": jit}})
    model = train.init_model(train.build_and_compile(cfg, schema), schema)
    ds = train._select(data.make_dataset(schema, "train", batch, shuffle_buffer=50_000, seed=1, cache=True,
                                         repeat=True, drop_remainder=True), model.tasks, cfg.train)
    clock = EpochClock()
    model.fit(ds, epochs=2, steps_per_epoch=steps, verbose=0, callbacks=[clock])
    return steps * batch / clock.epochs[-1]["epoch_train_seconds"]


def step_throughput(args, etl_dirs, schemas) -> list[dict]:
    from trainer import config as config_lib
    from trainer.models import MODELS, build_model

    batches = [int(b) for b in args.batch_sizes.split(",")]
    models = args.models.split(",") if args.models else sorted(MODELS)
    where, skipped = {}, {}  # each model on the first data set whose schema it accepts
    for name in models:
        for d in etl_dirs:
            try:
                build_model(config_lib.ModelConfig(name=name), schemas[d])
            except ValueError as e:
                skipped[name] = str(e)
                continue
            where[name] = d
            skipped.pop(name, None)
            break
    rows = []
    for d in sorted(set(where.values()), key=etl_dirs.index):
        for b in batches:
            for what, cache in (("input", False), ("input (cache)", True)):
                rate = input_rate(schemas[d], b, args.steps, cache)
                rows.append({"data": d, "what": what, "batch": b, "examples_per_s": rate, "examples_per_s_jit": None})
                print(f"bench_train: {d} {what} batch {b}: {rate:,.0f}/s", flush=True)
    for name in models:
        if name not in where:
            rows.append({"data": "-", "what": name, "batch": None, "examples_per_s": f"n/a: {skipped[name]}",
                         "examples_per_s_jit": None})
            continue
        for b in batches:
            rates = [train_rate(name, schemas[where[name]], where[name], b, args.steps, jit) for jit in (False, True)]
            rows.append({"data": where[name], "what": name, "batch": b, "examples_per_s": rates[0],
                         "examples_per_s_jit": rates[1]})
            print(f"bench_train: {where[name]} {name} batch {b}: {rates[0]:,.0f}/s, jit {rates[1]:,.0f}/s", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ quality


def quality(data_path: str) -> dict:
    """Trains each frappe_* experiment as ``make train`` does; AUC and logloss against README's bars."""
    from trainer import config as config_lib
    from trainer import train

    out = {}
    for name, (auc_bar, loss_bar) in QUALITY_BARS.items():
        with tempfile.TemporaryDirectory() as run_dir:
            keras.backend.clear_session()
            cfg = config_lib.resolve(name, "", {"data": {"path": data_path}, "run_dir": run_dir,
                                                "train": {"verbose": 0, "report": False}})
            start = time.perf_counter()
            r = next(iter(train.train(cfg).values()))  # the model's (first) task
        out[name] = {"auc": r["auc"], "logloss": r["logloss"], "seconds": time.perf_counter() - start,
                     "auc_bar": auc_bar, "logloss_bar": loss_bar,
                     "met": r["auc"] >= auc_bar and r["logloss"] <= loss_bar}
    return out


# ------------------------------------------------------------------------------------------- report


def _fmt_rate(r) -> str:
    return f"{r:,.0f}" if isinstance(r, (int, float)) else str(r or "-")


def _verdict(value: float, bar: float, goal: float, lower_is_better: bool) -> str:
    ok = (lambda v, b: v <= b) if lower_is_better else (lambda v, b: v >= b)
    op = "<=" if lower_is_better else ">="
    return (f"bar {op} {bar:g}: {'met' if ok(value, bar) else 'NOT met'}; "
            f"goal {op} {goal:g}: {'met' if ok(value, goal) else 'not met'}")


def print_report(result: dict) -> None:
    print(f"\nTraining speed ({result['cpus']} CPUs; load average {result['load_average_start']} at the start, "
          f"{result['load_average_end']} at the end)")
    ffm = result.get("ffm")
    if ffm:
        o = ffm["ours"]
        print(f"\nFFM on Frappe ({o['experiment']}: k={o['k']}, lambda={o['lambda']}, batch {o['batch_size']}, "
              f"lr {o['learning_rate']}, jit_compile={o['jit_compile']})")
        lib = ffm.get("libffm")
        if isinstance(lib, dict):
            print(f"  libffm ({lib['command']}): best eval logloss {lib['best_logloss']:.5f} at iteration "
                  f"{lib['best_iteration']}, tr_time {lib['seconds']:.1f} s")
        else:
            print(f"  libffm: {lib}")
        if o["reached"]:
            print(f"  ours: eval logloss {o['target_logloss']:.5f} reached after {o['epochs']} epochs: "
                  f"{o['train_seconds']:.1f} s training ({o['seconds_with_eval']:.1f} s with the eval passes; "
                  f"first epoch {o['first_epoch_train_seconds']:.1f} s with tracing and compilation; then "
                  f"{_fmt_rate(o['steady_examples_per_s'])} examples/s, "
                  f"{_fmt_rate(o['steady_examples_per_cpu_s'])} per CPU-second)")
        else:
            print(f"  ours: did not reach {o['target_logloss']:.5f} (best {o['best_logloss']:.5f})")
        if "ratio" in ffm:
            print(f"  time ratio ours / libffm: {ffm['ratio']:.2f} ({ffm['ratio_with_eval']:.2f} with eval); "
                  + _verdict(ffm["ratio"], FFM_BAR, FFM_GOAL, True))
    levers = result.get("ffm_levers")
    if levers:
        print("\nFFM levers, one at a time (examples per second and per CPU-second of a steady epoch, the median "
              "after the first; time to libffm's best eval logloss)")
        print(f"{'lever':72s} {'examples/s':>11s} {'/CPU-s':>8s} {'epochs':>6s} {'train s':>8s} {'with eval':>9s} "
              f"{'1st epoch':>9s}")
        for r in levers:
            secs = lambda k: f"{r[k]:.1f}" if r[k] is not None else "-"  # noqa: E731
            print(f"{r['lever']:72s} {_fmt_rate(r['steady_examples_per_s']):>11s} "
                  f"{_fmt_rate(r['steady_examples_per_cpu_s']):>8s} {str(r['epochs'] or '-'):>6s} "
                  f"{secs('train_seconds'):>8s} {secs('seconds_with_eval'):>9s} "
                  f"{r['first_epoch_train_seconds']:>9.1f}")
    d = result.get("deepfm")
    if d:
        if "ratio" in d:
            print(f"\nDeepFM at DeepCTR's shape (k={d['embedding_dim']}, DNN {d['hidden_units']}, batch "
                  f"{d['batch_size']}, {d['optimizer']}; {d['experiment']}, jit_compile={d['jit_compile']}, "
                  f"steps_per_execution={d['steps_per_execution']}, mlp_dtype={d['mlp_dtype']}; "
                  "best of the rounds)")
            print(f"  DeepCTR 0.9.4 (NumPy arrays in memory): {_fmt_rate(d['deepctr_examples_per_s'])}/s")
            how = ("split featurized once, held in memory, reshuffled every epoch" if d.get("featurize_once")
                   else "cached TFRecords parsed every epoch")
            print(f"  ours, as make train trains ({how}): {_fmt_rate(d['ours_examples_per_s'])}/s, "
                  f"ratio {d['ratio']:.2f}x; " + _verdict(d["ratio"], DEEPFM_BAR, DEEPFM_GOAL, False))
            if "ratio_per_cpu_second" in d:
                print(f"  same, per round: {', '.join(f'{x:.2f}' for x in d['ratio_per_round'])}; examples per "
                      f"CPU-second (moves less under load): ours {_fmt_rate(max(d['rounds_per_cpu_second']['ours']))}, "
                      f"DeepCTR {_fmt_rate(max(d['rounds_per_cpu_second']['deepctr']))}, "
                      f"ratio {d['ratio_per_cpu_second']:.2f}x")
            if "ratio_parse_every_epoch" in d:
                print(f"  context: ours on cached TFRecords parsed every epoch (data.featurize_once=false): "
                      f"{_fmt_rate(d['ours_parse_every_epoch_examples_per_s'])}/s, "
                      f"ratio {d['ratio_parse_every_epoch']:.2f}x")
            print(f"  context: ours on one pass of its batches replayed from memory (no reshuffle): "
                  f"{_fmt_rate(d['ours_in_memory_examples_per_s'])}/s, ratio {d['ratio_in_memory']:.2f}x")
            print(f"  ours before ({d['before_overrides']}), TFRecords parsed every epoch: "
                  f"{_fmt_rate(d['ours_before_examples_per_s'])}/s, ratio {d['ratio_before']:.2f}x")
            mlp = d["mlp_only_examples_per_s"]
            print(f"  the DNN alone (100 -> 400 -> 400 -> 1, float32, Adam, random arrays): {_fmt_rate(mlp)}/s = "
                  f"{mlp / d['deepctr_examples_per_s']:.2f}x DeepCTR: the ceiling of a float32 DeepFM at this shape")
        else:
            print(f"\nDeepFM vs DeepCTR: {d['deepctr']}")
    dl = result.get("deepfm_levers")
    if dl:
        print(f"\nDeepFM levers, one at a time (examples/s of a training epoch, best of the rounds, "
              f"each in a fresh process; DeepCTR {_fmt_rate(dl['deepctr_examples_per_s'])}/s)")
        print(f"{'lever':56s} {'examples/s':>11s} {'x DeepCTR':>9s}")
        for r in dl["rows"]:
            print(f"{r['lever']:56s} {_fmt_rate(r['examples_per_s']):>11s} {r['ratio']:>9.2f}")
    q = result.get("quality")
    if q:
        print("\nQuality bars (make train EXPERIMENT=...)")
        for name, r in q.items():
            print(f"  {name}: AUC {r['auc']:.4f} (>= {r['auc_bar']}) logloss {r['logloss']:.4f} "
                  f"(<= {r['logloss_bar']}): {'met' if r['met'] else 'NOT met'} ({r['seconds']:.0f} s)")
    rows = result.get("rows")
    if rows:
        print(f"\nStep throughput (examples/s; {result['steps']} timed steps after as many warm-up; "
              "models with their default config)")
        print(f"{'data':14s} {'what':24s} {'batch':>6s} {'examples/s':>12s} {'jit_compile':>12s}")
        for r in rows:
            print(f"{r['data']:14s} {r['what']:24s} {str(r['batch'] or '-'):>6s} "
                  f"{_fmt_rate(r['examples_per_s']):>12s} {_fmt_rate(r['examples_per_s_jit']):>12s}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--etl", default="data/frappe,data/etl", help="comma list of ETL output dirs (Frappe first)")
    p.add_argument("--data", default=os.path.join("..", "shared", "data"), help="shared raw data root")
    p.add_argument("--ffm_experiment", default="frappe_ffm_fast", help="FFM timed against libffm")
    p.add_argument("--ffm_train", default="", help="libffm ffm-train binary (default: from PATH)")
    p.add_argument("--ffm_max_epochs", type=int, default=60)
    p.add_argument("--ffm_levers", action="store_true", help="also time FFM with one speed lever at a time")
    p.add_argument("--deepfm_experiment", default="frappe_deepfm_deepctr", help="DeepFM timed against DeepCTR")
    p.add_argument("--rounds", type=int, default=2, help="alternated DeepFM / DeepCTR measurements (best kept)")
    p.add_argument("--batch_sizes", default="1024,4096")
    p.add_argument("--steps", type=int, default=20, help="timed steps per throughput figure (after as many warm-up)")
    p.add_argument("--models", default="", help="comma list for the step throughput (default: every model)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: ffm, deepfm, steps")
    p.add_argument("--quality", action="store_true", help="also train the frappe_* experiments against their bars")
    p.add_argument("--out", default=os.path.join("runs", "bench", "train.json"))
    p.add_argument("--deepfm_levers", action="store_true", help="also time DeepFM with one speed lever at a time")
    p.add_argument("--ffm_run", default="", help=argparse.SUPPRESS)  # one FFM measurement (JSON arguments)
    p.add_argument("--deepfm_run", default="", help=argparse.SUPPRESS)  # one DeepFM rate (JSON arguments)
    args, _ = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.ffm_run:
        print(RESULT + json.dumps(_ffm_time_to_logloss(**json.loads(args.ffm_run))), flush=True)
        return {}
    if args.deepfm_run:
        a = json.loads(args.deepfm_run)
        print(RESULT + json.dumps(ours_deepfm_rate(a["experiment"], a["data_path"], False, overrides=a["overrides"])[0]),
              flush=True)
        return {}
    skip = set(filter(None, args.skip.split(",")))

    from feature_schema import load_schema

    etl_dirs = [d for d in args.etl.split(",") if d and ensure_etl(d, args.data)]
    if not etl_dirs:
        raise SystemExit("bench_train: no ETL output to benchmark on")
    schemas = {d: load_schema(d) for d in etl_dirs}
    frappe_etl = next((d for d in etl_dirs if schemas[d].sources.get("input", "").endswith(FRAPPE_TRAIN)), "")
    frappe_dir = os.path.join(args.data, "frappe")
    result = {"cpus": os.cpu_count(), "machine": platform.machine(), "load_average_start": _load(),
              "steps": args.steps}

    if "ffm" not in skip and frappe_etl:
        from trainer import config as config_lib

        cfg = config_lib.resolve(args.ffm_experiment, "", {"data": {"path": frappe_etl}})
        binary = args.ffm_train or shutil.which("ffm-train")
        ffm = {"libffm": "ffm-train not on PATH (pass --ffm_train)"}
        if binary:
            ffm["libffm"] = run_libffm(binary, frappe_dir, cfg.model.embedding_dim, cfg.model.l2_embedding)
            print(f"bench_train: libffm best eval logloss {ffm['libffm']['best_logloss']} at iteration "
                  f"{ffm['libffm']['best_iteration']} ({ffm['libffm']['seconds']} s)", flush=True)
        target = ffm["libffm"]["best_logloss"] if binary else 0.2232  # README's libffm figure
        ffm["ours"] = ffm_time_to_logloss(args.ffm_experiment, frappe_etl, target, args.ffm_max_epochs)
        if binary and ffm["ours"]["reached"]:
            ffm["ratio"] = ffm["ours"]["train_seconds"] / ffm["libffm"]["seconds"]
            ffm["ratio_with_eval"] = ffm["ours"]["seconds_with_eval"] / ffm["libffm"]["seconds"]
        result["ffm"] = ffm
        if args.ffm_levers:
            result["ffm_levers"] = ffm_levers(frappe_etl, target, args.ffm_max_epochs)
    if "deepfm" not in skip and frappe_etl:
        result["deepfm"] = deepfm_vs_deepctr(args.deepfm_experiment, frappe_etl, frappe_dir, args.rounds)
        if args.deepfm_levers:
            result["deepfm_levers"] = deepfm_levers(args.deepfm_experiment, frappe_etl, frappe_dir, args.rounds)
    if args.quality and frappe_etl:
        result["quality"] = quality(frappe_etl)
    if "steps" not in skip:
        result["rows"] = step_throughput(args, etl_dirs, schemas)
    result["load_average_end"] = _load()
    print_report(result)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
