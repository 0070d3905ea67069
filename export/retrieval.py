"""Exports a ``two_tower`` run: the user tower as a TF Serving SavedModel, the item vectors beside it.

    python -m export.retrieval --run_dir runs/two_tower [--export_base runs/export] [--model_name NAME] [--version N]

Layout: ``<export_base>/<model_name>/<version>/`` (default name ``<served name>_user``), written to a
hidden directory, checked and renamed into place with ``export.exporter``'s helpers, so a server
polling the base path sees a complete, verified version or none.

* Signatures (``export.signatures.ServingModule``'s Predict ones that take one example per user):
  ``serving_default`` (raw tf.Examples keyed by field: the user's features, what a client sends),
  ``predict_hashed`` (the ETL's records) and ``predict_ids`` (dense hashes, values, field ids),
  each returning ``user_vector`` ``[batch, d]``. Only the user fields count; the in-graph
  featurization fills the missing fields, which the user tower does not read.
* ``assets.extra/item_embeddings.tsv`` (``serving.retrieval``): every item of the vocabulary with its
  log training share and item-tower vector divided by ``model.temperature`` (so ``<u, v>`` is the
  trained logit ``<u, v> / T``). An item's other item fields (category, brand, price) are those of
  its first training impression: the towers read only rows of the vocabulary, and the train split
  is where each kept item has one.
* ``assets.extra/``: schema, vocabulary, resolved config (and the libfm field map), Predict warm-up
  records, checksums.

Verification: every signature is loaded through ``tf.compat.v1.saved_model.loader.load`` and run by
tensor names, against the in-process user tower (max abs diff <= 1e-5): the hashed ones on the eval
split's records, ``serving_default`` on raw Examples of the user fields synthesized from the
vocabulary (``export.warmup``); every warm-up record is replayed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
import tensorflow as tf

from export import exporter, signatures, warmup
from export.verify import MAX_ABS_DIFF, SessionModel, check_summary
from feature_schema import Schema, paths, read_vocabulary
from featurization import Featurizer
from serving import manifest, protocol
from serving import retrieval as serving_retrieval
from serving.protocol import DEFAULT_SIGNATURE, HASHED_SIGNATURE, IDS_SIGNATURE
from trainer import data
from trainer import train as trainer_lib
from trainer.models.retrieval import USER_VECTOR, TwoTower


class UserTower(tf.Module):
    """The user half of a trained ``TwoTower`` in the shape ``ServingModule`` serves: ``{"user_vector"}``."""

    serving_outputs = (USER_VECTOR,)

    def __init__(self, towers: TwoTower):
        super().__init__()
        self.towers = towers

    def __call__(self, features, training=False):
        return {USER_VECTOR: self.towers.user_vector(features, training=training)}


class UserTowerModule(signatures.ServingModule):
    """``ServingModule``'s one-example-per-user Predict signatures over the user tower (a vector has no
    Classify or Regress, and ``rank``'s shared context would give every candidate the same user)."""

    SIGNATURES = (DEFAULT_SIGNATURE, HASHED_SIGNATURE, IDS_SIGNATURE)
    rank = classify = regress = None  # not traced into the SavedModel either

    def signatures(self) -> dict:
        return {name: fn for name, fn in super().signatures().items() if name in self.SIGNATURES}


def item_catalog(towers: TwoTower, schema: Schema, batch_size: int = 8192) -> tuple[np.ndarray, dict]:
    """The featurized item fields of every item row of the vocabulary, from its first training impression.

    Returns:
      (item rows ``[n]``, ``{"ids", "values", "fields"}`` SparseTensors ``[n, width]`` of their item fields).
    """
    key_field = towers.item_key_field
    wanted = {e.index for e in read_vocabulary(schema.vocabulary_file()) if e.field == key_field.name}
    item_fields = np.array(towers.item_fields, np.int64)
    found: dict[int, list] = {}
    for features, _, _ in data.make_dataset(schema, "train", batch_size):
        items = towers.item_rows(features).numpy()
        idx = features["ids"].indices.numpy()
        cols = [features[k].values.numpy() for k in ("ids", "values", "fields")]
        starts = np.searchsorted(idx[:, 0], np.arange(len(items) + 1))  # entries are sorted by example
        for row, ex in zip(*np.unique(items, return_index=True)):
            if row in wanted and row not in found:
                sl = slice(starts[ex], starts[ex + 1])
                keep = np.isin(cols[2][sl], item_fields)
                found[int(row)] = [c[sl][keep] for c in cols]
        if len(found) == len(wanted):
            break
    rows = np.array(sorted(found), np.int64)
    return rows, _sparse([found[r] for r in rows])


def _sparse(entries) -> dict:
    """SparseTensors of per-example (ids, values, fields) arrays."""
    width = max((len(e[0]) for e in entries), default=0)
    index = np.array([[i, j] for i, e in enumerate(entries) for j in range(len(e[0]))], np.int64).reshape(-1, 2)
    shape = [len(entries), width]
    cat = lambda k, dt: np.concatenate([e[k] for e in entries]).astype(dt) if entries else np.zeros(0, dt)  # noqa: E731
    return {"ids": tf.SparseTensor(index, cat(0, np.int64), shape),
            "values": tf.SparseTensor(index, cat(1, np.float32), shape),
            "fields": tf.SparseTensor(index, cat(2, np.int64), shape)}


def item_embeddings(towers: TwoTower, schema: Schema) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(item keys, log q ``[n]``, item vectors / temperature ``[n, d]``) of every item row of the vocabulary
    seen in training."""
    rows, features = item_catalog(towers, schema)
    key_of = {e.index: e.key for e in read_vocabulary(schema.vocabulary_file())
              if e.field == towers.item_key_field.name}
    vectors = towers.item_vector(features).numpy() if len(rows) else np.zeros((0, towers.cfg.tower_dim), np.float32)
    # Divided by the temperature, so that <user vector, item vector> is the trained logit (before logQ).
    return [key_of[r] for r in rows], towers.log_q.numpy()[rows], vectors / towers.cfg.temperature


def in_process_user_vectors(towers: TwoTower, featurize, examples: list[bytes], batch_size: int = 4096) -> np.ndarray:
    """The in-process user tower on serialized examples, featurized by ``featurize`` (a batch -> features)."""
    out = [towers.user_vector(featurize(tf.constant(examples[i:i + batch_size]))).numpy()
           for i in range(0, len(examples), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, towers.cfg.tower_dim), np.float32)


def record_featurizer(schema: Schema):
    """Batch of the ETL's hashed records (labels not needed) -> sparse features, as the trainer maps them."""
    k = schema.example_keys
    spec = {key: v for key, v in data.parse_spec(schema).items() if key in (k.hashes, k.values, k.field_hashes)}
    featurizer = Featurizer(schema)

    def featurize(batch):
        parsed = tf.io.parse_example(batch, spec)
        return featurizer.from_records(parsed[k.hashes], parsed[k.values], parsed[k.field_hashes])
    return featurize


def user_raw_examples(towers: TwoTower, schema: Schema, n: int) -> list[bytes]:
    """``n`` raw Examples of the user fields alone (a retrieval request), synthesized from the vocabulary."""
    user = {schema.fields[f].name for f in towers.user_fields}
    value_fields = {f.name for f in schema.fields if f.kind != "categorical"}
    feats = warmup.synthetic_features(schema, read_vocabulary(schema.vocabulary_file()), n)
    return [protocol.raw_example([f for f in ex if f[0] in user], value_fields) for ex in feats]


def verify(export_dir: str, towers: TwoTower, schema: Schema, records: list[bytes], raw: list[bytes], logs,
           raw_featurizer: Featurizer, batch_size: int = 4096) -> dict:
    """Every signature, Session-loaded, against the in-process user tower; replays the warm-up records.

    Returns:
      {"max_abs_diff", "per_signature": {signature: max abs diff}, "examples", "raw_examples", "warmup_records"}.
    """
    expected = in_process_user_vectors(towers, record_featurizer(schema), records, batch_size)
    expected_raw = in_process_user_vectors(towers, raw_featurizer.from_examples, raw, batch_size)
    sm = SessionModel(export_dir)
    try:
        diffs = {sig: float(np.max(np.abs(sm.run_examples(sig, examples, schema)[USER_VECTOR] - want), initial=0.0))
                 for sig, examples, want in ((HASHED_SIGNATURE, records, expected), (IDS_SIGNATURE, records, expected),
                                             (DEFAULT_SIGNATURE, raw, expected_raw))}
        for log in logs:
            if not np.all(np.isfinite(sm.replay(log)[USER_VECTOR])):
                raise RuntimeError("export: a warm-up request produced non-finite user vectors")
    finally:
        sm.close()
    return {"max_abs_diff": max(diffs.values()), "per_signature": diffs, "examples": len(records),
            "raw_examples": len(raw), "warmup_records": len(logs)}


def export(run_dir: str, export_base: str | None = None, model_name: str | None = None,
           verify_examples: int = 20_000, version: int | None = None) -> tuple[str, dict]:
    """Exports the run's user tower and item vectors, verifies the SavedModel, then publishes the version.

    Returns:
      (final version directory, the ``verify`` result plus ``items``: the rows of the item file).
    """
    cfg, schema, towers = trainer_lib.load_trained(run_dir)
    if not isinstance(towers, TwoTower):
        raise ValueError(f"{run_dir}: model {cfg.model.name!r} is not a two_tower model")
    name = paths.plain_name(model_name or f"{cfg.served_name}_user", "served model name")
    model_dir = os.path.join(export_base or cfg.export_base, name)
    os.makedirs(model_dir, exist_ok=True)
    tmp = os.path.join(model_dir, f".tmp-export-{os.getpid()}-{time.time_ns()}")
    try:
        module = UserTowerModule(UserTower(towers), schema)
        tf.saved_model.save(module, tmp, signatures=module.signatures())
        exporter._copy_assets(tmp, schema, run_dir)
        records = exporter.eval_examples(schema, verify_examples)
        raw = user_raw_examples(towers, schema, exporter.RAW_VERIFY_EXAMPLES)
        logs = [log for log in warmup.warmup_logs(name, records[:max(warmup.WARMUP_BATCH_SIZES)], raw, None, schema)
                if log.WhichOneof("log_type") == "predict_log"]
        warmup.write_warmup(os.path.join(tmp, protocol.ASSETS_EXTRA, protocol.WARMUP_FILE), logs)
        keys, log_q, vectors = item_embeddings(towers, schema)
        serving_retrieval.write_item_embeddings(
            os.path.join(tmp, protocol.ASSETS_EXTRA, serving_retrieval.ITEMS_FILE), keys, log_q, vectors)
        check = verify(tmp, towers, schema, records, raw, logs, module.featurizer, cfg.data.eval_batch_size)
        if check["max_abs_diff"] > MAX_ABS_DIFF:
            raise RuntimeError(f"export: Session user vectors differ from the in-process tower by "
                               f"{check['max_abs_diff']:.3g} > {MAX_ABS_DIFF} ({check['per_signature']}); "
                               f"nothing published")
        manifest.write(tmp)  # last: it covers every other file
        final = exporter.publish(tmp, model_dir, version)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, {**check, "items": len(keys)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Export a two_tower run's user tower (TF Serving) and item vectors.")
    p.add_argument("--run_dir", required=True)
    p.add_argument("--export_base", default=None)
    p.add_argument("--model_name", default=None, help="served name (default: <model name>_user)")
    p.add_argument("--version", type=int, default=None, help="explicit version (default: highest + 1)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    path, check = export(args.run_dir, args.export_base, args.model_name, version=args.version)
    print(f"export: user tower checked through the TF Serving loader on {check_summary(check)}")
    print(f"export: {check['items']} item vectors in "
          f"{os.path.join(os.path.abspath(path), protocol.ASSETS_EXTRA, serving_retrieval.ITEMS_FILE)}")
    print(f"export: SavedModel at {os.path.abspath(path)}")


if __name__ == "__main__":
    main()
