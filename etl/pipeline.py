"""The ETL job: libfm/libffm logs -> sharded gzip TFRecords of hashed features + schema.json.

    python -m etl.pipeline --input 'logs/*.libffm' --labels click,conversion --out data/etl \
        [--eval_input GLOB] [--valid_input GLOB] [--fields_tsv FIELDS.tsv] [--config etl.yaml] \
        [--set key=value ...] [Beam pipeline options ...]

Every flag this job does not know goes to Beam's ``PipelineOptions``, so the
same command runs on the DirectRunner (default), ``--runner=FlinkRunner`` or
``--runner=DataflowRunner`` without code changes (docs/ETL.md).

Output layout (``out``):
  schema.json                the contract read by the featurization layer and the trainer (written last)
  vocabulary.tsv             field, key, hash, row, count of every feature with a row of its own
  train/part-*.tfrecord.gz, eval/..., valid/...   version-2 records (``feature_schema.ExampleKeys``)
  dead_letter/<split>-*.jsonl  malformed lines with reason and raw bytes
  _meta/                     stats, field layout and usage the launcher turns into schema.json

``run`` writes all of it into ``out/.staging-<id>/`` and moves it into place
only after the job succeeded (``publish``), so a rerun never mixes shards of
two runs and a failed run leaves the previous output untouched.

The graph (``build_pipeline``): ``ParseAndJoin`` of all inputs as one read (parse, joins, checks, split),
then ``WriteRecords`` (hash, encode, write while streaming), ``Statistics`` (counts, bins,
value statistics -> vocabulary) and ``WriteDeadLetters``, ``Report`` (stats, counters).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import sys
import time
import uuid
from functools import partial

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions, WorkerOptions

from etl import dictionaries, transforms
from etl import features as feat
from etl.config import EtlConfig, fields_from_tsv, load_config
from etl.plan import load_base_schema, plan_job, read_text
from feature_schema import (HASH_FUNCTION, SCHEMA_FILENAME, VOCAB_FILENAME, EntityTableSpec, ExampleKeys,
                            FieldSpec, LabelSpec, Schema, VectorFieldSpec, configs)

SPLITS = ("train", "eval", "valid")
SHARD_SUFFIX = transforms.SHARD_SUFFIX
META = transforms.META
OUTPUT_DIRS = (*SPLITS, "dead_letter", META)
STAGING_PREFIX = ".staging-"


def _inputs(cfg: EtlConfig):
    """(source split or None, glob) per input."""
    out = [(feat.TRAIN if cfg.eval_input else None, cfg.input)]
    if cfg.eval_input:
        out.append((feat.EVAL, cfg.eval_input))
    if cfg.valid_input:
        out.append((feat.VALID, cfg.valid_input))
    return out


VECTOR_FIELDS_META = "vector_fields.json"


def _dictionary(path: str, keyed: bool, inline_max_bytes: int, label: str, read, read_here):
    """A dictionary as ``ParseAndJoin`` takes it: its (key, value) pairs read by the job when it is
    joined by key; else its ``packed`` element read here when the file is at most
    ``inline_max_bytes`` (it travels inside the job graph), or its ``pack`` read by the job."""
    if keyed:
        return read()
    if dictionaries.is_inline(path, inline_max_bytes):
        return transforms.packed(read_here())
    return transforms.pack(read(), label)


def build_pipeline(p: beam.Pipeline, cfg: EtlConfig, keys: ExampleKeys = ExampleKeys()) -> None:
    """Adds the whole job to pipeline ``p`` (outputs under ``cfg.out``).

    The vector fields' tables are validated while the plan is made, before the graph exists; their
    specs go to ``_meta/vector_fields.json`` for ``write_schema``.
    """
    plan = plan_job(cfg)
    transforms.write_text(FileSystems.join(cfg.out, META, VECTOR_FIELDS_META),
                          json.dumps([dataclasses.asdict(v) for v in plan.vectors]))
    field_map = None
    if cfg.format == "libfm":
        field_map = _dictionary(cfg.field_map, plan.field_map_keyed, cfg.inline_max_bytes, "FieldMap",
                                partial(dictionaries.read_field_map, p, cfg.field_map),
                                partial(dictionaries.field_map_here, cfg.field_map))
    tables = [_dictionary(t.path, keyed, cfg.inline_max_bytes, f"Entity_{t.name}",
                          partial(dictionaries.read_entity_table, p, t, list(cols), values),
                          partial(dictionaries.entity_table_here, t, list(cols), values))
              for t, cols, values, keyed in plan.tables]
    # All inputs are one read and one record PCollection: no Flatten, so nothing makes the runner hold records.
    parsed = p | "ParseAndJoin" >> transforms.ParseAndJoin(plan, _inputs(cfg), field_map, tables)
    records = parsed["records"]
    _ = records | "Statistics" >> transforms.Statistics(plan, cfg.out)
    written = records | "WriteRecords" >> transforms.WriteRecords(
        cfg.out, plan.splits, cfg.num_shards, cfg.labels, keys, multi_hot=bool(plan.spec.multi_hot),
        namespaces=plan.namespaces)
    _ = parsed["dead"] | "WriteDeadLetters" >> transforms.WriteDeadLetters(cfg.out, plan.splits)
    _ = (*parsed["stats"], written["stats"]) | "Report" >> transforms.Report(cfg.out)


def _split_counts(stats: dict, split: str) -> dict:
    c = {k: int(stats.get(f"{split}.{k}", 0)) for k in ("read", "written", "dead_lettered")}
    prefix = f"{split}.dead."
    c["dead_letter_reasons"] = {k[len(prefix):]: int(v) for k, v in sorted(stats.items()) if k.startswith(prefix)}
    prefix = f"{split}.truncated."
    truncated = {k[len(prefix):]: {"lines": int(v), "keys": int(stats.get(f"{split}.truncated_keys.{k[len(prefix):]}", 0))}
                 for k, v in sorted(stats.items()) if k.startswith(prefix)}
    if truncated:  # sequence field -> lines with more than max_length keys, keys dropped
        c["truncated"] = truncated
    return c


def _max_features(specs, stats: dict, splits, fill_missing: bool) -> int:
    """Most features of one example; with ``fill_missing`` after the layer added missing fields.

    A record with ``n`` features of ``d`` distinct fields gets ``num_fields - d`` missing rows:
    ``num_fields + (n - d)`` in all, so the most is ``num_fields`` + the most repeats.
    """
    if not any(stats.get(f"{s}.written", 0) for s in splits):
        return 0
    if fill_missing:
        return len(specs) + int(max(stats.get(f"{s}.max_repeats", 0) for s in splits))
    return int(max(stats.get(f"{s}.max_features", 0) for s in splits))


def write_schema(cfg: EtlConfig, keys: ExampleKeys = ExampleKeys(), out_dir: str = "") -> Schema:
    """Assembles schema.json from the job's _meta outputs.

    Args:
      cfg: the job's config (recorded in the schema's sources).
      keys: the example keys the job wrote.
      out_dir: where the job wrote (a staging directory); default ``cfg.out``.

    Returns:
      The schema, with ``base_dir`` set to ``out_dir``.
    """
    out = out_dir or cfg.out
    stats = json.loads(read_text(os.path.join(out, META, "stats.json")))
    usage = json.loads(read_text(os.path.join(out, META, "usage.json")))
    specs = []
    for d in json.loads(read_text(os.path.join(out, META, "fields.json"))):
        d["bin_boundaries"] = tuple(d["bin_boundaries"]) if d["bin_boundaries"] is not None else None
        d["extra_ranges"] = tuple(tuple(r) for r in d["extra_ranges"])
        specs.append(FieldSpec(**d))
    written_train = stats.get("train.written", 0)
    labels = []
    for i, name in enumerate(cfg.labels):
        pos = stats.get(f"train.positives.{i}", 0)
        labels.append(LabelSpec(name=name, positive_rate=pos / written_train if written_train else 0.0,
                                positives=int(pos)))
    splits = cfg.split_names
    counts = {s: _split_counts(stats, s) for s in splits}
    base = load_base_schema(cfg.vocabulary) if cfg.vocabulary else None
    vectors = tuple(VectorFieldSpec(**v) for v in json.loads(read_text(os.path.join(out, META, VECTOR_FIELDS_META))))
    schema = Schema(
        fields=tuple(specs), labels=tuple(labels), num_features=sum(s.num_rows for s in specs),
        max_features_per_example=_max_features(specs, stats, splits, cfg.fill_missing),
        example_keys=keys, hash_function=HASH_FUNCTION, vocabulary_path=VOCAB_FILENAME,
        splits={s: {"files": [f"{s}/part-*{SHARD_SUFFIX}"], "examples": counts[s]["written"]} for s in splits},
        counts=counts, format=cfg.format,
        sources={"input": cfg.input, "eval_input": cfg.eval_input, "valid_input": cfg.valid_input,
                 "field_map": cfg.field_map, "entity_tables": [t.path for t in cfg.entity_tables],
                 "input_lines": int(stats.get("input.read", 0)), "config": configs.to_dict(cfg)},
        vocabulary_mode=cfg.vocabulary_mode if base else "build", base_schema=cfg.vocabulary if base else "",
        base_num_features=base.num_features if base else 0, fill_missing=cfg.fill_missing,
        entity_tables=entity_table_specs(cfg),
        field_index=tuple(f.name for f in cfg.fields) if cfg.field_ids == "index" else (),
        vector_fields=vectors,
        warnings=tuple(feat.single_row_warnings(specs, usage, int(written_train))) + _vector_warnings(vectors))
    with FileSystems.create(os.path.join(out, SCHEMA_FILENAME)) as f:
        f.write(schema.to_json().encode("utf-8"))
    return dataclasses.replace(schema, base_dir=out if "://" in out else os.path.abspath(out))


# Above this many floats in all vector tables the graph constants get large (4 bytes each; a
# SavedModel's graph must stay under 2 GB): a warning in the schema.
VECTOR_FLOATS_WARN = 1 << 27


def _vector_warnings(vectors) -> tuple[str, ...]:
    total = sum((v.rows + 1) * v.dim for v in vectors)
    if total <= VECTOR_FLOATS_WARN:
        return ()
    return (f"vector fields hold {total} floats ({total * 4 / 2 ** 20:.0f} MiB) that the featurization layer keeps "
            f"as graph constants in every export; a SavedModel's graph must stay under 2 GB",)


def entity_table_specs(cfg: EtlConfig) -> tuple[EntityTableSpec, ...]:
    """The tables joined into records as the schema records them (absolute paths where the paths are
    local); vector columns are left out (``Schema.vector_fields`` has them), and so is a table of
    vectors only."""
    vector_names = {f.name for f in cfg.fields if f.kind == "vector"}
    specs = []
    for t in cfg.entity_tables:
        columns = tuple(c for c in dictionaries.table_columns(t) if c not in vector_names)
        if not columns:
            continue
        path = t.path if "://" in t.path else os.path.abspath(t.path)
        specs.append(EntityTableSpec(name=t.name, path=path, key_field=t.key_field,
                                     key_column=t.key_column or t.key_field, columns=columns))
    return tuple(specs)


def _files_under(directory: str) -> list[str]:
    match = FileSystems.match([FileSystems.join(directory, "*")])[0].metadata_list
    return sorted(m.path for m in match)


def _delete(paths) -> None:
    existing = [p for p in paths if FileSystems.exists(p)]
    if existing:
        FileSystems.delete(existing)


def publish(staging: str, out: str) -> None:
    """Moves a finished job's outputs from ``staging`` into ``out``, replacing an earlier run's.

    ``schema.json`` is deleted first and moved last: a reader that finds it
    finds a complete output of one run. Files are moved one by one, so this
    works on object stores too (where a rename is a copy and a delete).
    """
    _delete([FileSystems.join(out, SCHEMA_FILENAME)])
    _delete([FileSystems.join(out, d) for d in OUTPUT_DIRS] + [FileSystems.join(out, VOCAB_FILENAME)])
    src, dst = [], []
    for d in OUTPUT_DIRS:
        files = _files_under(FileSystems.join(staging, d))
        if files and not FileSystems.exists(FileSystems.join(out, d)):
            FileSystems.mkdirs(FileSystems.join(out, d))
        for f in files:
            src.append(f)
            dst.append(FileSystems.join(out, d, f.rsplit("/", 1)[-1]))
    src.append(FileSystems.join(staging, VOCAB_FILENAME))
    dst.append(FileSystems.join(out, VOCAB_FILENAME))
    FileSystems.rename(src, dst)
    FileSystems.rename([FileSystems.join(staging, SCHEMA_FILENAME)], [FileSystems.join(out, SCHEMA_FILENAME)])
    _delete([staging])


FLAGS = ("input", "eval_input", "valid_input", "format", "field_map", "labels", "out", "vocabulary")


def parse_args(argv):
    p = argparse.ArgumentParser(description="libfm/libffm logs -> TFRecords of hashed features + feature schema "
                                            "(unknown flags go to Beam's PipelineOptions)")
    p.add_argument("--config", default="", help="YAML file of EtlConfig")
    for name in FLAGS:
        p.add_argument(f"--{name}", default=None)
    p.add_argument("--fields_tsv", default="", help="TSV of field<TAB>name<TAB>kind rows (docs/ETL.md); "
                                                    "replaces the config's fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return p.parse_known_args(argv)


def config_from_args(args) -> EtlConfig:
    """The config of parsed flags: YAML, then ``--fields_tsv``, flags and ``--set`` on top."""
    overrides = {k: getattr(args, k) for k in FLAGS if getattr(args, k) not in (None, "")}
    if args.fields_tsv:
        overrides = configs.deep_merge(fields_from_tsv(read_text(args.fields_tsv), args.fields_tsv), overrides)
    overrides = configs.deep_merge(overrides, configs.parse_overrides(args.set))
    return load_config(args.config, overrides)


def beam_options(beam_args) -> list[str]:
    """The Beam flags of a run: the user's, plus two defaults.

    * Worker processes (multi_processing, portable runners) log at INFO: only errors, unless
      ``--default_sdk_harness_log_level`` is given.
    * No ``--runner`` and the default in-memory mode: the FnApiRunner, which the DirectRunner
      would pick for this batch job after visiting the graph to see whether Prism or the
      FnApiRunner can run it (0.2-0.3 s of CPU per run, a fifth of a small job's fixed cost).
      With ``--direct_running_mode=multi_processing`` the DirectRunner stays: it hands the
      pipeline options to the worker processes.
    """
    args = list(beam_args)
    given = PipelineOptions(args)
    if given.view_as(WorkerOptions).default_sdk_harness_log_level is None:
        args.append("--default_sdk_harness_log_level=ERROR")
    if given.view_as(StandardOptions).runner is None and given.view_as(DirectOptions).direct_running_mode == "in_memory":
        args.append("--runner=FnApiRunner")
    return args


def short_state_sampling(period_ms: int = 10) -> None:
    """Caps the sampling period of Beam's state sampler in this process at ``period_ms``.

    At the end of every bundle the SDK joins its state-sampling thread, which sleeps up to
    ``DEFAULT_SAMPLING_PERIOD_MS`` (200 ms) between samples, so each stage of an in-process run
    waited up to 0.2 s for nothing (0.2 s of a 2.9 s Frappe job, `bench_etl`). The sampler only
    feeds the msec counters; a shorter period keeps them. A Beam release whose sampler takes other
    defaults is left alone. Worker processes of other runners are not affected.
    """
    from apache_beam.runners.worker import statesampler

    init = statesampler.StateSampler.__init__
    if init.__defaults__ == (statesampler.DEFAULT_SAMPLING_PERIOD_MS,):
        init.__defaults__ = (min(period_ms, statesampler.DEFAULT_SAMPLING_PERIOD_MS),)


# CPython's default: a young collection after 700 more container allocations than frees.
GC_YOUNG_THRESHOLD = 100_000


@contextlib.contextmanager
def rare_young_collections(threshold: int = GC_YOUNG_THRESHOLD):
    """Raises the young-generation threshold of Python's cyclic GC for the block.

    Bundles hold batches of records (a few small containers per line) while they fill, so at
    the default threshold the collector ran about 800 times during the Frappe job (the plain
    loop, which frees each record at once, 40 times; ``bench.etl_stages``), and promoted
    batches into full collections over every object of the Beam runtime. The records hold no cycles; cycles elsewhere wait for at most ``threshold``
    allocations. Only this process is affected (the in-memory runner runs the job here).
    """
    young, *older = gc.get_threshold()
    gc.set_threshold(max(young, threshold), *older)
    try:
        yield
    finally:
        gc.set_threshold(young, *older)


def run(argv=None) -> Schema:
    """Parses flags, runs the Beam job into a staging dir, publishes it, returns the schema."""
    args, beam_args = parse_args(argv)
    short_state_sampling()
    cfg = config_from_args(args)
    if not cfg.input:
        raise SystemExit("etl: --input (INPUT=<glob>) is required")
    start = time.time()
    staging = FileSystems.join(cfg.out, f"{STAGING_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    p = beam.Pipeline(options=PipelineOptions(beam_options(beam_args)))
    build_pipeline(p, dataclasses.replace(cfg, out=staging))
    with rare_young_collections():
        result = p.run()
        result.wait_until_finish()
    schema = write_schema(cfg, out_dir=staging)
    publish(staging, cfg.out)
    schema = dataclasses.replace(schema, base_dir=cfg.out if "://" in cfg.out else os.path.abspath(cfg.out))
    _print_summary(cfg, schema, result, time.time() - start)
    return schema


def _print_summary(cfg, schema, result, elapsed) -> None:
    try:
        counters = [c for c in result.metrics().query()["counters"] if c.key.metric.namespace == transforms.NAMESPACE]
    except Exception as e:  # noqa: BLE001 - a runner without metrics support must not fail a finished job
        counters, error = [], f" ({type(e).__name__}: {e})"
    else:
        error = ""
    if counters:
        for c in sorted(counters, key=lambda c: c.key.metric.name):
            print(f"etl: counter {c.key.metric.name} = {c.committed if c.committed is not None else c.attempted}")
    else:
        print(f"etl: the runner reported no Beam counters{error}; counts below are from {META}/stats.json")
    total = 0
    for s in schema.counts:
        c = schema.counts[s]
        total += c["read"]
        ok = c["read"] == c["written"] + c["dead_lettered"]
        reasons = ", ".join(f"{k} {v}" for k, v in c["dead_letter_reasons"].items()) or "none"
        print(f"etl: {s}: read {c['read']} = written {c['written']} + dead-lettered {c['dead_lettered']}"
              f" [{'ok' if ok else 'MISMATCH'}]; dead-letter reasons: {reasons}")
    lines = schema.sources["input_lines"]
    parts = " + ".join(f"{s} read" for s in schema.counts)
    print(f"etl: input lines {lines} = {parts} {total} [{'ok' if lines == total else 'MISMATCH'}]")
    print(f"etl: {len(schema.fields)} fields ({', '.join(f.name for f in schema.fields)}), "
          f"{schema.num_features} feature rows, labels "
          + ", ".join(f"{lab.name} (train positive rate {lab.positive_rate:.4f})" for lab in schema.labels))
    for s in schema.counts:
        for field, t in schema.counts[s].get("truncated", {}).items():
            print(f"etl: {s}: {t['lines']} lines had more than max_length keys of sequence {field!r}: "
                  f"kept the first, dropped {t['keys']}")
    for v in schema.vector_fields:
        print(f"etl: vector field {v.name!r}: {v.rows} keys of {v.key_field!r}, dim {v.dim}, from {v.path}")
    for w in schema.warnings:
        print(f"etl: warning: {w}")
    rate = lines / elapsed if elapsed else 0.0
    print(f"etl: wrote {os.path.join(cfg.out, SCHEMA_FILENAME)} in {elapsed:.1f}s ({rate:.0f} lines/s)")


def main(argv=None) -> None:
    run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
