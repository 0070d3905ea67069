"""Exports a trained run as a TF Serving SavedModel and proves it loads the way TF Serving does.

    python -m export.exporter --run_dir runs/default [--export_base runs/export] [--model_name fm] [--version N]

Layout: ``<export_base>/<model_name>/<version>/``, integer versions counting up
from 1 (``--version`` pins one). The SavedModel is written to a hidden
temporary directory beside the versions, verified, and renamed into place, so a
server polling the base path never sees a partial or unverified version.

``assets.extra/`` holds the schema, the resolved config, the vocabulary and the field map
(libfm input; what a client needs to build raw Examples from lines), ``tf_serving_warmup_requests``
(``export.warmup``: requests TF Serving and ``serving.server`` replay before the version takes
traffic) and ``checksums.sha256`` (``serving.manifest``: every file's SHA-256, written last).

Signatures (``serving/protocol.py``; ``export.signatures``): ``serving_default`` and ``rank`` on
raw Examples, ``predict_hashed`` on the ETL's records, ``predict_ids`` on dense hashed ids,
``classification`` and ``regression`` on raw Examples. Every one featurizes in the graph with the
one featurization layer; the entity tables the ETL joined are inside the graph, as constants
(keep them under ~1M rows; for larger tables clients send the joined columns themselves).

Verification (``export.verify``): the temporary SavedModel is loaded with
``tf.compat.v1.saved_model.loader.load`` into a Session and every signature is compared with the
in-process Keras model (max abs diff <= ``MAX_ABS_DIFF``); every warm-up record is replayed.

A run whose config has ``fusion`` (``trainer.config.FusionConfig``) exports the ``fusion`` output
on ``serving_default`` and ``rank`` (``export.signatures``); a fusion config naming outputs the
model lacks is refused before anything is written. The synthesized raw Examples then carry bids,
and verification checks ``fusion == ctr^a * cvr^b * bid`` against the bids it sent.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
import time

import tensorflow as tf

from feature_schema import SCHEMA_FILENAME, VOCAB_FILENAME, Schema, paths, read_vocabulary
from serving import manifest, protocol
from export import signatures, warmup
from export.verify import MAX_ABS_DIFF, SessionModel, check_summary, in_process_predict, session_predict, verify
from export.warmup import WARMUP_BATCH_SIZES, read_warmup, write_warmup

# Re-exported: the exporter is the export package's entry point (tests, bench, serving tools).
__all__ = ["export", "publish", "versions", "next_version", "eval_examples", "MAX_ABS_DIFF", "SessionModel",
           "in_process_predict", "session_predict", "verify", "WARMUP_BATCH_SIZES", "read_warmup", "write_warmup"]
from trainer import train as trainer_lib

FIELD_MAP_FILE = "field_map.tsv"
# Raw Examples synthesized from the vocabulary for warm-up and verification.
RAW_VERIFY_EXAMPLES = 500


def versions(model_dir: str) -> list[int]:
    """Integer versions present in ``model_dir`` (hidden temporary directories are not versions)."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(d) for d in os.listdir(model_dir) if d.isdigit())


def next_version(model_dir: str) -> int:
    """One above the highest existing version (1 for a new model)."""
    return max(versions(model_dir), default=0) + 1


def publish(tmp: str, model_dir: str, version: int | None = None) -> str:
    """Renames a finished temporary version directory to ``<model_dir>/<version>``.

    Without ``version`` the next free version is taken, retrying if a concurrent
    export claims it first. The rename is atomic on one filesystem: pollers see
    the version complete or not at all.
    """
    for _ in range(100):
        v = version if version is not None else next_version(model_dir)
        final = os.path.join(model_dir, str(v))
        if not os.path.exists(final):
            try:
                os.rename(tmp, final)
                return final
            except OSError as e:  # created between the check and the rename
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        if version is not None:
            raise FileExistsError(f"version {version} already exists in {model_dir}")
    raise RuntimeError(f"could not claim a version in {model_dir}")


def export(run_dir: str, export_base: str | None = None, model_name: str | None = None,
           verify_examples: int = 100_000, version: int | None = None) -> tuple[str, dict]:
    """Exports the run's model, verifies it, then publishes it.

    The SavedModel is checked through the TF Serving loader against the
    in-process model before the rename, so a version that fails the check
    never becomes visible.

    Returns:
      (final version directory, the ``verify`` result).
    """
    cfg, schema, model = trainer_lib.load_trained(run_dir)
    signatures.check_fusion(cfg.fusion, model.serving_outputs, schema)  # before any directory is made
    export_base = export_base or cfg.export_base
    # The served name becomes a directory under export_base: one plain component, never ../x.
    name = paths.plain_name(model_name or cfg.served_name, "served model name")
    model_dir = os.path.join(export_base, name)
    os.makedirs(model_dir, exist_ok=True)
    tmp = os.path.join(model_dir, f".tmp-export-{os.getpid()}-{time.time_ns()}")
    try:
        module = signatures.ServingModule(model, schema, cfg.fusion)
        signatures.save(module, tmp)
        _copy_assets(tmp, schema, run_dir)
        records = eval_examples(schema, verify_examples)
        feats = warmup.synthetic_features(schema, read_vocabulary(schema.vocabulary_file()), RAW_VERIFY_EXAMPLES)
        bid = cfg.fusion.bid_feature if cfg.fusion else ""
        if bid:  # every raw request carries a bid (rank: some candidates only through the context)
            feats = warmup.with_bids(feats, bid)
        value_fields = {f.name for f in schema.fields if f.kind != "categorical"} | ({bid} - {""})
        raw = [protocol.raw_example(f, value_fields) for f in feats]
        rank = warmup.rank_request(schema, feats[:max(WARMUP_BATCH_SIZES)], bid)
        rank_flat = [protocol.raw_example(f, value_fields)
                     for f in warmup.merged_features(schema, feats[:max(WARMUP_BATCH_SIZES)], bid)]
        logs = warmup.warmup_logs(name, records[:max(WARMUP_BATCH_SIZES)], raw, rank, schema)
        write_warmup(os.path.join(tmp, protocol.ASSETS_EXTRA, protocol.WARMUP_FILE), logs)
        check = verify(tmp, model, schema, records, raw, rank, rank_flat, logs, cfg.data.eval_batch_size,
                       module.featurizer, cfg.fusion)
        if check["max_abs_diff"] > MAX_ABS_DIFF:
            raise RuntimeError(f"export: Session predictions differ from the in-process model by "
                               f"{check['max_abs_diff']:.3g} > {MAX_ABS_DIFF} ({check['per_signature']}); "
                               f"nothing published")
        manifest.write(tmp)  # last: it covers every other file
        final = publish(tmp, model_dir, version)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, check


def _copy_assets(export_dir: str, schema: Schema, run_dir: str) -> None:
    """schema.json, vocabulary, resolved config and (libfm input) the field map into assets.extra."""
    extra = os.path.join(export_dir, protocol.ASSETS_EXTRA)
    os.makedirs(extra, exist_ok=True)
    shutil.copy(os.path.join(schema.base_dir, SCHEMA_FILENAME), os.path.join(extra, SCHEMA_FILENAME))
    shutil.copy(schema.vocabulary_file(), os.path.join(extra, VOCAB_FILENAME))
    shutil.copy(os.path.join(run_dir, protocol.CONFIG_FILE), os.path.join(extra, protocol.CONFIG_FILE))
    field_map = schema.sources.get("field_map") or ""
    if schema.format == "libfm" and field_map and os.path.isfile(field_map) and not field_map.endswith(
            (".parquet", ".pq")):
        shutil.copy(field_map, os.path.join(extra, FIELD_MAP_FILE))


def eval_examples(schema: Schema, n: int) -> list[bytes]:
    """The first ``n`` serialized eval records, in file order."""
    files = []
    for pattern in schema.split_files("eval"):
        files.extend(sorted(tf.io.gfile.glob(pattern)))
    ds = tf.data.TFRecordDataset(files, compression_type=schema.compression or None).take(n).batch(4096)
    return [r for batch in ds for r in batch.numpy().tolist()]


def _reference_metrics(path: str, schema: Schema) -> dict:
    """Per-task reference metrics: ``--reference``, else a generator's truth.json beside the input logs."""
    if not path:
        inputs = schema.sources.get("eval_input") or schema.sources.get("input") or ""
        path = os.path.join(os.path.dirname(inputs), "truth.json") if inputs and "*" not in inputs else ""
    if not path or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        ref = json.load(f)
    return ref.get("bayes", {}).get("eval", ref)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Export a trained run for TF Serving and verify it.")
    p.add_argument("--run_dir", required=True)
    p.add_argument("--export_base", default=None)
    p.add_argument("--model_name", default=None)
    p.add_argument("--version", type=int, default=None, help="explicit version (default: highest + 1)")
    p.add_argument("--reference", default="", help="JSON with reference (e.g. Bayes-optimal) metrics per task")
    p.add_argument("--show", type=int, default=5, help="held-out examples to print")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    path, check = export(args.run_dir, args.export_base, args.model_name, version=args.version)
    print(f"export: TF Serving loader check on {check_summary(check)}")
    tasks = list(check["session"])
    print("export: held-out predictions (Session.run of predict_hashed on eval records):")
    for i in range(min(args.show, check["examples"])):
        print("  example %d: " % i + ", ".join(f"{t}={check['session'][t][i]:.4f}" for t in tasks))
    with open(os.path.join(args.run_dir, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    ref = _reference_metrics(args.reference, trainer_lib.load_trained(args.run_dir)[1])
    print("\nheld-out metrics" + (" (reference: generator's Bayes-optimal, scoring with the planted probabilities)"
                                  if ref else ""))
    print(f"  {'task':12s} {'AUC':>8s} {'logloss':>8s}" + (f" {'Bayes AUC':>10s} {'Bayes LL':>9s}" if ref else ""))
    for t, m in metrics.items():
        row = f"  {t:12s} {m['auc']:8.4f} {m['logloss']:8.4f}"
        if t in ref:
            row += f" {ref[t]['auc']:10.4f} {ref[t]['logloss']:9.4f}"
        print(row)
    print(f"export: SavedModel at {os.path.abspath(path)}")


if __name__ == "__main__":
    main()
