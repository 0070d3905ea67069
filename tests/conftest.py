"""Shared fixtures: a tiny generated click log and its ETL output, built once per session."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import pytest  # noqa: E402

from etl.config import EntityTableConfig, EtlConfig, FieldConfig  # noqa: E402
from generator.clicklog import GeneratorConfig, generate  # noqa: E402

# Small enough for seconds of ETL and training, dense enough that ids are learnable.
TINY = GeneratorConfig(n_train=12_000, n_eval=4_000, n_users=300, n_items=200, n_queries=60,
                       n_categories=10, n_brands=30, seed=11)


def tf1_run(export_dir: str, inputs: dict, signature: str = "serving_default") -> dict:
    """Runs a SavedModel signature the way TF Serving does (TF1 loader, ``Session.run`` by tensor names).

    Args:
      export_dir: the SavedModel.
      inputs: signature input key -> value.
    Returns:
      {output key: NumPy array} of every output of the signature.
    """
    import tensorflow as tf

    with tf.compat.v1.Session(graph=tf.Graph()) as sess:
        sig = tf.compat.v1.saved_model.loader.load(sess, ["serve"], export_dir).signature_def[signature]
        return sess.run({k: v.name for k, v in sig.outputs.items()},
                        {sig.inputs[k].name: v for k, v in inputs.items()})


def generated_etl_config(raw_dir: str, out_dir: str, **overrides) -> EtlConfig:
    """The ETL config of the generator's output (same as configs/etl_generated.yaml)."""
    kwargs = dict(
        input=os.path.join(raw_dir, "train.libffm"), eval_input=os.path.join(raw_dir, "eval.libffm"),
        format="libffm", labels=("click", "conversion"), out=out_dir, min_count=3, strict_fields=True,
        num_shards=2,
        fields=(FieldConfig("user"), FieldConfig("item"), FieldConfig("category"), FieldConfig("brand"),
                FieldConfig("price", kind="binned", num_bins=10),
                FieldConfig("position", linear_only=True, min_count=1), FieldConfig("hour", min_count=1),
                FieldConfig("device", min_count=1), FieldConfig("query")),
        entity_tables=(EntityTableConfig(name="items", path=os.path.join(raw_dir, "items.tsv"), key_field="item"),),
    )
    kwargs.update(overrides)
    return EtlConfig(**kwargs)


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory):
    """(raw dir, truth dict) of a tiny generated log in libffm and libfm."""
    raw = str(tmp_path_factory.mktemp("raw"))
    truth = generate(raw, TINY, formats=("libffm", "libfm"))
    return raw, truth


@pytest.fixture(scope="session")
def tiny_etl(tiny_raw, tmp_path_factory):
    """ETL output directory (schema.json, TFRecords) of the tiny log."""
    import apache_beam as beam

    from etl import pipeline

    raw, _ = tiny_raw
    out = str(tmp_path_factory.mktemp("etl"))
    cfg = generated_etl_config(raw, out)
    with beam.Pipeline() as p:
        pipeline.build_pipeline(p, cfg)
    pipeline.write_schema(cfg)
    return out


@pytest.fixture(scope="session")
def served_export(tiny_etl, tmp_path_factory):
    """{"base", "model", "runs": {"lr", "fm"}, "versions": {1: lr version dir, 2: fm version dir}}:
    lr and fm trained for one short epoch on tiny_etl, exported as versions 1 and 2 of model "ctr"."""
    from export import exporter
    from trainer import config as config_lib
    from trainer import train as trainer_lib

    base = str(tmp_path_factory.mktemp("export"))
    runs, version_dirs = {}, {}
    for v, name in ((1, "lr"), (2, "fm")):
        runs[name] = str(tmp_path_factory.mktemp(f"run-{name}"))
        trainer_lib.train(config_lib.resolve(f"generated_{name}", overrides={
            "data": {"path": tiny_etl, "batch_size": 512}, "run_dir": runs[name], "export_base": base,
            "train": {"epochs": 1, "verbose": 0}}))
        version_dirs[v], _ = exporter.export(runs[name], base, "ctr")
    return {"base": base, "model": "ctr", "runs": runs, "versions": version_dirs}


# The fusion config of ``mtl_fusion_export``: exponents other than 1 and mtl's task names as ctr/cvr.
MTL_FUSION = {"a": 0.5, "b": 2.0, "ctr_output": "click", "cvr_output": "conversion", "bid_feature": "bid"}


@pytest.fixture(scope="session")
def mtl_fusion_export(tiny_etl, tmp_path_factory):
    """{"run_dir", "path", "check"}: ``mtl`` with uncertainty loss weighting and ``MTL_FUSION``, trained one
    short epoch on tiny_etl and exported (tests/test_fusion.py, tests/test_weighting.py)."""
    from export import exporter
    from trainer import config as config_lib
    from trainer import train as trainer_lib

    run_dir = str(tmp_path_factory.mktemp("run-mtl-fusion"))
    trainer_lib.train(config_lib.resolve("", overrides={
        "data": {"path": tiny_etl, "batch_size": 256}, "run_dir": run_dir,
        "model": {"name": "mtl", "loss_weighting": "uncertainty"}, "optimizer": {"learning_rate": 0.01},
        "train": {"epochs": 1, "verbose": 0, "report": False}, "fusion": MTL_FUSION}))
    path, check = exporter.export(run_dir, str(tmp_path_factory.mktemp("export-mtl-fusion")), "mtl")
    return {"run_dir": run_dir, "path": path, "check": check}
