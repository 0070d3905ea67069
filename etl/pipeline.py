"""The ETL job: libfm/libffm logs -> sharded gzip TFRecords + schema.json.

    python -m etl.pipeline --input 'logs/*.libffm' --labels click,conversion --out data/etl \
        [--config etl.yaml] [--set key=value ...] [Beam pipeline options ...]

Every flag this job does not know goes to Beam's ``PipelineOptions``, so the
same command runs on the DirectRunner (default), ``--runner=FlinkRunner`` or
``--runner=DataflowRunner`` without code changes (docs/ETL.md).

Output layout (``out``):
  schema.json                the contract read by trainer and exporter (written last)
  vocabulary.tsv             field, key, hash, row, count of every non-rare feature
  train/part-*.tfrecord.gz, eval/part-*.tfrecord.gz
  dead_letter/<split>-*.jsonl  malformed lines with reason and raw bytes
  _meta/                     stats and field layout the launcher turns into schema.json

``run`` writes all of it into ``out/.staging-<id>/`` and moves it into place
only after the job succeeded (``publish``), so a rerun never mixes shards of
two runs and a failed run leaves the previous output untouched.

Passes: (1) per input file one fused DoFn parses, joins side-input
dictionaries, checks, splits and sums feature counts/values per bundle (a
dictionary joined by key adds a ``KeyedLookup`` between DoFns); the sums give
bin edges, the vocabulary and the field layout. (2) one DoFn per split maps
the records through the vocabulary (a side input) and serializes them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from etl import dictionaries, sources, transforms
from etl import features as feat
from etl.config import EtlConfig, load_config
from feature_schema import (HASH_FUNCTION, SCHEMA_FILENAME, VOCAB_FILENAME, EntityTableSpec, ExampleKeys,
                            FieldSpec, LabelSpec, Schema, configs, parse_vocabulary_line, write_vocabulary_lines)

SPLITS = transforms.SPLIT_NAMES
SHARD_SUFFIX = ".tfrecord.gz"
META = "_meta"
OUTPUT_DIRS = (*SPLITS, "dead_letter", META)
STAGING_PREFIX = ".staging-"


@dataclasses.dataclass(frozen=True)
class JobPlan:
    """Decisions taken on the launcher before the graph is built.

    Attributes:
      spec: what the line DoFns need (``features.LineSpec``).
      field_names: fields known before reading the logs, in schema order:
        base fields, declared fields, field-map order, table columns (fields
        first seen in the data follow, sorted, when the layout is built).
      settings: field -> dict(kind, min_count, linear_only, source, multi_hot).
      default_min_count: min_count of fields first seen in the data.
      binned, numeric: value fields by kind.
      num_bins: binned fields whose edges this run computes -> number of bins.
      base_bounds: binned fields whose edges come from the base schema.
      field_map_keyed: the field map is joined by key (else as a side input).
      tables: (table config, columns, value columns, joined by key) per entity table.
      mode: ``build``, ``fixed`` or ``extend`` (vocabulary).
      base: the base schema for fixed/extend.
      base_vocabulary: path of the base vocabulary file.
    """

    spec: feat.LineSpec
    field_names: tuple[str, ...]
    settings: dict
    default_min_count: int
    binned: frozenset
    numeric: frozenset
    num_bins: dict
    base_bounds: dict
    field_map_keyed: bool
    tables: tuple
    mode: str = "build"
    base: Schema | None = None
    base_vocabulary: str = ""


def _read_text(path: str) -> str:
    with FileSystems.open(path) as f:
        return f.read().decode("utf-8")


def _write_text(path: str, text: str) -> None:
    with FileSystems.create(path) as f:
        f.write(text.encode("utf-8"))


def load_base_schema(path: str) -> Schema:
    """The schema of an earlier run (its output directory or its schema.json; any Beam filesystem)."""
    if not path.endswith(".json"):
        path = FileSystems.join(path, SCHEMA_FILENAME)
    if not FileSystems.exists(path):
        raise FileNotFoundError(f"vocabulary: no schema at {path}")
    base_dir = path.rsplit("/", 1)[0] if "/" in path else "."
    return Schema.from_json_dict(json.loads(_read_text(path)), base_dir=base_dir)


def plan_job(cfg: EtlConfig) -> JobPlan:
    """Reads dictionary headers/sizes and the base schema; decides joins, fields and kinds."""
    base = load_base_schema(cfg.vocabulary) if cfg.vocabulary else None
    mode = cfg.vocabulary_mode if base else "build"
    declared = {f.name for f in cfg.fields}
    names: list[str] = []

    def add(name):
        if name not in names:
            names.append(name)

    sources: dict[str, str] = {}
    tables = []
    for t in cfg.entity_tables:
        cols = dictionaries.table_columns(t)
        for c in cols:
            sources.setdefault(c, f"dict:{t.name}")
        tables.append([t, tuple(cols), dictionaries.join_is_keyed(t.join, t.path, cfg.side_input_max_bytes)])
    for s in base.fields if base else ():
        add(s.name)
    if mode != "fixed":
        for f in cfg.fields:
            add(f.name)
    field_map_keyed = False
    if cfg.format == "libfm":
        dictionaries.check_field_map(cfg.field_map)
        field_map_keyed = dictionaries.join_is_keyed(cfg.field_map_join, cfg.field_map, cfg.side_input_max_bytes)
        # Keep the field map's order (user, item, ...) when it is small enough to scan here.
        if mode != "fixed" and dictionaries.dictionary_bytes(cfg.field_map) <= cfg.side_input_max_bytes:
            for name in dictionaries.field_map_fields(cfg.field_map):
                add(name)
    if mode != "fixed":
        for c in sources:
            add(c)
    base_specs = {s.name: s for s in base.fields} if base else {}
    settings = {}
    for name in names:
        fc = cfg.field_config(name)
        b = base_specs.get(name)
        if b is not None:
            if name in declared and fc.kind != b.kind:
                raise ValueError(f"field {name!r}: kind {fc.kind!r} differs from the base vocabulary's {b.kind!r}")
            settings[name] = dict(kind=b.kind, min_count=cfg.min_count_of(name), linear_only=b.linear_only,
                                  source=b.source, multi_hot=b.multi_hot)
        else:
            settings[name] = dict(kind=fc.kind, min_count=cfg.min_count_of(name), linear_only=fc.linear_only,
                                  source=sources.get(name, "log"), multi_hot=fc.multi_hot)
    # Value columns of the tables are known from the config even if a fixed base lacks them.
    kinds = {name: s["kind"] for name, s in settings.items()}
    for f in cfg.fields:
        kinds.setdefault(f.name, f.kind)
    binned = frozenset(n for n, k in kinds.items() if k == "binned")
    numeric = frozenset(n for n, k in kinds.items() if k == "numeric")
    base_bounds = {n: tuple(base_specs[n].bin_boundaries or ()) for n in binned if n in base_specs}
    num_bins = {n: cfg.field_config(n).num_bins for n in binned if n not in base_bounds and n in settings}
    tables = tuple((t, cols, frozenset(c for c in cols if c in binned | numeric), keyed) for t, cols, keyed in tables)
    known = None
    if cfg.strict_fields:
        known = frozenset(declared | set(sources) | set(base_specs))
    spec = feat.LineSpec(
        fmt=cfg.format, num_labels=len(cfg.labels), max_features=cfg.max_features,
        field_index=tuple(f.name for f in cfg.fields) if cfg.field_ids == "index" else None,
        known_fields=known,
        multi_hot=frozenset(n for n in names if settings[n]["multi_hot"]) | {f.name for f in cfg.fields if f.multi_hot},
        value_fields=binned | numeric, table_keys=tuple(t.key_field for t, *_ in tables),
        split="path" if cfg.eval_input else ("key" if cfg.split_key else "line"),
        split_key=cfg.split_key, eval_percent=cfg.eval_percent)
    return JobPlan(spec=spec, field_names=tuple(names), settings=settings, default_min_count=cfg.min_count,
                   binned=binned, numeric=numeric, num_bins=num_bins, base_bounds=base_bounds,
                   field_map_keyed=field_map_keyed, tables=tables, mode=mode, base=base,
                   base_vocabulary=base.vocabulary_file() if base else "")


def make_layout(kept, plan: JobPlan, bounds: dict, stats: dict, fields_seen, base_vocab) -> dict:
    """Field specs and vocabulary from the kept counts (runs once, on one worker)."""
    names = list(plan.field_names)
    if plan.mode != "fixed":
        names += sorted(set(fields_seen) - set(names))
    settings = {}
    for name in names:
        s = dict(plan.settings.get(name) or dict(kind="categorical", min_count=plan.default_min_count,
                                                 linear_only=False, source="log", multi_hot=False))
        if s["kind"] == "binned":
            s["bin_boundaries"] = tuple(plan.base_bounds.get(name, bounds.get(name, ())))
        if name in stats:
            s["value_stats"] = stats[name]
        settings[name] = s
    if plan.mode == "build":
        specs, vocab = feat.assign_vocabulary(kept, names, settings)
    elif plan.mode == "extend":
        specs, vocab = feat.extend_vocabulary(plan.base.fields, sorted(base_vocab, key=lambda e: e.index), kept,
                                              names, settings)
    else:
        specs, vocab = list(plan.base.fields), sorted(base_vocab, key=lambda e: e.index)
    return {"specs": specs, "vocab": vocab}


def _spec_dict(s: FieldSpec) -> dict:
    d = dataclasses.asdict(s)
    if d["bin_boundaries"] is not None:
        d["bin_boundaries"] = list(d["bin_boundaries"])
    d["extra_ranges"] = [list(r) for r in d["extra_ranges"]]
    return d


def _write_layout(layout, out):
    _write_text(os.path.join(out, VOCAB_FILENAME), "".join(f"{line}\n" for line in write_vocabulary_lines(layout["vocab"])))
    _write_text(os.path.join(out, META, "fields.json"), json.dumps([_spec_dict(s) for s in layout["specs"]]))
    return len(layout["vocab"])


def _write_stats(stats, out):
    _write_text(os.path.join(out, META, "stats.json"), json.dumps(stats, sort_keys=True))
    return stats


def _bin_count(kv, binned, base_bounds, bounds):
    """((field, value), n) of a binned field -> [((field, bin key), n)]."""
    (field, value), n = kv
    if field not in binned:
        return []
    edges = base_bounds.get(field, bounds.get(field, ()))
    return [((field, feat.bin_key(feat.bin_index(value, edges))), n)]


def _frequent_or_known(kv, min_counts, default, known):
    return kv[1] >= min_counts.get(kv[0][0], default) or kv[0] in known


def build_pipeline(p: beam.Pipeline, cfg: EtlConfig, keys: ExampleKeys = ExampleKeys()) -> None:
    """Adds the whole job to pipeline ``p`` (outputs under ``cfg.out``)."""
    plan = plan_job(cfg)
    out = cfg.out
    spec, count = plan.spec, plan.mode != "fixed"
    lines_kw = dict(binned=plan.binned, numeric=plan.numeric, count=count)

    # Dictionaries: side inputs, or PCollections for KeyedLookup.
    field_map = dictionaries.read_field_map(p, cfg.field_map) if cfg.format == "libfm" else None
    table_pcs = [dictionaries.read_entity_table(p, t, list(cols), values) for t, cols, values, _ in plan.tables]
    keyed_tables = [i for i, (*_, keyed) in enumerate(plan.tables) if keyed]
    side_tables = [beam.pvalue.AsDict(pc) for pc, (*_, keyed) in zip(table_pcs, plan.tables) if not keyed]
    table_modes_side = tuple(None if keyed else "side" for *_, keyed in plan.tables)
    fm_mode = None if field_map is None else ("found" if plan.field_map_keyed else "side")

    outputs = []  # tagged outputs of every LinesDoFn
    inputs = [(feat.TRAIN, cfg.input), (feat.EVAL, cfg.eval_input)] if cfg.eval_input else [(None, cfg.input)]
    pending = []
    for split, pattern in inputs:
        name = "" if split is None else SPLITS[split].title()
        lines = p | f"Read{name}" >> sources.ReadLineBatches(pattern)
        first_is_final = fm_mode != "found" and not keyed_tables
        side = []
        if fm_mode == "side":
            side.append(beam.pvalue.AsDict(field_map))
        tables_here = () if fm_mode == "found" else table_modes_side
        if tables_here:
            side += side_tables
        res = transforms.run_lines(lines, f"Lines{name}", transforms.LinesDoFn(
            spec, split, parse=True, field_map=fm_mode if fm_mode == "side" else None, tables=tables_here,
            final=first_is_final, **lines_kw), side)
        outputs.append(res)
        if not first_is_final:
            pending.append(res[transforms.PENDING])
    if pending:
        recs = pending | "FlattenPending" >> beam.Flatten()
        if fm_mode == "found":
            found = (recs, field_map) | "KeyedFieldMap" >> transforms.KeyedLookup(transforms.FeatureKeys(),
                                                                                 "KeyedFieldMap")
            res = transforms.run_lines(found, "LinesAfterFieldMap", transforms.LinesDoFn(
                spec, parse=False, field_map="found", tables=table_modes_side, final=not keyed_tables, **lines_kw),
                side_tables)
            outputs.append(res)
            recs = res[transforms.PENDING]
        if keyed_tables:
            entries = [table_pcs[i] | f"TableKey{i}" >> beam.Map(lambda kv, i: ((i, kv[0]), kv[1]), i)
                       for i in keyed_tables]
            table_dict = entries | "FlattenKeyedTables" >> beam.Flatten()
            request = transforms.EntityKeys([(i, plan.tables[i][0].key_field) for i in keyed_tables])
            found = (recs, table_dict) | "KeyedTables" >> transforms.KeyedLookup(request, "KeyedTables")
            modes = tuple("found" if i in keyed_tables else None for i in range(len(plan.tables)))
            outputs.append(transforms.run_lines(found, "LinesAfterTables", transforms.LinesDoFn(
                spec, parse=False, tables=modes, final=True, **lines_kw)))

    def gather(tag, label):
        return [o[tag] for o in outputs] | label >> beam.Flatten()

    records = {feat.TRAIN: gather(transforms.TRAIN, "TrainRecords"), feat.EVAL: gather(transforms.EVAL, "EvalRecords")}
    dead = [o[transforms.DEAD] for o in outputs]
    stats = [o[transforms.STATS] for o in outputs]

    # Vocabulary: counts and binned values summed per bundle, then per key.
    empty = p | "Empty" >> beam.Create([])
    bounds = value_stats = kept = fields_seen = base_vocab = empty
    if plan.mode != "build":
        base_vocab = (p | "ReadBaseVocabulary" >> beam.io.ReadFromText(plan.base_vocabulary, skip_header_lines=1)
                      | "ParseBaseVocabulary" >> beam.Map(parse_vocabulary_line))
    if count:
        values = gather(transforms.VALUES, "Values") | "SumValues" >> beam.CombinePerKey(sum)
        bounds = values | "Bins" >> transforms.ComputeBinBoundaries(plan.num_bins)
        value_stats = values | "ValueStats" >> transforms.ValueStats()
        bin_counts = values | "BinCounts" >> beam.FlatMap(_bin_count, plan.binned, plan.base_bounds,
                                                          beam.pvalue.AsDict(bounds))
        counts = ((gather(transforms.COUNTS, "Counts"), bin_counts) | "AllCounts" >> beam.Flatten()
                  | "SumCounts" >> beam.CombinePerKey(sum))
        fields_seen = counts | "FieldOf" >> beam.Map(lambda kv: kv[0][0]) | "Fields" >> beam.Distinct()
        # Only frequent features reach the one worker that builds the layout; when extending,
        # the counts of features already in the base vocabulary too (their counts add up).
        min_counts = {n: s["min_count"] for n, s in plan.settings.items()}
        known = base_vocab | "BaseKeys" >> beam.Map(lambda e: ((e.field, e.key), None))
        kept = counts | "Frequent" >> beam.Filter(_frequent_or_known, min_counts, plan.default_min_count,
                                                  beam.pvalue.AsDict(known))
    layout = (kept | "GatherCounts" >> beam.combiners.ToList()
              | "Layout" >> beam.Map(make_layout, plan, beam.pvalue.AsDict(bounds), beam.pvalue.AsDict(value_stats),
                                     beam.pvalue.AsList(fields_seen), beam.pvalue.AsList(base_vocab)))
    _ = layout | "WriteLayout" >> beam.Map(_write_layout, out)
    lookup = layout | "Lookup" >> beam.Map(lambda lay: feat.lookup_layout(lay["specs"], lay["vocab"]))

    # Pass 2, then every output file through one GroupByKey: TFRecord shards and dead letters.
    files = {}
    parts = []
    for split, recs in records.items():
        name = SPLITS[split]
        ex = transforms.to_examples(recs, f"Examples{name.title()}", split, cfg, lookup, keys)
        parts.append(ex.examples)
        dead.append(ex[transforms.DEAD])
        stats.append(ex[transforms.STATS])
        for shard in range(cfg.num_shards):
            files[(name, shard)] = (
                os.path.join(out, name, f"part-{shard:05d}-of-{cfg.num_shards:05d}{SHARD_SUFFIX}"), True, False)
        files[("dead_letter", name)] = (os.path.join(out, "dead_letter", f"{name}-00000-of-00001.jsonl"), False, True)
    parts.append(dead | "FlattenDead" >> beam.Flatten()
                 | "DeadByFile" >> beam.Map(lambda kv: (("dead_letter", SPLITS[kv[0]]), kv[1])))
    _ = parts | "AllFiles" >> beam.Flatten() | "WriteFiles" >> transforms.WriteFiles(files)
    _ = (stats | "FlattenStats" >> beam.Flatten()
         | "MergeStats" >> beam.CombineGlobally(transforms.MergeStats())
         | "WriteStats" >> beam.Map(_write_stats, out)
         | "PublishCounters" >> beam.ParDo(transforms.PublishCounters()))


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
    stats = json.loads(_read_text(os.path.join(out, META, "stats.json")))
    specs = []
    for d in json.loads(_read_text(os.path.join(out, META, "fields.json"))):
        d["bin_boundaries"] = tuple(d["bin_boundaries"]) if d["bin_boundaries"] is not None else None
        d["extra_ranges"] = tuple(tuple(r) for r in d["extra_ranges"])
        specs.append(FieldSpec(**d))
    written_train = stats.get("train.written", 0)
    labels = []
    for i, name in enumerate(cfg.labels):
        pos = stats.get(f"train.positives.{i}", 0)
        labels.append(LabelSpec(name=name, positive_rate=pos / written_train if written_train else 0.0,
                                positives=int(pos)))
    counts = {}
    for s in SPLITS:
        counts[s] = {k: int(stats.get(f"{s}.{k}", 0)) for k in ("read", "written", "dead_lettered")}
        prefix = f"{s}.dead."
        counts[s]["dead_letter_reasons"] = {k[len(prefix):]: int(v) for k, v in sorted(stats.items())
                                            if k.startswith(prefix)}
    splits = {s: {"files": [f"{s}/part-*{SHARD_SUFFIX}"], "examples": counts[s]["written"]} for s in SPLITS}
    base = load_base_schema(cfg.vocabulary) if cfg.vocabulary else None
    schema = Schema(
        fields=tuple(specs), labels=tuple(labels), num_features=sum(s.num_rows for s in specs),
        max_features_per_example=int(max(stats.get("train.max_features", 0), stats.get("eval.max_features", 0))),
        example_keys=keys, hash_function=HASH_FUNCTION, vocabulary_path=VOCAB_FILENAME, splits=splits,
        counts=counts, format=cfg.format,
        sources={"input": cfg.input, "eval_input": cfg.eval_input, "field_map": cfg.field_map,
                 "entity_tables": [t.path for t in cfg.entity_tables], "input_lines": int(stats.get("input.read", 0)),
                 "config": configs.to_dict(cfg)},
        vocabulary_mode=cfg.vocabulary_mode if base else "build", base_schema=cfg.vocabulary if base else "",
        base_num_features=base.num_features if base else 0, fill_missing=cfg.fill_missing,
        entity_tables=entity_table_specs(cfg, out),
        field_index=tuple(f.name for f in cfg.fields) if cfg.field_ids == "index" else ())
    _write_text(os.path.join(out, SCHEMA_FILENAME), schema.to_json())
    return dataclasses.replace(schema, base_dir=out if "://" in out else os.path.abspath(out))


def entity_table_specs(cfg: EtlConfig, out: str) -> tuple[EntityTableSpec, ...]:
    """The joined tables as the schema records them (absolute paths where the paths are local)."""
    specs = []
    for t in cfg.entity_tables:
        path = t.path if "://" in t.path else os.path.abspath(t.path)
        specs.append(EntityTableSpec(name=t.name, path=path, key_field=t.key_field,
                                     key_column=t.key_column or t.key_field,
                                     columns=tuple(dictionaries.table_columns(t))))
    return tuple(specs)


def _files_under(directory: str) -> list[str]:
    """Finished files of a directory (not the temporary files of failed write attempts)."""
    match = FileSystems.match([FileSystems.join(directory, "*")])[0].metadata_list
    return sorted(m.path for m in match if ".tmp-" not in m.path.rsplit("/", 1)[-1])


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


def parse_args(argv):
    p = argparse.ArgumentParser(description="libfm/libffm logs -> sparse TFRecords + feature schema "
                                            "(unknown flags go to Beam's PipelineOptions)")
    p.add_argument("--config", default="", help="YAML file of EtlConfig")
    for name in ("input", "eval_input", "format", "field_map", "labels", "out", "vocabulary"):
        p.add_argument(f"--{name}", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return p.parse_known_args(argv)


def run(argv=None) -> Schema:
    """Parses flags, runs the Beam job into a staging dir, publishes it, returns the schema."""
    args, beam_args = parse_args(argv)
    names = ("input", "eval_input", "format", "field_map", "labels", "out", "vocabulary")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) not in (None, "")}
    overrides = configs.deep_merge(overrides, configs.parse_overrides(args.set))
    cfg = load_config(args.config, overrides)
    if not cfg.input:
        raise SystemExit("etl: --input (INPUT=<glob>) is required")
    start = time.time()
    staging = FileSystems.join(cfg.out, f"{STAGING_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    p = beam.Pipeline(options=PipelineOptions(beam_args))
    build_pipeline(p, dataclasses.replace(cfg, out=staging))
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
    for s in SPLITS:
        c = schema.counts[s]
        total += c["read"]
        ok = c["read"] == c["written"] + c["dead_lettered"]
        reasons = ", ".join(f"{k} {v}" for k, v in c["dead_letter_reasons"].items()) or "none"
        print(f"etl: {s}: read {c['read']} = written {c['written']} + dead-lettered {c['dead_lettered']}"
              f" [{'ok' if ok else 'MISMATCH'}]; dead-letter reasons: {reasons}")
    lines = schema.sources["input_lines"]
    print(f"etl: input lines {lines} = train read + eval read {total} [{'ok' if lines == total else 'MISMATCH'}]")
    print(f"etl: {len(schema.fields)} fields ({', '.join(f.name for f in schema.fields)}), "
          f"{schema.num_features} feature rows, labels "
          + ", ".join(f"{lab.name} (train positive rate {lab.positive_rate:.4f})" for lab in schema.labels))
    rate = lines / elapsed if elapsed else 0.0
    print(f"etl: wrote {os.path.join(cfg.out, SCHEMA_FILENAME)} in {elapsed:.1f}s ({rate:.0f} lines/s)")


def main(argv=None) -> None:
    run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
