"""Composite Beam transforms of the ETL job: ``ParseAndJoin``, ``Statistics``, ``WriteRecords``,
``WriteDeadLetters`` and ``Report`` (``etl.pipeline.build_pipeline`` wires them).

Records stream: each input file is read, parsed, joined, checked, split, encoded and written
by DoFns that Beam fuses into one stage, with no GroupByKey and no side input computed from
the data on the way (side inputs are dictionaries only). What the job learns from the data,
feature counts, bin edges and value statistics, comes from combiners whose outputs feed only
``vocabulary.tsv``, ``_meta/`` and ``schema.json``. The one exception: a dictionary larger
than ``side_input_max_bytes`` is joined by key (``KeyedLookup``, two CoGroupByKeys), which
shuffles the records of that input.

Rules that keep the job fast on the Python runners:

* Records are plain tuples of str/float/bytes, which Beam's default coder encodes without
  pickling, and travel in lists of up to ``BATCH_SIZE`` (one element per input batch), so
  per-element runner costs are paid per batch.
* What is summed over lines (feature counts, values, line counts) is summed per bundle in a
  dict and emitted once per bundle (or when the dict grows past ``_FLUSH_AT`` keys); feature
  counts as ``COUNT_SHARDS`` dicts, not one element per feature.
* Files are written by the DoFns themselves: no shuffle into shards.

Bad lines leave through the ``dead`` output as ``(split, JSON record)``.
"""
from __future__ import annotations

import base64
import bisect
import collections
import concurrent.futures
import dataclasses
import heapq
import itertools
import json
import uuid
import zlib

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.stats import ApproximateQuantilesCombineFn
from apache_beam.transforms.window import GlobalWindows

from etl import features as feat
from etl import sources, tfrecord
from etl.config import SPLIT_NAMES
from etl.parsing import ParseError
from etl.plan import JobPlan, make_layout
from feature_schema import VOCAB_FILENAME, parse_vocabulary_line, write_vocabulary_lines
from feature_schema.rules import bin_index, bin_key, to_float32, transform_value

NAMESPACE = "etl"
META = "_meta"
SHARD_SUFFIX = ".tfrecord.gz"
DEAD_SUFFIX = ".jsonl"
TMP = "_tmp"
# Output tags.
RECORDS, PENDING, DEAD, STATS = "records", "pending", "dead", "stats"
COUNTS, VALUES, TOTALS = "counts", "values", "totals"
# Distinct feature tuples counted in memory per bundle before they are emitted early.
_FLUSH_AT = 100_000
# Records per element between the DoFns.
BATCH_SIZE = 500
# gzip level of the TFRecord shards: on the generated records level 3 wrote 8% more bytes than
# level 6 in half the time; decompression costs the same.
GZIP_LEVEL = 3


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


def shard_path(out: str, split: str, index: int, total: int) -> str:
    return FileSystems.join(out, split, f"part-{index:05d}-of-{total:05d}{SHARD_SUFFIX}")


def dead_letter_path(out: str, split: str, index: int, total: int) -> str:
    return FileSystems.join(out, "dead_letter", f"{split}-{index:05d}-of-{total:05d}{DEAD_SUFFIX}")


def _add(d: dict, key, n=1) -> None:
    d[key] = d.get(key, 0) + n


def _windowed(value):
    return GlobalWindows.windowed_value(value)


# ---------------------------------------------------------------- plumbing

class _ConcatFn(beam.CombineFn):
    def create_accumulator(self):
        return []

    def add_input(self, acc, items):
        acc.extend(items)
        return acc

    def merge_accumulators(self, accs):
        return list(itertools.chain.from_iterable(accs))

    def extract_output(self, acc):
        return acc


class Gather(beam.PTransform):
    """All elements of a (small) PCollection as one list, an empty list when there are none.

    ``beam.combiners.ToList()`` makes its empty default through a side input of the result,
    which the SDK's state cache then measures object by object; a keyed combine with a seed
    element makes the same list on the main path.
    """

    def expand(self, pcoll):
        seed = pcoll.pipeline | "Seed" >> beam.Impulse() | "SeedKey" >> beam.Map(lambda _: (0, ()))
        return ((pcoll | "Key" >> beam.Map(lambda x: (0, (x,))), seed) | "WithSeed" >> beam.Flatten()
                | "Concat" >> beam.CombinePerKey(_ConcatFn()) | "List" >> beam.Map(lambda kv: kv[1]))


def union(pcolls, label: str):
    """PCollections as one: the only one as it is (a Flatten would be a stage of its own on the
    portable runners), else their ``Flatten``."""
    pcolls = tuple(pcolls)
    return pcolls[0] if len(pcolls) == 1 else pcolls | label >> beam.Flatten()


def _call(_, fn, *args, **kwargs):
    return fn(*args, **kwargs)


class Once(beam.PTransform):
    """Calls ``fn(*args, **kwargs)`` once, on one worker, after its side-input arguments are complete.

    Beam's own ``WriteImpl`` finalizes files this way. For small PCollections (file names,
    per-bundle stats) passed as ``AsList`` this is one stage on the in-process runner, where a
    ``Gather`` (seed, flatten, combine) is three. Apply to the pipeline; returns a PCollection
    of ``fn``'s one result.
    """

    def __init__(self, fn, *args, **kwargs):
        super().__init__()
        self._fn = fn
        self._args = args
        self._kwargs = kwargs

    def expand(self, pbegin):
        return pbegin | "Impulse" >> beam.Impulse() | "Call" >> beam.Map(_call, self._fn, *self._args, **self._kwargs)


def pack(pairs, label: str):
    """One element: (token, the dict of a PCollection of (key, value) pairs as one blob), a side input.

    Keys should be unique; with duplicates one of them wins. The token names this pack so that
    every DoFn of a worker process shares one decoded dict (``Unpacked``). The blob is JSON: a
    dictionary's keys are strings and its values strings or rows of cells (strings, floats, None;
    ``features.table_row``), which decode to lists, as ``features.join_entity`` reads them; JSON
    builds values without running any code, unlike pickle.
    """
    return pairs | f"Gather{label}" >> Gather() | f"Pack{label}" >> beam.Map(packed)


def packed(pairs) -> tuple[str, bytes]:
    """``pack``'s element of (key, value) pairs; given to a ``ParDo`` as is, it travels inside the job."""
    return uuid.uuid4().hex, json.dumps(dict(pairs)).encode("utf-8")


def side_input(dictionary):
    """A ``pack`` PCollection as a singleton side input; an inline ``packed`` element as it is."""
    return dictionary if isinstance(dictionary, tuple) else beam.pvalue.AsSingleton(dictionary)


# Token -> dict of the packs decoded in this process, the latest few (a job has one per dictionary).
_UNPACKED: collections.OrderedDict = collections.OrderedDict()
_UNPACKED_KEEP = 8


class Unpacked:
    """The dicts of packed side inputs: decoded once per worker process, shared by its DoFns.

    With keyed joins, line DoFns run in several stages; without sharing, every stage's DoFn held
    its own copy of the item table.
    """

    def __call__(self, packed) -> tuple:
        out = []
        for token, blob in packed:
            d = _UNPACKED.get(token)
            if d is None:
                d = _UNPACKED[token] = json.loads(blob)
                while len(_UNPACKED) > _UNPACKED_KEEP:
                    _UNPACKED.popitem(last=False)
            out.append(d)
        return tuple(out)


# ---------------------------------------------------------------- ParseAndJoin

class _FoundTable:
    """``.get(key)`` view of one table's rows in a KeyedLookup result keyed by (table, key)."""

    __slots__ = ("_found", "_index")

    def __init__(self, found, index):
        self._found, self._index = found, index

    def get(self, key):
        return self._found.get((self._index, key))


class LinesDoFn(beam.DoFn):
    """Lines -> records: parse, join dictionaries, check, split.

    Input: ``(source split, lines)``, batches of raw lines of one input
    (``sources.ReadLineBatches``), or ``(record, found)`` pairs after a ``KeyedLookup``. A keyed
    join splits the work into several instances: one that parses and emits ``pending`` records
    ``(line id, (raw, split, labels, features))`` for ``KeyedLookup``, and one per lookup that
    takes ``(record, found)``. The last (``final``)
    instance emits ``records``: ``(split, [(labels, features), ...])`` batches. Every instance
    emits ``dead`` letters ``(split, JSON)`` and per bundle ``stats`` (lines read and
    dead-lettered per split and reason).

    Args:
      spec: the ``features.LineSpec``.
      parse: input elements are batches of raw lines, whose source split is TRAIN/EVAL/VALID
        when the input file decides (TRAIN: up to the valid carve), else None (else
        ``(record, found)`` pairs).
      field_map: ``None``, ``"side"`` (first side input) or ``"found"``.
      tables: per entity table ``None`` (not in this step), ``"side"`` (next side input) or
        ``"found"``.
      final: run the checks and emit records by split (else ``pending``).

    Side inputs are ``pack``ed dicts (``AsSingleton``).
    """

    def __init__(self, spec, parse=True, field_map=None, tables=(), final=True):
        self._spec = spec
        self._parse = parse
        self._field_map = field_map
        self._tables = tuple(tables)
        self._final = final

    def setup(self):
        self._proc = feat.LineProcessor(self._spec)
        self._unpacked = Unpacked()
        spec = self._spec
        # The split is known at read time from the input file (-1: not), or from the raw line's hash.
        self._fixed = {feat.EVAL: feat.EVAL, feat.VALID: feat.VALID,
                       feat.TRAIN: -1 if spec.valid_per_10k else feat.TRAIN}
        self._early = self._parse and spec.split in ("line", "path")

    def start_bundle(self):
        self._stats = {}
        self._batches = {}
        self._id_prefix = uuid.uuid4().hex[:16]
        self._next_id = 0

    def process(self, element, *packed):
        side = self._unpacked(packed)
        out = []
        if self._parse:  # a batch of raw lines of one input
            source, lines = element
            split = self._fixed.get(source, -1)
            _add(self._stats, "input.read", len(lines))
            if split >= 0:
                _add(self._stats, f"{SPLIT_NAMES[split]}.read", len(lines))
            for raw in lines:
                self._line(raw, split, None, None, None, side, out)
        else:  # (pending record, found dictionary values)
            (raw, split, labels, features), found = element
            self._line(raw, split, labels, features, found, side, out)
        for split, batch in self._batches.items():
            if len(batch) >= BATCH_SIZE:
                out.append(beam.pvalue.TaggedOutput(RECORDS, (split, batch)))
                self._batches[split] = []
        return out

    def _read_split(self, raw):
        split = self._proc.split_of(raw)
        _add(self._stats, f"{SPLIT_NAMES[split]}.read")
        return split

    def _line(self, raw, split, labels, features, found, side, out):
        """Processes one line; appends what it emits to ``out``."""
        stats = self._stats
        proc = self._proc
        if split < 0 and self._early:  # a hash split known at read time
            split = self._read_split(raw)
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
            dropped = None
            if self._final:
                features, dropped = proc.truncate(features)
                features = proc.finish(features)
        except ParseError as e:
            if split < 0:
                split = self._read_split(raw)
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
        if dropped:
            for field, n in dropped.items():
                _add(stats, f"{SPLIT_NAMES[split]}.truncated.{field}")
                _add(stats, f"{SPLIT_NAMES[split]}.truncated_keys.{field}", n)
        batch = self._batches.get(split)
        if batch is None:
            batch = self._batches[split] = []
        batch.append((labels, features))

    def finish_bundle(self):
        for split, batch in self._batches.items():
            if batch:
                yield beam.pvalue.TaggedOutput(RECORDS, _windowed((split, batch)))
        self._batches = {}
        if self._stats:
            yield beam.pvalue.TaggedOutput(STATS, _windowed(self._stats))


def run_lines(lines, label, dofn, side_inputs=()):
    """Applies a ``LinesDoFn``; returns its tagged outputs."""
    return lines | label >> beam.ParDo(dofn, *side_inputs).with_outputs(RECORDS, DEAD, STATS, main=PENDING)


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
    This is the one step of the job that shuffles records.
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


class ParseAndJoin(beam.PTransform):
    """The input globs -> records, dead letters and stats (apply to the pipeline).

    parse -> field map -> entity tables -> checks -> split in one fused ``LinesDoFn`` when the
    dictionaries are side inputs; a dictionary joined by key adds a ``KeyedLookup`` and a
    ``LinesDoFn`` after it.

    Args:
      plan: the job plan.
      inputs: ``(source split, glob)`` per input: TRAIN/EVAL/VALID when the input file decides
        the split, None for a hash split. They are read as one source.
      field_map: for libfm input, the field map: a PCollection of (feature key, field) when it
        is joined by key, else its ``pack`` (a PCollection) or ``packed`` element (inline);
        None for libffm.
      tables: per entity table, in ``plan.tables`` order, likewise: (key, ``table_row``) pairs,
        their pack or their packed element.

    Returns (from ``expand``):
      {"records": (split, [(labels, features)]) batches, "dead": tuple of (split, JSON)
      PCollections, "stats": tuple of per-bundle stats PCollections}.
    """

    def __init__(self, plan: JobPlan, inputs, field_map=None, tables=()):
        super().__init__()
        self._plan = plan
        self._inputs = tuple(inputs)
        self._field_map = field_map
        self._table_pcs = tuple(tables)

    def expand(self, pbegin):
        plan, spec, field_map = self._plan, self._plan.spec, self._field_map
        keyed_tables = [i for i, (*_, keyed) in enumerate(plan.tables) if keyed]
        side_tables = [side_input(pc) for pc, (*_, keyed) in zip(self._table_pcs, plan.tables) if not keyed]
        table_modes_side = tuple(None if keyed else "side" for *_, keyed in plan.tables)
        fm_mode = None if field_map is None else ("found" if plan.field_map_keyed else "side")

        lines = pbegin | "Read" >> sources.ReadLineBatches(self._inputs)
        side = [side_input(field_map)] if fm_mode == "side" else []
        tables_here = () if fm_mode == "found" else table_modes_side
        if tables_here:
            side += side_tables
        outputs = [run_lines(lines, "Lines", LinesDoFn(
            spec, parse=True, field_map="side" if fm_mode == "side" else None,
            tables=tables_here, final=fm_mode != "found" and not keyed_tables), side)]
        if fm_mode == "found":
            found = (outputs[-1][PENDING], field_map) | "KeyedFieldMap" >> KeyedLookup(FeatureKeys(), "KeyedFieldMap")
            outputs.append(run_lines(found, "LinesAfterFieldMap", LinesDoFn(
                spec, parse=False, field_map="found", tables=table_modes_side, final=not keyed_tables), side_tables))
        if keyed_tables:
            entries = [self._table_pcs[i] | f"TableKey{i}" >> beam.Map(lambda kv, i: ((i, kv[0]), kv[1]), i)
                       for i in keyed_tables]
            table_dict = entries | "FlattenKeyedTables" >> beam.Flatten()
            request = EntityKeys([(i, plan.tables[i][0].key_field) for i in keyed_tables])
            found = (outputs[-1][PENDING], table_dict) | "KeyedTables" >> KeyedLookup(request, "KeyedTables")
            modes = tuple("found" if i in keyed_tables else None for i in range(len(plan.tables)))
            outputs.append(run_lines(found, "LinesAfterTables", LinesDoFn(spec, parse=False, tables=modes, final=True)))
        return {"records": outputs[-1][RECORDS], "dead": tuple(o[DEAD] for o in outputs),
                "stats": tuple(o[STATS] for o in outputs)}


# ---------------------------------------------------------------- Statistics

# Feature counts travel as this many dicts per bundle (by a stable hash of the feature), not as
# one element per feature: on the Python runners each element costs about 10 us per stage it
# crosses (Frappe's count stage: 0.054 s before, 0.011 s after, ``bench.etl_stages``). The shards
# keep the sums spread over workers.
COUNT_SHARDS = 64


def count_shard(field: str, key: str) -> int:
    """The shard of a feature's count: stable across processes (unlike ``hash`` of a str)."""
    return zlib.crc32(f"{field}\t{key}".encode("utf-8")) % COUNT_SHARDS


class _SumDictsFn(beam.CombineFn):
    """Dicts of counts -> one dict of their sums per key."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, counts):
        get = acc.get
        for k, n in counts.items():
            acc[k] = get(k, 0) + n
        return acc

    def merge_accumulators(self, accs):
        accs = iter(accs)
        out = next(accs, {})
        for acc in accs:
            self.add_input(out, acc)
        return out

    def extract_output(self, acc):
        return acc


class SumFeaturesFn(beam.DoFn):
    """Record batches -> per-bundle training sums, and the fields of every split.

    Outputs: ``counts`` (shard, {(field, key): n}) of categorical and numeric features of the
    training split (``count_shard``); ``values`` ((field, float32 value), n) of its binned and
    numeric features;
    ``totals`` ((what, field), n): ``occurrences`` (training features of the field),
    ``lines`` (training lines holding a multi-hot field) and ``seen`` (0, for every field of
    any split). Sequences of another field's keys (``shared``: their ``vocabulary_of``) count only
    as occurrences: their keys get no rows. The feature tuples themselves are counted (``Counter.update``, a C loop) and
    turned into counts and values when the bundle's sums are emitted; a key may come out more
    than once (a categorical feature with several values, a flush), the combiners add them up.
    """

    def __init__(self, binned, numeric, multi_hot, shared=()):
        self._binned = frozenset(binned)
        self._value_fields = frozenset(binned) | frozenset(numeric)
        self._multi_hot = frozenset(multi_hot)
        self._shared = frozenset(shared)

    def start_bundle(self):
        self._tuples, self._totals, self._seen = collections.Counter(), {}, set()

    def process(self, element):
        split, records = element
        features = itertools.chain.from_iterable(f for _, f in records)
        if split != feat.TRAIN:
            self._seen.update(f[0] for f in features)
            return
        self._tuples.update(features)
        if self._multi_hot:
            for _, fs in records:
                for field in {f[0] for f in fs if f[0] in self._multi_hot}:
                    _add(self._totals, ("lines", field))
        if len(self._tuples) >= _FLUSH_AT:  # bound the memory of huge bundles
            yield from self._drain(lambda x: x)

    def _drain(self, wrap):
        # Values stream out as elements and counts as per-shard dicts; the combiners downstream
        # merge equal keys.
        totals = self._totals
        value_fields, binned, shared = self._value_fields, self._binned, self._shared
        shards = collections.defaultdict(dict)
        for (field, key, value), n in self._tuples.items():
            _add(totals, ("occurrences", field), n)
            if field in shared:
                continue
            if field in value_fields:
                yield beam.pvalue.TaggedOutput(VALUES, wrap(((field, to_float32(value)), n)))
                if field in binned:
                    continue
            _add(shards[count_shard(field, key)], (field, key), n)
        for kv in shards.items():
            yield beam.pvalue.TaggedOutput(COUNTS, wrap(kv))
        for kv in totals.items():
            yield beam.pvalue.TaggedOutput(TOTALS, wrap(kv))
        self._tuples, self._totals = collections.Counter(), {}

    def finish_bundle(self):
        yield from self._drain(_windowed)
        for field in self._seen:
            yield beam.pvalue.TaggedOutput(TOTALS, _windowed((("seen", field), 0)))
        self._seen = set()


class _ValueSummaryFn(beam.CombineFn):
    """(value, weight) of distinct values -> (total, min, max, the ``top`` heaviest as (w, v), heaviest first)."""

    def __init__(self, top: int):
        self._top = top

    def create_accumulator(self):
        return [0, float("inf"), float("-inf"), []]

    def add_input(self, acc, vw):
        v, w = vw
        acc[0] += w
        acc[1] = min(acc[1], v)
        acc[2] = max(acc[2], v)
        heap = acc[3]
        if len(heap) < self._top:
            heapq.heappush(heap, (w, v))
        elif (w, v) > heap[0]:
            heapq.heapreplace(heap, (w, v))
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for a in accs:
            out[0] += a[0]
            out[1] = min(out[1], a[1])
            out[2] = max(out[2], a[2])
            out[3].extend(a[3])
        out[3] = heapq.nlargest(self._top, out[3])
        heapq.heapify(out[3])
        return out

    def extract_output(self, acc):
        return acc[0], acc[1], acc[2], sorted(acc[3], reverse=True)


def _quantile_fn(max_bins: int) -> ApproximateQuantilesCombineFn:
    return ApproximateQuantilesCombineFn.create(num_quantiles=max_bins + 1, weighted=True)


class _QuantileSketchFn(beam.CombineFn):
    """(value, weight, gap) -> (Beam's weighted quantile state, gaps seen).

    The state is Beam's ``ApproximateQuantilesCombineFn`` accumulator (Manku et al. 1998,
    weighted); it is returned as such so that ``_edges`` can read ``m + 1`` quantiles for the
    ``m`` it settles on.
    """

    def __init__(self, max_bins: int):
        self._max_bins = max_bins
        self._fn = _quantile_fn(max_bins)

    def create_accumulator(self):
        return self._fn.create_accumulator(), set()

    def add_input(self, acc, vwg):
        v, w, gap = vwg
        self._fn.add_input(acc[0], (v, w))
        acc[1].add(gap)
        return acc

    def merge_accumulators(self, accs):
        accs = list(accs)
        return self._fn.merge_accumulators([a[0] for a in accs]), set().union(*(a[1] for a in accs))

    def extract_output(self, acc):
        return acc


def _heavy(summary, num_bins: int) -> list[float]:
    """Values holding at least 1/num_bins of the rows, sorted."""
    total, _, _, top = summary
    return sorted(v for w, v in top if w * num_bins >= total)


def _with_gap(kv, heavy):
    """(field, (v, w)) -> [(field, (v, w, gap))] unless v is heavy; gap: heavy values below v."""
    field, (v, w) = kv
    h = heavy.get(field, ())
    i = bisect.bisect_left(h, v)
    if i < len(h) and h[i] == v:
        return []
    return [(field, (v, w, i))]


def _edges(kv, num_bins: dict, max_bins: int, sketches: dict):
    field, summary = kv
    total, lo, hi, _ = summary
    state, gaps = sketches.get(field, (None, set()))
    cls, args = _quantile_fn(max_bins).__reduce__()

    def quantiles(m):
        return [] if state is None else cls(m + 1, *args[1:]).extract_output(state)

    return field, feat.bin_edges(num_bins[field], lo, hi, _heavy(summary, num_bins[field]), gaps, quantiles)


class ComputeBins(beam.PTransform):
    """Bin edges that survive ties (``features.bin_edges``), from exact per-value training counts.

    Input: ((field, float32 value), n), one element per distinct value. Output: (field, edges)
    for the fields of ``num_bins``. A combiner finds each field's total and heaviest values; the
    values that are not heavy (a side input of the few heavy ones filters them) go into Beam's
    weighted approximate quantiles; one step per field assembles the edges.
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
        summary = weighted | "Summary" >> beam.CombinePerKey(_ValueSummaryFn(max_bins))
        heavy = summary | "Heavy" >> beam.Map(lambda kv: (kv[0], _heavy(kv[1], num_bins[kv[0]])))
        sketches = (weighted | "NotHeavy" >> beam.FlatMap(_with_gap, beam.pvalue.AsDict(heavy))
                    | "Quantiles" >> beam.CombinePerKey(_QuantileSketchFn(max_bins)))
        return summary | "Edges" >> beam.Map(_edges, num_bins, max_bins, beam.pvalue.AsDict(sketches))


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
    """((field, value), count) -> (field, {count, mean, std, min, max}) of the transformed values.

    ``transforms`` maps numeric fields to their ``transform`` (others: none).
    """

    def __init__(self, transforms: dict[str, str] | None = None):
        super().__init__()
        self._transforms = dict(transforms or {})

    def expand(self, values):
        transforms = self._transforms
        return (values | "Transformed" >> beam.Map(
                    lambda kv: (kv[0][0], (transform_value(kv[0][1], transforms.get(kv[0][0], "none")), kv[1])))
                | "Stats" >> beam.CombinePerKey(_ValueStatsFn()))


def _bin_count(kv, binned, base_bounds, bounds):
    """((field, value), n) of a binned field -> [((field, bin key), n)]."""
    (field, value), n = kv
    if field not in binned:
        return []
    edges = base_bounds.get(field, bounds.get(field, ()))
    return [((field, bin_key(bin_index(value, edges))), n)]


def _has_row(kv, mode, min_counts, default, known):
    """Whether a (feature, count) keeps (build, extend) or has (fixed, extend) a row of its own."""
    if kv[0] in known:
        return True
    return mode != "fixed" and kv[1] >= min_counts.get(kv[0][0], default)


def _with_row(shard_counts, mode, min_counts, default, known):
    """The (feature, count) pairs of one shard's summed counts that ``_has_row``."""
    return [kv for kv in shard_counts[1].items() if _has_row(kv, mode, min_counts, default, known)]


def write_text(path: str, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` on any Beam filesystem."""
    with FileSystems.create(path) as f:
        f.write(text.encode("utf-8"))



def _spec_dict(s) -> dict:
    d = dataclasses.asdict(s)
    if d["bin_boundaries"] is not None:
        d["bin_boundaries"] = list(d["bin_boundaries"])
    d["extra_ranges"] = [list(r) for r in d["extra_ranges"]]
    return d


def write_layout(layout: dict, out: str) -> int:
    """vocabulary.tsv, _meta/fields.json and _meta/usage.json of a layout; returns the vocabulary size."""
    with FileSystems.create(FileSystems.join(out, VOCAB_FILENAME)) as f:
        lines = write_vocabulary_lines(layout["vocab"])
        for chunk in iter(lambda: "".join(f"{line}\n" for line in itertools.islice(lines, 10000)), ""):
            f.write(chunk.encode("utf-8"))
    write_text(FileSystems.join(out, META, "fields.json"), json.dumps([_spec_dict(s) for s in layout["specs"]]))
    write_text(FileSystems.join(out, META, "usage.json"), json.dumps(layout["usage"], sort_keys=True))
    return len(layout["vocab"])


class Statistics(beam.PTransform):
    """Record batches of every split -> the vocabulary, bins and value statistics.

    Training records are counted; eval/valid records only add the fields they show. Per-bundle
    sums (``SumFeaturesFn``) feed combiners that Beam lifts into the records' stage: counts per feature, counts per distinct value (-> ``ComputeBins``,
    ``ValueStats``, bin counts); per-field totals (occurrences, lines of multi-hot fields,
    fields seen) are a side input. The features that keep a row reach one worker, which builds the layout
    (``plan.make_layout``) and writes ``vocabulary.tsv`` and ``_meta/{fields,usage}.json``.
    Records do not wait for any of it.

    Returns (from ``expand``): the layout, one dict {"specs", "vocab", "usage"}.
    """

    def __init__(self, plan: JobPlan, out: str):
        super().__init__()
        self._plan = plan
        self._out = out

    def expand(self, records):
        plan = self._plan
        p = records.pipeline
        sums = (records | "SumFeatures" >> beam.ParDo(SumFeaturesFn(plan.binned, plan.numeric, plan.spec.multi_hot,
                                                                     plan.namespaces))
                .with_outputs(COUNTS, VALUES, TOTALS))
        # Totals: a few pairs per field and bundle, summed where the layout is built (no combine stage).
        side = {"totals": beam.pvalue.AsList(sums[TOTALS])}  # side inputs of the layout step
        if plan.binned or plan.numeric:
            values = sums[VALUES] | "SumValues" >> beam.CombinePerKey(sum)
            bounds = values | "Bins" >> ComputeBins(plan.num_bins)
            side["bounds"] = beam.pvalue.AsDict(bounds)
            side["stats"] = beam.pvalue.AsDict(values | "ValueStats" >> ValueStats(plan.transforms))
            if plan.binned:
                side["bin_counts"] = beam.pvalue.AsDict(
                    values | "BinCounts" >> beam.FlatMap(_bin_count, plan.binned, plan.base_bounds,
                                                         beam.pvalue.AsDict(bounds))
                    | "SumBinCounts" >> beam.CombinePerKey(sum))
        known = {}
        if plan.mode != "build":
            base_vocab = (p | "ReadBaseVocabulary" >> beam.io.ReadFromText(plan.base_vocabulary, skip_header_lines=1)
                          | "ParseBaseVocabulary" >> beam.Map(parse_vocabulary_line))
            side["base_vocab"] = beam.pvalue.AsList(base_vocab)
            known = beam.pvalue.AsDict(base_vocab | "BaseKeys" >> beam.Map(lambda e: ((e.field, e.key), None)))
        # Only features with a row reach the one worker that builds the layout; when extending,
        # those already in the base vocabulary too (their counts add up).
        kept = (sums[COUNTS] | "SumCounts" >> beam.CombinePerKey(_SumDictsFn())
                | "HasRow" >> beam.Map(_with_row, plan.mode, plan.min_counts, plan.default_min_count, known))
        # One list per count shard, a side input of the one step that builds the layout.
        return p | "Layout" >> Once(_layout, beam.pvalue.AsList(kept), plan, self._out, **side)


def _layout(kept_per_shard, plan, out, totals, bounds=None, stats=None, base_vocab=(), bin_counts=None):
    """``make_layout`` of the features that keep a row, with the bins that keep a row added; written to ``out``."""
    kept = [kv for shard in kept_per_shard for kv in shard]
    sums = {}
    for key, n in totals:
        _add(sums, key, n)
    totals = sums
    known = {(e.field, e.key): None for e in base_vocab}
    kept = kept + [kv for kv in (bin_counts or {}).items()
                   if _has_row(kv, plan.mode, plan.min_counts, plan.default_min_count, known)]
    seen = {f for _, f in totals}  # occurrences (training) or seen (any split)
    layout = make_layout(kept, plan, bounds or {}, stats or {}, seen, base_vocab, totals)
    write_layout(layout, out)
    return layout


# ---------------------------------------------------------------- writing

class GzipWriter:
    """A gzip file at ``GZIP_LEVEL`` on any Beam filesystem (Beam's own gzip writer uses level 6)."""

    def __init__(self, path: str):
        self._file = FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)
        self._zip = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)

    def write(self, data: bytes) -> None:
        out = self._zip.compress(data)
        if out:
            self._file.write(out)

    def close(self) -> None:
        self._file.write(self._zip.flush())
        self._file.close()


class _BackgroundWrites:
    """File writes (gzip compression and I/O, which release the GIL) on one thread, in order.

    The DoFn's thread parses and encodes the next batch meanwhile, on the second core when
    there is one. At most ``depth`` writes wait, so memory stays bounded; ``drain`` waits for
    all of them and re-raises the first error.
    """

    def __init__(self, depth: int = 4):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="etl-writes")
        self._pending: collections.deque = collections.deque()
        self._depth = depth

    def submit(self, fn, *args) -> None:
        if len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _write_parts(files, parts) -> None:
    for (_, f), part in zip(files, parts):
        if part:
            f.write(b"".join(part))


class _ShardWriterFn(beam.DoFn):
    """Record batches -> gzip TFRecord files: each bundle deals its records round-robin to
    ``num_shards`` open files per split, under temporary names.

    Outputs: main (split, temporary path) per file, at the end of the bundle; ``stats`` per
    bundle: written, positives per label, most features and most repeated fields in a record.
    Compression and file writes run behind the encoding (``_BackgroundWrites``).
    """

    def __init__(self, tmp_dir: str, num_shards: int, label_names, keys, multi_hot: bool, namespaces=None):
        self._tmp = tmp_dir
        self._shards = num_shards
        self._labels = tuple(label_names)
        self._keys = keys
        self._multi_hot = multi_hot
        self._namespaces = dict(namespaces or {})

    def setup(self):
        self._encoder = feat.RecordEncoder(self._labels, self._keys, namespaces=self._namespaces)

    def start_bundle(self):
        self._writes = _BackgroundWrites()  # per bundle: a failed bundle's writes stay with it
        self._files = {}  # split -> [(path, open file)]
        self._next = {}
        self._stats = {}

    def _open(self, split):
        stamp = uuid.uuid4().hex
        files = []
        for i in range(self._shards):
            path = FileSystems.join(self._tmp, f"{SPLIT_NAMES[split]}-{stamp}-{i:05d}{SHARD_SUFFIX}")
            files.append((path, GzipWriter(path)))
        self._files[split] = files
        self._next[split] = 0
        return files

    def process(self, element):
        split, records = element
        files = self._files.get(split) or self._open(split)
        n = self._shards
        parts = [[] for _ in range(n)]
        i = self._next[split]
        name = SPLIT_NAMES[split]
        stats = self._stats
        encode, frame = self._encoder.encode, tfrecord.frame
        for labels, features in records:
            parts[i].append(frame(encode(labels, features)))
            i = i + 1 if i + 1 < n else 0
        # The batch's sums in C loops (zip, sum, max), not per record in Python.
        positives = [sum(column) for column in zip(*(labels for labels, _ in records))]
        most = max(stats.get(f"{name}.max_features", 0), max(map(len, (f for _, f in records))))
        repeats = stats.get(f"{name}.max_repeats", 0)
        if self._multi_hot:
            repeats = max(repeats, max(len(f) - len({x[0] for x in f}) for _, f in records))
        self._next[split] = i
        self._writes.submit(_write_parts, files, parts)
        _add(stats, f"{name}.written", len(records))
        for j, v in enumerate(positives):
            _add(stats, f"{name}.positives.{j}", v)
        stats[f"{name}.max_features"] = most
        stats[f"{name}.max_repeats"] = repeats

    def finish_bundle(self):
        self._writes.drain()
        self._writes.close()
        for split, files in self._files.items():
            for path, f in files:
                f.close()
                yield _windowed((split, path))
        self._files = {}
        if self._stats:
            yield beam.pvalue.TaggedOutput(STATS, _windowed(self._stats))


class _DeadLetterWriterFn(beam.DoFn):
    """(split, JSON) -> one JSON-lines file per split and bundle, under a temporary name."""

    def __init__(self, tmp_dir: str):
        self._tmp = tmp_dir

    def start_bundle(self):
        self._files = {}

    def process(self, element):
        split, line = element
        entry = self._files.get(split)
        if entry is None:
            path = FileSystems.join(self._tmp, f"{SPLIT_NAMES[split]}-{uuid.uuid4().hex}{DEAD_SUFFIX}")
            entry = self._files[split] = (path, FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED))
        entry[1].write(line.encode("utf-8") + b"\n")

    def finish_bundle(self):
        for split, (path, f) in self._files.items():
            f.close()
            yield _windowed((split, path))
        self._files = {}


def finalize_files(written, out: str, tmp_dir: str, splits, path_of, empty_files: int, gzip: bool) -> list[str]:
    """Renames the temporary files of every split to their final names; runs once, on one worker.

    Args:
      written: (split id, temporary path) of every file the writers finished.
      out: the output directory.
      tmp_dir: the writers' temporary directory, deleted at the end (with what failed
        attempts left there).
      splits: names of the splits the job writes.
      path_of: ``(out, split, index, total) -> final path``.
      empty_files: empty files written for a split that got no file (so every split exists).
      gzip: the files are gzip-compressed (empty ones too).

    Returns:
      The final paths, sorted.
    """
    by_split = {name: [] for name in splits}
    for split, path in written:
        by_split[SPLIT_NAMES[split]].append(path)
    src, dst, final = [], [], []
    for name, paths in by_split.items():
        paths.sort()
        if not paths:
            for i in range(empty_files):
                path = path_of(out, name, i, empty_files)
                (GzipWriter(path) if gzip else FileSystems.create(path)).close()
                final.append(path)
            continue
        for i, path in enumerate(paths):
            src.append(path)
            dst.append(path_of(out, name, i, len(paths)))
    for d in {p.rsplit("/", 1)[0] for p in dst}:
        if not FileSystems.exists(d):
            FileSystems.mkdirs(d)
    # A retried step finds some files renamed already.
    todo = [(a, b) for a, b in zip(src, dst) if FileSystems.exists(a) or not FileSystems.exists(b)]
    if todo:
        FileSystems.rename([a for a, _ in todo], [b for _, b in todo])
    if FileSystems.exists(tmp_dir):
        FileSystems.delete([tmp_dir])
    return sorted(final + dst)


class WriteRecords(beam.PTransform):
    """Record batches of every split -> ``<split>/part-SSSSS-of-NNNNN.tfrecord.gz``.

    ``_ShardWriterFn`` writes while the records stream; then one step sees only the list of
    file names and renames them (``finalize_files``): with one bundle per split, as on the
    DirectRunner here, a split gets exactly ``num_shards`` files. Returns (from ``expand``)
    {"files": the final paths (one list), "stats": per-bundle stats}.
    """

    def __init__(self, out: str, splits, num_shards: int, label_names, keys, multi_hot: bool = False,
                 namespaces=None):
        super().__init__()
        self._out = out
        self._splits = tuple(splits)
        self._shards = num_shards
        self._labels = tuple(label_names)
        self._keys = keys
        self._multi_hot = multi_hot
        self._namespaces = dict(namespaces or {})

    def expand(self, records):
        tmp = FileSystems.join(self._out, f"{TMP}-records")
        written = (records | "Write" >> beam.ParDo(_ShardWriterFn(tmp, self._shards, self._labels, self._keys,
                                                                 self._multi_hot, self._namespaces))
                   .with_outputs(STATS, main="files"))
        final = records.pipeline | "Finalize" >> Once(
            finalize_files, beam.pvalue.AsList(written.files), self._out, tmp, self._splits, shard_path, self._shards,
            True)
        return {"files": final, "stats": written[STATS]}


class WriteDeadLetters(beam.PTransform):
    """(split, JSON) dead letters (a tuple of PCollections) -> ``dead_letter/<split>-SSSSS-of-NNNNN.jsonl``.

    Same scheme as ``WriteRecords``: one file per split and bundle, renamed at the end; a split
    without dead letters gets one empty file. Returns the final paths (one list).
    """

    def __init__(self, out: str, splits):
        super().__init__()
        self._out = out
        self._splits = tuple(splits)

    def expand(self, dead):
        tmp = FileSystems.join(self._out, f"{TMP}-dead_letter")
        files = [d | f"Write{i}" >> beam.ParDo(_DeadLetterWriterFn(tmp)) for i, d in enumerate(dead)]
        files = union(files, "FlattenFiles")
        return dead[0].pipeline | "Finalize" >> Once(
            finalize_files, beam.pvalue.AsList(files), self._out, tmp, self._splits, dead_letter_path, 1, False)


# ---------------------------------------------------------------- Report

class MergeStats(beam.CombineFn):
    """Per-bundle stats dicts -> one dict (``*.max_*`` by max, the rest summed)."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, d):
        for k, v in d.items():
            acc[k] = max(acc.get(k, 0), v) if ".max_" in k else acc.get(k, 0) + v
        return acc

    def merge_accumulators(self, accs):
        out = {}
        for a in accs:
            self.add_input(out, a)
        return out

    def extract_output(self, acc):
        return acc


class PublishCounters(beam.DoFn):
    """Reports the job's final sums as Beam counters (namespace ``etl``).

    The sums come from the stats PCollection, so the counters are exact on
    every runner. (Counters incremented inside a DoFn that has a side input
    were lost by the BundleBasedDirectRunner: it records them into a metrics
    container it never commits.)
    """

    def process(self, stats):
        for name, value in sorted(stats.items()):
            if ".max_" not in name:
                Metrics.counter(NAMESPACE, name).inc(int(value))
        yield stats


def _write_stats(bundle_stats, out):
    """Merges per-bundle stats (``MergeStats``) and writes ``_meta/stats.json``; returns the sums."""
    merge = MergeStats()
    stats = merge.merge_accumulators(bundle_stats)
    write_text(FileSystems.join(out, META, "stats.json"), json.dumps(stats, sort_keys=True))
    return stats


class Report(beam.PTransform):
    """Per-bundle stats (a tuple of PCollections) -> ``_meta/stats.json`` and Beam counters."""

    def __init__(self, out: str):
        super().__init__()
        self._out = out

    def expand(self, stats):
        stats = union(stats, "FlattenStats")
        return (stats.pipeline | "WriteStats" >> Once(_write_stats, beam.pvalue.AsList(stats), self._out)
                | "PublishCounters" >> beam.ParDo(PublishCounters()))
