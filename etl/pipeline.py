"""The ETL job: libfm/libffm logs -> sharded gzip TFRecords + schema.json.

    python -m etl.pipeline --input 'logs/*.libffm' --labels click,conversion --out data/etl \
        [--config etl.yaml] [--set key=value ...] [Beam pipeline options ...]

Every flag this job does not know goes to Beam's ``PipelineOptions``, so the
same command runs on the DirectRunner (default), ``--runner=FlinkRunner`` or
``--runner=DataflowRunner`` without code changes.

Output layout (``out``):
  schema.json           the contract read by trainer and exporter
  vocabulary.tsv        field, key, hash, row, count of every non-rare feature
  train/part-*.tfrecord.gz, eval/part-*.tfrecord.gz
  dead_letter/<split>-*.jsonl  malformed lines with reason and raw bytes
  _meta/                stats and field layout the launcher turns into schema.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from etl import transforms
from etl.config import EtlConfig, load_config
from etl.dictionaries import read_entity_table, read_field_map, table_columns
from feature_schema import (HASH_FUNCTION, SCHEMA_FILENAME, VOCAB_FILENAME, ExampleKeys, FieldSpec, LabelSpec,
                            Schema, configs, string_hash, write_vocabulary_lines)

SPLITS = ("train", "eval")
SHARD_SUFFIX = ".tfrecord.gz"


def _split_of(raw: bytes, eval_percent: int) -> int:
    return 1 if string_hash(raw.decode("latin-1")) % 100 < eval_percent else 0


def _field_settings(cfg: EtlConfig, table_fields: dict[str, str]) -> tuple[list[str], dict[str, dict]]:
    """Declared field order and per-field settings (kind, min_count, ...)."""
    names = [f.name for f in cfg.fields]
    for col, source in table_fields.items():
        if col not in names:
            names.append(col)
    settings = {}
    for name in names:
        fc = cfg.field_config(name)
        settings[name] = dict(kind=fc.kind, min_count=cfg.min_count_of(name), linear_only=fc.linear_only,
                              source=table_fields.get(name, "log"), multi_hot=fc.multi_hot)
    settings["__default__"] = dict(min_count=cfg.min_count)
    return names, settings


def build_pipeline(p: beam.Pipeline, cfg: EtlConfig, keys: ExampleKeys = ExampleKeys()) -> None:
    """Adds the whole job to pipeline ``p``."""
    out = cfg.out
    raw = {}
    if cfg.eval_input:
        raw["train"] = p | "ReadTrain" >> beam.io.ReadFromText(cfg.input, coder=beam.coders.BytesCoder())
        raw["eval"] = p | "ReadEval" >> beam.io.ReadFromText(cfg.eval_input, coder=beam.coders.BytesCoder())
    else:
        lines = p | "Read" >> beam.io.ReadFromText(cfg.input, coder=beam.coders.BytesCoder())
        raw["train"], raw["eval"] = lines | "HashSplit" >> beam.Partition(
            lambda line, n, pct: _split_of(line, pct), 2, cfg.eval_percent)

    field_map = read_field_map(p, cfg.field_map) if cfg.format == "libfm" else None
    tables = []
    table_fields: dict[str, str] = {}
    for t in cfg.entity_tables:
        cols = table_columns(t)
        numeric = {c for c in cols if cfg.field_config(c).kind in ("binned", "numeric")}
        tables.append((t, numeric, read_entity_table(p, t, cols)))
        for c in cols:
            table_fields[c] = f"dict:{t.name}"
    field_names, settings = _field_settings(cfg, table_fields)

    parsed = {s: raw[s] | f"Parse{s.title()}" >> transforms.ParseLogs(s, cfg, field_map, tables) for s in SPLITS}
    num_bins = {f.name: f.num_bins for f in cfg.fields if f.kind == "binned"}
    bounds = parsed["train"].examples | "Bins" >> transforms.ComputeBinBoundaries(num_bins)
    binned_train = parsed["train"].examples | "ApplyBinsForCount" >> beam.Map(
        lambda ex, b: (ex[0], transforms.feat.apply_bins(ex[1], b)), beam.pvalue.AsDict(bounds))
    counts = binned_train | "Count" >> transforms.CountFeatures()
    layout = counts | "Layout" >> transforms.BuildLayout(field_names, settings, bounds)

    _ = (layout
         | "VocabLines" >> beam.FlatMap(lambda lay: write_vocabulary_lines(lay["vocab"]))
         | "WriteVocab" >> beam.io.WriteToText(os.path.join(out, VOCAB_FILENAME), shard_name_template="",
                                               num_shards=1))
    _ = (layout
         | "FieldsJson" >> beam.Map(lambda lay: json.dumps([_spec_dict(s) for s in lay["specs"]]))
         | "WriteFields" >> beam.io.WriteToText(os.path.join(out, "_meta", "fields.json"),
                                                shard_name_template="", num_shards=1))

    stats = []
    for s in SPLITS:
        rows = parsed[s].examples | f"ToExamples{s.title()}" >> transforms.ToExamples(s, cfg, layout, bounds, keys)
        _ = (rows.rows
             | f"Serialize{s.title()}" >> beam.Map(transforms.feat.serialize_example, cfg.labels, keys)
             | f"Write{s.title()}" >> beam.io.WriteToTFRecord(
                 os.path.join(out, s, "part"), file_name_suffix=SHARD_SUFFIX, num_shards=cfg.num_shards,
                 compression_type=CompressionTypes.GZIP))
        dead = (parsed[s].dead, rows.dead) | f"DeadAll{s.title()}" >> beam.Flatten()
        _ = dead | f"WriteDead{s.title()}" >> beam.io.WriteToText(
            os.path.join(out, "dead_letter", s), file_name_suffix=".jsonl", num_shards=1)
        stats.append(raw[s] | f"CountRead{s.title()}" >> _CountAs(f"{s}.read"))
        stats.append(rows.rows | f"CountWritten{s.title()}" >> _CountAs(f"{s}.written"))
        stats.append(dead | f"CountDead{s.title()}" >> _CountAs(f"{s}.dead_lettered"))
        stats.append(rows.rows | f"MaxFeatures{s.title()}" >> (
            beam.Map(lambda r: len(r.ids)) | beam.CombineGlobally(lambda xs: max(xs, default=0))
            | beam.Map(lambda n, name: (name, n), f"{s}.max_features")))
        stats.append(rows.rows | f"Positives{s.title()}" >> (
            beam.FlatMap(lambda r: list(enumerate(r.labels))) | beam.CombinePerKey(sum)
            | beam.Map(lambda kv, name: (f"{name}.positives.{kv[0]}", kv[1]), s)))
    _ = (stats
         | "FlattenStats" >> beam.Flatten()
         | "GatherStats" >> beam.combiners.ToDict()
         | "StatsJson" >> beam.Map(lambda d: json.dumps(d, sort_keys=True))
         | "WriteStats" >> beam.io.WriteToText(os.path.join(out, "_meta", "stats.json"),
                                               shard_name_template="", num_shards=1))


class _CountAs(beam.PTransform):
    def __init__(self, name):
        super().__init__()
        self._name = name

    def expand(self, pcoll):
        return (pcoll | beam.combiners.Count.Globally()
                | beam.Map(lambda n, name: (name, n), self._name))


def _spec_dict(s: FieldSpec) -> dict:
    d = s.__dict__.copy()
    if d["bin_boundaries"] is not None:
        d["bin_boundaries"] = list(d["bin_boundaries"])
    return d


def _read_text(path: str) -> str:
    with FileSystems.open(path) as f:
        return f.read().decode("utf-8")


def prepare_output(out: str) -> None:
    """Removes outputs of an earlier run so shards of two runs never mix."""
    stale = [os.path.join(out, d) for d in (*SPLITS, "dead_letter", "_meta")]
    stale += [os.path.join(out, SCHEMA_FILENAME), os.path.join(out, VOCAB_FILENAME)]
    existing = [p for p in stale if FileSystems.exists(p)]
    if existing:
        FileSystems.delete(existing)


def write_schema(cfg: EtlConfig, keys: ExampleKeys = ExampleKeys()) -> Schema:
    """Assembles schema.json from the job's _meta outputs."""
    out = cfg.out
    stats = json.loads(_read_text(os.path.join(out, "_meta", "stats.json")))
    specs = [FieldSpec(**{**d, "bin_boundaries": tuple(d["bin_boundaries"]) if d["bin_boundaries"] else None})
             for d in json.loads(_read_text(os.path.join(out, "_meta", "fields.json")))]
    written_train = stats.get("train.written", 0)
    labels = []
    for i, name in enumerate(cfg.labels):
        pos = stats.get(f"train.positives.{i}", 0)
        labels.append(LabelSpec(name=name, positive_rate=pos / written_train if written_train else 0.0,
                                positives=int(pos)))
    counts = {s: {k: int(stats.get(f"{s}.{k}", 0)) for k in ("read", "written", "dead_lettered")} for s in SPLITS}
    splits = {s: {"files": [f"{s}/part-*{SHARD_SUFFIX}"], "examples": counts[s]["written"]} for s in SPLITS}
    schema = Schema(
        fields=tuple(specs), labels=tuple(labels), num_features=sum(s.vocab_size for s in specs),
        max_features_per_example=int(max(stats.get("train.max_features", 0), stats.get("eval.max_features", 0))),
        example_keys=keys, hash_function=HASH_FUNCTION, vocabulary_path=VOCAB_FILENAME, splits=splits,
        counts=counts, format=cfg.format,
        sources={"input": cfg.input, "eval_input": cfg.eval_input, "field_map": cfg.field_map,
                 "entity_tables": [t.path for t in cfg.entity_tables], "config": configs.to_dict(cfg)})
    with FileSystems.create(os.path.join(out, SCHEMA_FILENAME)) as f:
        f.write(schema.to_json().encode("utf-8"))
    return dataclasses.replace(schema, base_dir=out if "://" in out else os.path.abspath(out))


def parse_args(argv):
    p = argparse.ArgumentParser(description="libfm/libffm logs -> sparse TFRecords + feature schema "
                                            "(unknown flags go to Beam's PipelineOptions)")
    p.add_argument("--config", default="", help="YAML file of EtlConfig")
    for name in ("input", "eval_input", "format", "field_map", "labels", "out"):
        p.add_argument(f"--{name}", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return p.parse_known_args(argv)


def run(argv=None) -> Schema:
    """Parses flags, runs the Beam job, writes and returns the schema."""
    args, beam_args = parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("input", "eval_input", "format", "field_map", "labels", "out")
                 if getattr(args, k) not in (None, "")}
    overrides = configs.deep_merge(overrides, configs.parse_overrides(args.set))
    cfg = load_config(args.config, overrides)
    if not cfg.input:
        raise SystemExit("etl: --input (INPUT=<glob>) is required")
    prepare_output(cfg.out)
    start = time.time()
    options = PipelineOptions(beam_args)
    p = beam.Pipeline(options=options)
    build_pipeline(p, cfg)
    result = p.run()
    result.wait_until_finish()
    schema = write_schema(cfg)
    elapsed = time.time() - start
    _print_summary(cfg, schema, result, elapsed)
    return schema


def _print_summary(cfg, schema, result, elapsed) -> None:
    try:
        counters = result.metrics().query()["counters"]
        lines = sorted(f"  {c.key.metric.name} = {c.committed if c.committed is not None else c.attempted}"
                       for c in counters if c.key.metric.namespace == transforms.NAMESPACE)
    except Exception as e:  # some runners do not report metrics; the stats file still has the counts
        lines = [f"  (runner reported no counters: {e})"]
    print("etl: Beam counters\n" + "\n".join(lines))
    for s in SPLITS:
        c = schema.counts[s]
        ok = c["read"] == c["written"] + c["dead_lettered"]
        print(f"etl: {s}: read {c['read']} = written {c['written']} + dead-lettered {c['dead_lettered']}"
              f" [{'ok' if ok else 'MISMATCH'}]")
    print(f"etl: {len(schema.fields)} fields, {schema.num_features} feature rows, labels "
          + ", ".join(f"{lab.name} (train positive rate {lab.positive_rate:.4f})" for lab in schema.labels))
    print(f"etl: wrote {os.path.join(cfg.out, SCHEMA_FILENAME)} in {elapsed:.1f}s")


def main(argv=None) -> None:
    run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
