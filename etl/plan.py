"""Decisions the launcher takes before the graph is built, and the layout built from the counts.

``plan_job`` reads dictionary headers and sizes and the base schema of a vocabulary reuse, and
decides joins, fields, kinds and splits. ``make_layout`` turns the job's training counts, bin
edges and value statistics into the field specs and the vocabulary (it runs once, on one
worker, on the features that keep a row). No pipeline here: ``etl.transforms`` applies both.
"""
from __future__ import annotations

import dataclasses
import json

from apache_beam.io.filesystems import FileSystems

from etl import dictionaries
from etl import features as feat
from etl.config import EtlConfig
from feature_schema import SCHEMA_FILENAME, Schema


@dataclasses.dataclass(frozen=True)
class JobPlan:
    """Decisions taken on the launcher before the graph is built.

    Attributes:
      spec: what the line DoFns need (``features.LineSpec``).
      field_names: fields known before reading the logs, in schema order:
        base fields, declared fields, field-map order, table columns (fields
        first seen in the data, in any split, follow sorted when the layout is built).
      settings: field -> dict(kind, min_count, linear_only, source, multi_hot, transform).
      default_min_count: min_count of fields first seen in the data.
      binned, numeric: value fields by kind.
      num_bins: binned fields whose edges this run computes -> number of bins.
      base_bounds: binned fields whose edges come from the base schema.
      transforms: numeric field -> ``transform`` (the statistics are of transformed values).
      field_map_keyed: the field map is joined by key (else as a side input).
      tables: (table config, columns, value columns, joined by key) per entity table.
      splits: the split names written (``train``, ``eval`` and maybe ``valid``).
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
    transforms: dict
    field_map_keyed: bool
    tables: tuple
    splits: tuple[str, ...] = ("train", "eval")
    mode: str = "build"
    base: Schema | None = None
    base_vocabulary: str = ""

    @property
    def min_counts(self) -> dict[str, int]:
        return {n: s["min_count"] for n, s in self.settings.items()}


def read_text(path: str) -> str:
    with FileSystems.open(path) as f:
        return f.read().decode("utf-8")


def load_base_schema(path: str) -> Schema:
    """The schema of an earlier run (its output directory or its schema.json; any Beam filesystem)."""
    if not path.endswith(".json"):
        path = FileSystems.join(path, SCHEMA_FILENAME)
    if not FileSystems.exists(path):
        raise FileNotFoundError(f"vocabulary: no schema at {path}")
    base_dir = path.rsplit("/", 1)[0] if "/" in path else "."
    return Schema.from_json_dict(json.loads(read_text(path)), base_dir=base_dir)


def _split_mode(cfg: EtlConfig) -> str:
    if cfg.eval_input:
        return "path"
    return "key" if cfg.split_key else "line"


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
                                  source=b.source, multi_hot=b.multi_hot, transform=b.transform)
        else:
            settings[name] = dict(kind=fc.kind, min_count=cfg.min_count_of(name), linear_only=fc.linear_only,
                                  source=sources.get(name, "log"), multi_hot=fc.multi_hot, transform=fc.transform)
    # Value columns of the tables are known from the config even if a fixed base lacks them.
    kinds = {name: s["kind"] for name, s in settings.items()}
    for f in cfg.fields:
        kinds.setdefault(f.name, f.kind)
    binned = frozenset(n for n, k in kinds.items() if k == "binned")
    numeric = frozenset(n for n, k in kinds.items() if k == "numeric")
    base_bounds = {n: tuple(base_specs[n].bin_boundaries or ()) for n in binned if n in base_specs}
    num_bins = {n: cfg.field_config(n).num_bins for n in binned if n not in base_bounds and n in settings}
    transforms = {n: settings[n]["transform"] if n in settings else cfg.field_config(n).transform for n in numeric}
    tables = tuple((t, cols, frozenset(c for c in cols if c in binned | numeric), keyed) for t, cols, keyed in tables)
    if mode == "fixed":  # fields the base lacks are dead-lettered at parse time
        known = frozenset(base_specs)
    elif cfg.strict_fields:
        known = frozenset(declared | set(sources) | set(base_specs))
    else:
        known = None
    spec = feat.LineSpec(
        fmt=cfg.format, num_labels=len(cfg.labels), max_features=cfg.max_features,
        field_index=tuple(f.name for f in cfg.fields) if cfg.field_ids == "index" else None,
        known_fields=known,
        multi_hot=frozenset(n for n in names if settings[n]["multi_hot"]) | {f.name for f in cfg.fields if f.multi_hot},
        value_fields=binned | numeric, table_keys=tuple(t.key_field for t, *_ in tables),
        table_columns=tuple(cols for _, cols, *_ in tables),
        split=_split_mode(cfg), split_key=cfg.split_key, eval_percent=cfg.eval_percent,
        valid_per_10k=round(cfg.valid_fraction * 10000))
    return JobPlan(spec=spec, field_names=tuple(names), settings=settings, default_min_count=cfg.min_count,
                   binned=binned, numeric=numeric, num_bins=num_bins, base_bounds=base_bounds, transforms=transforms,
                   field_map_keyed=field_map_keyed, tables=tables, splits=cfg.split_names, mode=mode, base=base,
                   base_vocabulary=base.vocabulary_file() if base else "")


def _default_settings(plan: JobPlan) -> dict:
    return dict(kind="categorical", min_count=plan.default_min_count, linear_only=False, source="log",
                multi_hot=False, transform="none")


def make_layout(kept, plan: JobPlan, bounds: dict, stats: dict, fields_seen, base_vocab, totals: dict) -> dict:
    """Field specs, vocabulary and per-field usage from the kept counts (runs once, on one worker).

    Args:
      kept: ((field, key), training count) of every feature that keeps (or, reusing a
        vocabulary, has) a row of its own.
      plan: the job plan.
      bounds: binned field -> edges computed by this run.
      stats: value field -> ``value_stats``.
      fields_seen: fields in any split's records.
      base_vocab: the base vocabulary's entries (fixed/extend).
      totals: ``("occurrences", field)`` and, for multi-hot fields, ``("lines", field)`` ->
        training count.

    Returns:
      {"specs": [FieldSpec], "vocab": [VocabEntry], "usage": ``features.field_usage``}.
    """
    names = list(plan.field_names)
    if plan.mode != "fixed":
        names += sorted(set(fields_seen) - set(names))
    settings = {}
    for name in names:
        s = dict(plan.settings.get(name) or _default_settings(plan))
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
    occurrences = {f: n for (what, f), n in totals.items() if what == "occurrences"}
    lines = {f: n for (what, f), n in totals.items() if what == "lines"}
    usage = feat.field_usage(specs, vocab, dict(kept), occurrences, lines)
    return {"specs": specs, "vocab": vocab, "usage": usage}
