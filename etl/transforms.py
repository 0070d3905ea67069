"""Composite Beam transforms of the ETL job.

Each DoFn wraps the pure functions of ``etl.parsing`` and ``etl.features``.
Two rules keep the job fast on the Python runners:

* Records are plain tuples of str/float/bytes, which Beam's default coder
  encodes without pickling (frozen dataclasses cost ~20x more per element).
* Per-line work is fused into one DoFn per pass where the joins allow, and
  what is summed over lines (feature counts, binned values, line counts) is
  summed per bundle inside that DoFn and emitted once per bundle, instead of
  one element per feature or per line through extra transforms.
* Between the passes records travel in batches (lists of ``BATCH_SIZE``), and
  pass 2 emits one blob of framed TFRecords per batch, so the per-element
  costs of the runner (encoding at fusion breaks, side-input lookup, the
  shuffle into shards) are paid per batch, not per line.

Bad lines leave through the ``dead`` output as ``(split, JSON record)``.
"""
from __future__ import annotations

import base64
import json
import random
import uuid

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from etl import features as feat
from etl import tfrecord
from etl.parsing import ParseError

NAMESPACE = "etl"
SPLIT_NAMES = ("train", "eval")
# Output tags of the line DoFns.
TRAIN, EVAL, PENDING, DEAD, COUNTS, VALUES, STATS = "train", "eval", "pending", "dead", "counts", "values", "stats"
# Distinct keys summed in memory per bundle before they are emitted early.
_FLUSH_AT = 200_000
# Records per batch between pass 1 and pass 2.
BATCH_SIZE = 500


def dead_letter(split: str, raw: bytes | str, reason: str, detail: str) -> str:
    """JSON dead-letter record: split, reason, detail, readable line and the exact raw bytes."""
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    return json.dumps({
        "split": split,
        "reason": reason,
        "detail": detail,
        "line": data.decode("utf-8", "backslashreplace").rstrip("\r\n"),
        "line_b64": base64.b64encode(data).decode("ascii"),
    }, ensure_ascii=False)


def _add(d: dict, key, n=1) -> None:
    d[key] = d.get(key, 0) + n


class _BundleSums:
    """Sums kept per bundle and emitted, per output tag, at the bundle's end."""

    def __init__(self, tags):
        self._tags = tags
        self.sums = {t: {} for t in tags}

    def drain(self, tag):
        items, self.sums[tag] = self.sums[tag], {}
        return items

    def emit_all(self):
        for tag in self._tags:
            items = self.drain(tag)
            if tag == STATS:
                if items:
                    yield beam.pvalue.TaggedOutput(tag, GlobalWindows.windowed_value(items))
            else:
                for kv in items.items():
                    yield beam.pvalue.TaggedOutput(tag, GlobalWindows.windowed_value(kv))


class _FoundTable:
    """``.get(key)`` view of one table's rows in a KeyedLookup result keyed by (table, key)."""

    __slots__ = ("_found", "_index")

    def __init__(self, found, index):
        self._found, self._index = found, index

    def get(self, key):
        return self._found.get((self._index, key))


class LinesDoFn(beam.DoFn):
    """Pass 1 over lines: parse, join dictionaries, check, split, and sum for the vocabulary.

    Input: batches (lists) of raw lines (``sources.ReadLineBatches``), or
    ``(record, found)`` pairs after a ``KeyedLookup``. A keyed join splits the work into several instances: one that parses and
    emits ``pending`` records ``(line id, (raw, split, labels, features))``
    for ``KeyedLookup``, and one per lookup that takes ``(record, found)``.
    The last (``final``) instance emits lists of records ``(raw, labels,
    features)`` to ``train``/``eval``, and per bundle: ``counts`` ((field,
    key), n) and ``values`` ((field, value), n) of the training split, and
    ``stats``.

    Args:
      spec: the ``features.LineSpec``.
      source_split: 0/1 when the input file decides the split, else None.
      parse: input elements are raw lines (else ``(record, found)`` pairs).
      field_map: ``None``, ``"side"`` (first side input) or ``"found"``.
      tables: per entity table ``None`` (not in this step), ``"side"`` (next
        side input) or ``"found"``.
      final: run the checks and emit records by split (else ``pending``).
      binned, numeric: value fields; their values are summed for bins/stats.
      count: sum counts and values (False when a fixed vocabulary is reused).
    """

    def __init__(self, spec, source_split=None, parse=True, field_map=None, tables=(), final=True,
                 binned=frozenset(), numeric=frozenset(), count=True):
        self._spec = spec
        self._source_split = source_split
        self._parse = parse
        self._field_map = field_map
        self._tables = tuple(tables)
        self._final = final
        self._binned = frozenset(binned)
        self._numeric = frozenset(numeric)
        self._count = count

    def setup(self):
        self._proc = feat.LineProcessor(self._spec)
        # Split known at read time: by input file, or by the hash of the raw line.
        self._early_split = self._parse and (self._source_split is not None or self._spec.split == "line")

    def start_bundle(self):
        self._sums = _BundleSums((COUNTS, VALUES, STATS))
        self._batches = [[], []]
        self._id_prefix = uuid.uuid4().hex[:16]
        self._next_id = 0

    def process(self, element, *side):
        out = []
        if self._parse:  # a batch of raw lines
            for raw in element:
                self._line(raw, -1, None, None, None, side, out)
        else:  # (pending record, found dictionary values)
            (raw, split, labels, features), found = element
            self._line(raw, split, labels, features, found, side, out)
        return out

    def _line(self, raw, split, labels, features, found, side, out):
        """Processes one line; appends what it emits to ``out``."""
        stats = self._sums.sums[STATS]
        proc = self._proc
        if self._parse:
            stats["input.read"] = stats.get("input.read", 0) + 1
            if self._early_split:
                split = self._source_split if self._source_split is not None else proc.split_of(raw)
                _add(stats, f"{SPLIT_NAMES[split]}.read")
        try:
            if self._parse:
                labels, features = proc.parse(raw)
            s = 0
            if self._field_map == "side":
                features = proc.assign(features, side[0])
                s = 1
            elif self._field_map == "found":
                features = proc.assign(features, found)
            for i, mode in enumerate(self._tables):
                if mode == "side":
                    features = proc.join(features, i, side[s])
                    s += 1
                elif mode == "found":
                    features = proc.join(features, i, _FoundTable(found, i))
            if self._final:
                features = proc.finish(features)
        except ParseError as e:
            if split < 0:
                split = proc.split_of(raw)
                _add(stats, f"{SPLIT_NAMES[split]}.read")
            name = SPLIT_NAMES[split]
            _add(stats, f"{name}.dead_lettered")
            _add(stats, f"{name}.dead.{e.reason}")
            out.append(beam.pvalue.TaggedOutput(DEAD, (split, dead_letter(name, raw, e.reason, e.detail))))
            return
        if not self._final:
            self._next_id += 1
            out.append((f"{self._id_prefix}{self._next_id}", (raw, split, labels, tuple(features))))
            return
        if split < 0:
            split = proc.split_of(raw, features)
            _add(stats, f"{SPLIT_NAMES[split]}.read")
        if split == feat.TRAIN and self._count:
            self._sum(features)
            if len(self._sums.sums[COUNTS]) >= _FLUSH_AT or len(self._sums.sums[VALUES]) >= _FLUSH_AT:
                for tag in (COUNTS, VALUES):  # bound the memory of huge bundles
                    out.extend(beam.pvalue.TaggedOutput(tag, kv) for kv in self._sums.drain(tag).items())
        batch = self._batches[split]
        batch.append((raw, labels, features))
        if len(batch) >= BATCH_SIZE:
            out.append(beam.pvalue.TaggedOutput(SPLIT_NAMES[split], batch))
            self._batches[split] = []

    def _sum(self, features):
        counts, values = self._sums.sums[COUNTS], self._sums.sums[VALUES]
        binned, numeric = self._binned, self._numeric
        for f in features:
            field = f[0]
            if field in binned:
                k = (field, f[2])
                values[k] = values.get(k, 0) + 1
                continue
            if field in numeric:
                k = (field, f[2])
                values[k] = values.get(k, 0) + 1
            k = (field, f[1])
            counts[k] = counts.get(k, 0) + 1

    def finish_bundle(self):
        for split, batch in enumerate(self._batches):
            if batch:
                yield beam.pvalue.TaggedOutput(SPLIT_NAMES[split], GlobalWindows.windowed_value(batch))
        yield from self._sums.emit_all()


def run_lines(lines, label, dofn, side_inputs=()):
    """Applies a ``LinesDoFn``; returns its tagged outputs."""
    return lines | label >> beam.ParDo(dofn, *side_inputs).with_outputs(
        TRAIN, EVAL, DEAD, COUNTS, VALUES, STATS, main=PENDING)


class FeatureKeys:
    """Lookup keys of a record for the field map: its features' keys."""

    def __call__(self, rec):
        return {f[1] for f in rec[3]}


class EntityKeys:
    """Lookup keys of a record for keyed entity tables: (table index, key of its key field)."""

    def __init__(self, key_fields):
        self._key_fields = tuple(key_fields)  # ((table index, key field), ...)

    def __call__(self, rec):
        return {(i, f[1]) for i, key_field in self._key_fields for f in rec[3] if f[0] == key_field}


def _answer(kv):
    key, grouped = kv
    values = list(grouped["dict"])
    if not values:
        return
    # Dictionary keys should be unique; if not, one value wins deterministically.
    value = values[0] if len(values) == 1 else min(values, key=repr)
    for line_id in grouped["req"]:
        yield line_id, (key, value)


def _reassemble(kv):
    _, grouped = kv
    for rec in grouped["rec"]:
        yield rec, dict(grouped["ans"])


class KeyedLookup(beam.PTransform):
    """Joins records with a dictionary by key, for dictionaries too big for a side input.

    Input: ``(pending, dictionary)``, pending = ``(line id, record)`` and
    dictionary = ``(key, value)``. Each record asks for the keys
    ``request(record)``; a first CoGroupByKey meets requests and dictionary
    entries by key, a second one gathers the answers by line id. Output:
    ``(record, {key: value})`` with the keys found (missing keys are absent).
    """

    def __init__(self, request, label):
        super().__init__(label)
        self._request = request

    def expand(self, pcolls):
        pending, dictionary = pcolls
        request = self._request
        requests = pending | "Requests" >> beam.FlatMap(lambda kv: [(k, kv[0]) for k in request(kv[1])])
        answers = ({"dict": dictionary, "req": requests} | "CoGroupByKey" >> beam.CoGroupByKey()
                   | "Answer" >> beam.FlatMap(_answer))
        return ({"rec": pending, "ans": answers} | "GatherByLine" >> beam.CoGroupByKey()
                | "Reassemble" >> beam.FlatMap(_reassemble))


class ComputeBinBoundaries(beam.PTransform):
    """Equal-frequency bin edges per field from weighted approximate quantiles.

    Input: ((field, value), count) of the training split (per-bundle sums, any
    multiplicity). Output: (field, edges) for the fields in ``num_bins``.
    """

    def __init__(self, num_bins: dict[str, int]):
        super().__init__()
        self._num_bins = dict(num_bins)

    def expand(self, values):
        num_bins = self._num_bins
        if not num_bins:
            return values.pipeline | "NoBins" >> beam.Create([])
        max_bins = max(num_bins.values())
        weighted = values | "Weighted" >> beam.FlatMap(
            lambda kv: [(kv[0][0], (kv[0][1], kv[1]))] if kv[0][0] in num_bins else [])
        quantiles = weighted | "Quantiles" >> beam.transforms.stats.ApproximateQuantiles.PerKey(
            num_quantiles=max_bins + 1, weighted=True)
        return quantiles | "Edges" >> beam.Map(
            lambda kv: (kv[0], feat.boundaries_from_quantiles(feat.resample_quantiles(kv[1], num_bins[kv[0]]),
                                                               num_bins[kv[0]])))


class _ValueStatsFn(beam.CombineFn):
    def create_accumulator(self):
        return (0.0, 0.0, 0.0, float("inf"), float("-inf"))

    def add_input(self, acc, vw):
        v, w = vw
        return (acc[0] + w, acc[1] + w * v, acc[2] + w * v * v, min(acc[3], v), max(acc[4], v))

    def merge_accumulators(self, accs):
        accs = list(accs)
        return (sum(a[0] for a in accs), sum(a[1] for a in accs), sum(a[2] for a in accs),
                min(a[3] for a in accs), max(a[4] for a in accs))

    def extract_output(self, acc):
        return feat.value_stats(*acc)


class ValueStats(beam.PTransform):
    """((field, value), count) -> (field, {count, mean, std, min, max})."""

    def expand(self, values):
        return (values | "ByField" >> beam.Map(lambda kv: (kv[0][0], (kv[0][1], kv[1])))
                | "Stats" >> beam.CombinePerKey(_ValueStatsFn()))


class MergeStats(beam.CombineFn):
    """Per-bundle stats dicts -> one dict (``*.max_features`` by max, the rest summed)."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, d):
        for k, v in d.items():
            acc[k] = max(acc.get(k, 0), v) if k.endswith(".max_features") else acc.get(k, 0) + v
        return acc

    def merge_accumulators(self, accs):
        out = {}
        for a in accs:
            self.add_input(out, a)
        return out

    def extract_output(self, acc):
        return acc


class ExamplesDoFn(beam.DoFn):
    """Pass 2: batches of records -> framed `tf.train.Example`s through the vocabulary (a side input).

    Outputs ``((split name, shard), blob)``: one blob of concatenated
    TFRecords per batch, dealt to the shards round-robin from a random shard
    per bundle; ``dead`` (a field the schema does not have) and per bundle
    ``stats`` (written, positives per label, max features).
    """

    def __init__(self, split: int, label_names, keys, fill_missing: bool, num_shards: int):
        self._split = split
        self._name = SPLIT_NAMES[split]
        self._labels = tuple(label_names)
        self._keys = keys
        self._fill = fill_missing
        self._shards = num_shards

    def setup(self):
        self._encoder = tfrecord.ExampleEncoder(self._labels, self._keys)

    def start_bundle(self):
        self._stats = {}
        self._max = 0
        self._positives = [0.0] * len(self._labels)
        self._shard = random.randrange(self._shards)

    def process(self, batch, layout):
        out = []
        positives, encode, frame = self._positives, self._encoder.encode, tfrecord.frame
        for raw, labels, features in batch:
            try:
                hashes, vals, fhs = feat.record_lists(features, layout["fields"])
            except ParseError as e:
                _add(self._stats, f"{self._name}.dead_lettered")
                _add(self._stats, f"{self._name}.dead.{e.reason}")
                yield beam.pvalue.TaggedOutput(DEAD, (self._split, dead_letter(self._name, raw, e.reason, e.detail)))
                continue
            if len(hashes) > self._max:
                self._max = len(hashes)
            for i, v in enumerate(labels):
                positives[i] += v
            out.append(frame(encode(hashes, vals, fhs, labels)))
        if out:
            _add(self._stats, f"{self._name}.written", len(out))
            self._shard = (self._shard + 1) % self._shards
            yield (self._name, self._shard), b"".join(out)

    def finish_bundle(self):
        stats = self._stats
        if stats:
            stats[f"{self._name}.max_features"] = self._max
            for i, v in enumerate(self._positives):
                stats[f"{self._name}.positives.{i}"] = v
            yield beam.pvalue.TaggedOutput(STATS, GlobalWindows.windowed_value(stats))


def to_examples(records, label, split, cfg, layout, keys):
    """Applies ``ExamplesDoFn`` with the lookup layout as a singleton side input."""
    return records | label >> beam.ParDo(
        ExamplesDoFn(split, cfg.labels, keys, cfg.fill_missing, cfg.num_shards),
        beam.pvalue.AsSingleton(layout)).with_outputs(DEAD, STATS, main="examples")


class _WriteFileFn(beam.DoFn):
    def __init__(self, files):
        self._files = files

    def process(self, kv):
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        key, parts = kv
        path, gzip, lines = self._files[key]
        # Written under a temporary name and renamed: a retried or crashed
        # attempt never leaves a partial file under the final name.
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        compression = CompressionTypes.GZIP if gzip else CompressionTypes.UNCOMPRESSED
        with FileSystems.create(tmp, compression_type=compression) as f:
            for part in parts:
                if part is None:  # the seed that makes every file exist
                    continue
                f.write(part.encode("utf-8") + b"\n" if lines else part)
        FileSystems.rename([tmp], [path])
        yield path


class WriteFiles(beam.PTransform):
    """``(file key, part)`` -> one file per key of ``files``, all through one GroupByKey.

    ``files`` maps a key to ``(path, gzip, lines)``: the parts of a key are
    written to ``path``, gzip-compressed or not, as raw bytes or as text lines.
    Every key gets its file, empty if no part arrived (a seed ``None`` per
    key), as Beam's file sinks do for a fixed number of shards.
    """

    def __init__(self, files: dict):
        super().__init__()
        self._files = dict(files)

    def expand(self, parts):
        seeds = parts.pipeline | "Seeds" >> beam.Create([(k, None) for k in self._files])
        return ((parts, seeds) | "WithSeeds" >> beam.Flatten() | "ByFile" >> beam.GroupByKey()
                | "Write" >> beam.ParDo(_WriteFileFn(self._files)))


class PublishCounters(beam.DoFn):
    """Reports the job's final sums as Beam counters (namespace ``etl``).

    The sums come from the stats PCollection, so the counters are exact on
    every runner. (Counters incremented inside a DoFn that has a side input
    were lost by the BundleBasedDirectRunner: it records them into a metrics
    container it never commits.)
    """

    def process(self, stats):
        for name, value in sorted(stats.items()):
            if not name.endswith(".max_features"):
                Metrics.counter(NAMESPACE, name).inc(int(value))
        yield stats
