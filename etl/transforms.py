"""Composite Beam transforms of the ETL job.

Each transform wraps the pure functions of ``etl.parsing`` and ``etl.features``;
bad lines leave through the ``dead`` tagged output with their reason and raw bytes.
"""
from __future__ import annotations

import base64
import json

import apache_beam as beam
from apache_beam.metrics import Metrics

from etl import features as feat
from etl import parsing
from etl.parsing import ParseError

DEAD = "dead"
NAMESPACE = "etl"


def dead_letter(split: str, raw: bytes | str, reason: str, detail: str) -> str:
    """JSON dead-letter record: reason, readable line and the exact raw bytes."""
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    return json.dumps({
        "split": split,
        "reason": reason,
        "detail": detail,
        "line": data.decode("utf-8", "backslashreplace").rstrip("\r\n"),
        "line_b64": base64.b64encode(data).decode("ascii"),
    }, ensure_ascii=False)


class _ParseDoFn(beam.DoFn):
    def __init__(self, split, fmt, num_labels, max_features, known_fields, multi_hot, tables):
        self._split = split
        self._fmt = fmt
        self._num_labels = num_labels
        self._max_features = max_features
        self._known = known_fields
        self._multi_hot = multi_hot
        self._tables = tables  # [(key_field, numeric_columns)], aligned with the table side inputs
        self._read = Metrics.counter(NAMESPACE, f"{split}_read")
        self._ok = Metrics.counter(NAMESPACE, f"{split}_parsed")
        self._dead = Metrics.counter(NAMESPACE, f"{split}_dead_lettered")

    def process(self, raw, field_map=None, *tables):
        self._read.inc()
        try:
            parsed = parsing.parse_line(raw, self._fmt, self._num_labels, self._max_features)
            features = parsed.features
            if field_map is not None:
                features = parsing.assign_fields(features, field_map)
            parsing.check_fields(features, self._known, self._multi_hot)
            for (key_field, numeric), table in zip(self._tables, tables):
                features = feat.join_entity(features, key_field, table, numeric)
            if len(features) > self._max_features:
                raise ParseError(parsing.TOO_MANY_FEATURES,
                                 f"{len(features)} features after joins > max_features={self._max_features}")
        except ParseError as e:
            self._dead.inc()
            Metrics.counter(NAMESPACE, f"{self._split}_dead_{e.reason}").inc()
            yield beam.pvalue.TaggedOutput(DEAD, dead_letter(self._split, raw, e.reason, e.detail))
            return
        self._ok.inc()
        yield (parsed.labels, features)


class ParseLogs(beam.PTransform):
    """Raw lines -> (labels, features) with fields assigned and entity tables joined.

    Outputs a tuple-like result with ``main`` examples and ``dead`` JSON records.
    """

    def __init__(self, split, cfg, field_map=None, tables=()):
        super().__init__()
        self._split = split
        self._cfg = cfg
        self._field_map = field_map
        self._tables = tables  # [(EntityTableConfig, numeric_columns, side input PCollection)]

    def expand(self, lines):
        cfg = self._cfg
        known = frozenset(f.name for f in cfg.fields) if cfg.strict_fields else None
        multi_hot = frozenset(f.name for f in cfg.fields if f.multi_hot)
        table_meta = [(t.key_field, frozenset(numeric)) for t, numeric, _ in self._tables]
        side = [beam.pvalue.AsDict(self._field_map) if self._field_map is not None else None]
        side += [beam.pvalue.AsDict(pc) for _, _, pc in self._tables]
        return lines | "Parse" >> beam.ParDo(
            _ParseDoFn(self._split, cfg.format, len(cfg.labels), cfg.max_features, known, multi_hot, table_meta),
            *side).with_outputs(DEAD, main="examples")


class ComputeBinBoundaries(beam.PTransform):
    """Equal-frequency bin edges per binned field from approximate quantiles."""

    def __init__(self, num_bins: dict[str, int]):
        super().__init__()
        self._num_bins = num_bins

    def expand(self, examples):
        num_bins = self._num_bins
        if not num_bins:
            return examples.pipeline | "NoBins" >> beam.Create([])
        max_bins = max(num_bins.values())
        values = examples | "BinnedValues" >> beam.FlatMap(
            lambda ex: [(f.field, f.value) for f in ex[1] if f.field in num_bins])
        quantiles = values | "Quantiles" >> beam.transforms.stats.ApproximateQuantiles.PerKey(
            num_quantiles=max_bins + 1)

        def edges(kv):
            field, qs = kv
            n = num_bins[field]
            if n != max_bins:  # resample the finer quantile grid to this field's bin count
                qs = [qs[round(i * (len(qs) - 1) / n)] for i in range(n + 1)]
            return field, feat.boundaries_from_quantiles(qs, n)

        return quantiles | "Edges" >> beam.Map(edges)


class CountFeatures(beam.PTransform):
    """((field, key), count) over the training examples."""

    def expand(self, examples):
        return (examples
                | "Keys" >> beam.FlatMap(lambda ex: [((f.field, f.key), 1) for f in ex[1]])
                | "Sum" >> beam.CombinePerKey(sum))


def _build_layout(counts, field_names, settings, bounds):
    settings = {name: dict(s, bin_boundaries=tuple(bounds[name]) if name in bounds else None)
                for name, s in settings.items()}
    seen = sorted({field for (field, _), _ in counts} - set(field_names))
    names = list(field_names) + seen
    for name in seen:
        settings[name] = dict(kind="categorical", min_count=settings["__default__"]["min_count"],
                              linear_only=False, bin_boundaries=None, source="log", multi_hot=False)
    specs, vocab = feat.assign_vocabulary(counts, names, settings)
    return {"specs": specs, "vocab": vocab,
            # Indexes built once here, not per element in the DoFns that read the layout.
            "field_ids": {s.name: s.id for s in specs},
            "rare_ids": [s.rare_id for s in specs],
            "lookup": {v.hash: v.index for v in vocab}}


class BuildLayout(beam.PTransform):
    """Training counts -> one dict with field specs and vocabulary (a singleton)."""

    def __init__(self, field_names, settings, bounds):
        super().__init__()
        self._field_names = field_names
        self._settings = settings
        self._bounds = bounds

    def expand(self, counts):
        return (counts
                | "Gather" >> beam.combiners.ToList()
                | "Assign" >> beam.Map(_build_layout, self._field_names, self._settings,
                                       beam.pvalue.AsDict(self._bounds)))


class _ToExampleDoFn(beam.DoFn):
    def __init__(self, split, label_names, keys, fill_missing):
        self._split = split
        self._labels = label_names
        self._keys = keys
        self._fill = fill_missing
        self._written = Metrics.counter(NAMESPACE, f"{split}_written")
        self._dead = Metrics.counter(NAMESPACE, f"{split}_dead_lettered")

    def process(self, ex, layout, bounds):
        labels, features = ex
        try:
            features = feat.apply_bins(features, bounds)
            sparse = feat.to_sparse_example(labels, features, layout["field_ids"], layout["rare_ids"],
                                            layout["lookup"], self._fill)
        except ParseError as e:  # a field first seen outside the training split
            self._dead.inc()
            raw = " ".join([",".join(str(int(v)) for v in labels)] + [f"{f.field}:{f.key}:{f.value}" for f in features])
            yield beam.pvalue.TaggedOutput(DEAD, dead_letter(self._split, raw, e.reason, e.detail))
            return
        self._written.inc()
        yield sparse


class ToExamples(beam.PTransform):
    """(labels, features) -> SparseExample rows via the vocabulary (unknown -> rare)."""

    def __init__(self, split, cfg, layout, bounds, keys):
        super().__init__()
        self._split, self._cfg, self._layout, self._bounds, self._keys = split, cfg, layout, bounds, keys

    def expand(self, examples):
        return examples | "Map" >> beam.ParDo(
            _ToExampleDoFn(self._split, self._cfg.labels, self._keys, self._cfg.fill_missing),
            beam.pvalue.AsSingleton(self._layout), beam.pvalue.AsDict(self._bounds)).with_outputs(DEAD, main="rows")
