"""A generated click log and its ETL output, built once per generator config (for the quality scripts)."""
from __future__ import annotations

import dataclasses
import json
import os

import yaml

from generator.clicklog import GeneratorConfig, generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The quality scripts' log: the planted field-aware click model over more items than the ``quality``
# preset (top-50 retrieval is a tenth of the catalogue) and a size that trains in minutes here.
MID = GeneratorConfig(n_train=400_000, n_eval=20_000, n_users=300, n_items=500, n_queries=60, n_categories=25,
                      n_brands=60, seed=7)
MID_DIR = os.path.join("runs", "bench", "generated-mid")
ETL_CONFIG = os.path.join(REPO, "configs", "etl_generated.yaml")


def prepare(out_dir: str, gcfg: GeneratorConfig, etl_config: str = ETL_CONFIG) -> tuple[str, str]:
    """Generates ``gcfg``'s log into ``out_dir/raw`` and ETLs it into ``out_dir/etl`` with ``etl_config``
    (default ``configs/etl_generated.yaml``); reuses both when ``out_dir`` holds the same config.

    Returns:
      (raw dir, ETL dir).
    """
    raw, etl = os.path.join(out_dir, "raw"), os.path.join(out_dir, "etl")
    stamp = os.path.join(out_dir, "generator.json")
    want = {**dataclasses.asdict(gcfg), "etl_config": os.path.basename(etl_config)} if etl_config != ETL_CONFIG \
        else dataclasses.asdict(gcfg)
    if os.path.exists(stamp) and os.path.exists(os.path.join(etl, "schema.json")):
        with open(stamp, encoding="utf-8") as f:
            if json.load(f) == want:
                return raw, etl
    from etl import pipeline

    generate(raw, gcfg)
    with open(etl_config, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    for table in cfg.get("entity_tables", []):  # the config names data/raw; point it at this log's tables
        table["path"] = os.path.join(raw, os.path.basename(table["path"]))
    cfg_path = os.path.join(out_dir, "etl.yaml")
    with open(cfg_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f)
    pipeline.run(["--config", cfg_path, "--input", os.path.join(raw, "train.libffm"),
                  "--eval_input", os.path.join(raw, "eval.libffm"), "--out", etl])
    with open(stamp, "w", encoding="utf-8") as f:
        json.dump(want, f)
    return raw, etl


def read_libffm(path: str, limit: int | None = None) -> tuple[list[str], list[dict[str, str]]]:
    """(lines, per line {field: key}) of a generated libffm file (the first ``limit`` lines)."""
    lines, rows = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(lines) >= limit:
                break
            line = line.rstrip("\n")
            lines.append(line)
            rows.append({tok.split(":")[0]: tok.split(":")[1] for tok in line.split()[1:]})
    return lines, rows
