"""Warm start remaps vocabulary rows by feature and copies other variables by name."""
from __future__ import annotations

import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf

from etl import pipeline
from etl.config import EtlConfig, FieldConfig
from feature_schema import read_vocabulary
from trainer import config as config_lib
from trainer import train as trainer_lib
from trainer.models import build_model
from trainer.warm_start import warm_start


def _etl(tmp_path, name, lines):
    src = tmp_path / f"{name}.libffm"
    src.write_text("\n".join(lines) + "\n")
    cfg = EtlConfig(input=str(src), eval_input=str(src), format="libffm", out=str(tmp_path / name), min_count=1,
                    num_shards=1, fields=(FieldConfig("user"), FieldConfig("item")))
    with beam.Pipeline() as p:
        pipeline.build_pipeline(p, cfg)
    return pipeline.write_schema(cfg)


def _rows(schema):
    return {(e.field, e.key): e.index for e in read_vocabulary(schema.vocabulary_file())}


def _model(schema, name="lr"):
    model = build_model(config_lib.ModelConfig(name=name, embedding_dim=2), schema)
    return trainer_lib.init_model(model, schema)


def test_rows_follow_features_and_new_rows_stay_fresh(tmp_path):
    day1 = _etl(tmp_path, "day1", ["1 user:a:1 item:x:1", "0 user:b:1 item:y:1", "0 user:b:1 item:x:1"])
    # Day 2: a is gone, c is new, and b is now the most frequent user (so its row index moves).
    day2 = _etl(tmp_path, "day2", ["1 user:c:1 item:x:1", "0 user:b:1 item:z:1", "0 user:b:1 item:x:1",
                                   "1 user:b:1 item:x:1"])
    r1, r2 = _rows(day1), _rows(day2)
    old = _model(day1)
    w_old = np.arange(day1.num_features, dtype=np.float32)[:, None] + 10.0
    old.linear.w.assign(w_old)
    old.linear.bias.assign([0.25])
    run1 = tmp_path / "run1"
    config_lib.save(config_lib.ExperimentConfig(data=config_lib.DataConfig(path=day1.base_dir),
                                                model=config_lib.ModelConfig(name="lr")),
                    str(run1 / "config.yaml"))
    tf.train.Checkpoint(model=old).write(str(run1 / trainer_lib.WEIGHTS_DIR / "weights"))

    new = _model(day2)
    report = warm_start(new, day2, str(run1))
    w_new = new.linear.w.numpy()[:, 0]
    assert w_new[r2[("user", "b")]] == w_old[r1[("user", "b")], 0]
    assert w_new[r2[("item", "x")]] == w_old[r1[("item", "x")], 0]
    assert w_new[r2[("user", "c")]] == 0.0 and w_new[r2[("item", "z")]] == 0.0  # fresh (zeros init)
    assert w_new[day2.field("item").rare_id] == w_old[day1.field("item").rare_id, 0]
    assert float(new.linear.bias.numpy()[0]) == 0.25
    # user b, item x, and the two rare rows were kept; c and z are new.
    assert report.remapped["model/linear/w"] == (4, 2)
    assert report.copied == ["model/linear/bias"]

    # The same from yesterday's TF Serving export instead of its run dir.
    from export import exporter
    path, _ = exporter.export(str(run1), export_base=str(tmp_path / "export"))
    from_export = _model(day2)
    warm_start(from_export, day2, path)
    np.testing.assert_array_equal(from_export.linear.w.numpy(), new.linear.w.numpy())

    # A changed model shape is a clear error.
    other = _model(day2, "fm")
    with pytest.raises(ValueError, match="not in"):
        warm_start(other, day2, str(run1))
