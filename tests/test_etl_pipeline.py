"""Beam ETL on the DirectRunner: composite transforms with TestPipeline/assert_that, and whole jobs."""
from __future__ import annotations

import base64
import glob
import json
import math
import os
import subprocess
import sys

import apache_beam as beam
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from etl import features as feat
from etl import parsing, pipeline, plan as plan_lib, transforms
from etl.config import EntityTableConfig, EtlConfig, FieldConfig
from feature_schema import ExampleKeys, feature_hash, field_hash, load_schema, read_vocabulary
from feature_schema.rules import bin_index, singleton_edge, to_float32


def _reasons(records):
    return sorted(json.loads(r)["reason"] for _, r in records)


def _write(path, lines):
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")


def _examples(out, split):
    files = sorted(glob.glob(os.path.join(out, split, "part-*.tfrecord.gz")))
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP")
    return [tf.train.Example.FromString(r.numpy()) for r in ds]


def _feats(ex):
    """(field hash, feature hash, value) of an example, in record order."""
    f = ex.features.feature
    return list(zip(f["feat_field_hashes"].int64_list.value, f["feat_hashes"].int64_list.value,
                    f["feat_vals"].float_list.value))


def _named(out, split, names):
    """Every record of a split as a sorted tuple of (field, key, value), keys resolved through ``names``
    ({(field, key) for every feature the test may see}); sorted over records."""
    by_hash = {(field_hash(f), feature_hash(f, k)): (f, k) for f, k in names}
    return sorted(tuple(by_hash[(fh, h)] + (v,) for fh, h, v in _feats(ex)) for ex in _examples(out, split))


def _dead(out, split):
    return [json.loads(line) for path in glob.glob(os.path.join(out, "dead_letter", f"{split}-*"))
            for line in open(path, encoding="utf-8") if line.strip()]


def _run(cfg, options=None):
    with beam.Pipeline(options=options) as p:
        pipeline.build_pipeline(p, cfg)
    return pipeline.write_schema(cfg)


# ---------------------------------------------------------------- composite transforms

def test_lines_dofn_routes_each_malformed_line_to_dead_letter():
    cfg = EtlConfig(input="unused", format="libffm", labels=("click", "conversion"), max_features=3,
                    strict_fields=True, fields=(FieldConfig("user"), FieldConfig("item")))
    plan = plan_lib.plan_job(cfg)
    lines = [b"1,0 user:a:1 item:x:2", b"", b"1,0 user:a:1 \xff", b"x,0 user:a:1", b"1 user:a:1",
             b"1,0 user:a", b"1,0 user:a:nan", b"1,0 user:a:1 user:b:1", b"1,0 shop:s:1",
             b"1,0 user:a:1 item:x:1 item:y:1 item:z:1", b"1,0", b"1,0 item:y:z", b"0,0 item:y:1e39",
             b"0,0 item:y:1"]
    with TestPipeline() as p:
        out = transforms.run_lines(p | beam.Create([(0, lines)]), "Lines", transforms.LinesDoFn(plan.spec))
        assert_that(out[transforms.RECORDS], equal_to([(0, [((1.0, 0.0), (("user", "a", 1.0), ("item", "x", 2.0))),
                                                            ((0.0, 0.0), (("item", "y", 1.0),))])]), label="good")
        assert_that(out[transforms.DEAD] | beam.combiners.ToList() | beam.Map(_reasons), equal_to([sorted([
            parsing.EMPTY, parsing.NON_UTF8, parsing.BAD_LABEL, parsing.LABEL_COUNT, parsing.BAD_TOKEN,
            parsing.NON_FINITE, parsing.DUPLICATE_FIELD, parsing.UNKNOWN_FIELD, parsing.TOO_MANY_FEATURES,
            parsing.NO_FEATURES, parsing.BAD_VALUE, parsing.NON_FINITE])]), label="dead")
        stats = out[transforms.STATS] | beam.CombineGlobally(transforms.MergeStats())
        assert_that(stats | beam.Map(lambda d: (d["input.read"], d["train.read"], d["train.dead_lettered"])),
                    equal_to([(14, 14, 12)]), label="stats")


def test_dead_letter_keeps_exact_raw_bytes():
    rec = json.loads(transforms.dead_letter("train", b"1 a:\xff\n", "non_utf8", "x"))
    assert base64.b64decode(rec["line_b64"]) == b"1 a:\xff\n"
    assert rec["line"] == "1 a:\\xff" and rec["reason"] == "non_utf8" and rec["split"] == "train"


def _join_inputs(d, parquet):
    d.mkdir()
    _write(d / "train.libfm", [b"1 u1:1 i1:1", b"0 u2:1 i2:1", b"1 u1:1 i3:1", b"0 u1:1 zz:1", b"1 u2:1 i1:1"])
    _write(d / "eval.libfm", [b"0 u1:1 i2:1", b"1 u3:1 i1:1"])
    fmap = [("u1", "user"), ("u2", "user"), ("i1", "item"), ("i2", "item"), ("i3", "item")]
    items = [("i1", "c1", 10.0), ("i2", "c2", 20.0)]  # i3 has no row
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"feature": [k for k, _ in fmap], "field": [f for _, f in fmap]}), d / "fields.parquet")
        pq.write_table(pa.table({"item": [r[0] for r in items], "category": [r[1] for r in items],
                                 "price": [r[2] for r in items]}), d / "items.parquet")
        return d, str(d / "fields.parquet"), str(d / "items.parquet")
    (d / "fields.tsv").write_text("feature\tfield\n" + "".join(f"{k}\t{f}\n" for k, f in fmap))
    (d / "items.tsv").write_text("item\tcategory\tprice\n" + "".join(f"{i}\t{c}\t{p:g}\n" for i, c, p in items))
    return d, str(d / "fields.tsv"), str(d / "items.tsv")


def _join_config(d, fmap, items, limit, **kw):
    return EtlConfig(input=str(d / "train.libfm"), eval_input=str(d / "eval.libfm"), format="libfm", field_map=fmap,
                     out=str(d / "out"), min_count=1, num_shards=1, side_input_max_bytes=limit,
                     fields=(FieldConfig("user"), FieldConfig("item"), FieldConfig("category"),
                             FieldConfig("price", kind="numeric")),
                     entity_tables=(EntityTableConfig(name="items", path=items, key_field="item"),), **kw)


# Records of _join_inputs' training file after the field map and the item table (zz is unmapped).
_JOINED = [((1.0,), (("user", "u1", 1.0), ("item", "i1", 1.0), ("category", "c1", 1.0), ("price", "price", 10.0))),
           ((0.0,), (("user", "u2", 1.0), ("item", "i2", 1.0), ("category", "c2", 1.0), ("price", "price", 20.0))),
           ((1.0,), (("user", "u1", 1.0), ("item", "i3", 1.0))),
           ((1.0,), (("user", "u2", 1.0), ("item", "i1", 1.0), ("category", "c1", 1.0), ("price", "price", 10.0)))]


@pytest.mark.parametrize("mode", ["inline", "inline_parquet", "side_input", "keyed"])
def test_parse_and_join_with_side_inputs_or_by_key(tmp_path, mode):
    from etl import dictionaries

    d, fmap, items = _join_inputs(tmp_path / "in", parquet=mode == "inline_parquet")
    cfg = _join_config(d, fmap, items, 0 if mode == "keyed" else 64 << 20)
    plan = plan_lib.plan_job(cfg)
    columns, values = ["category", "price"], {"price"}
    with TestPipeline() as p:
        if mode.startswith("inline"):  # read here, shipped inside the job graph
            field_map = transforms.packed(dictionaries.field_map_here(fmap))
            table = transforms.packed(dictionaries.entity_table_here(cfg.entity_tables[0], columns, values))
        else:
            field_map = dictionaries.read_field_map(p, fmap)
            table = dictionaries.read_entity_table(p, cfg.entity_tables[0], columns, values)
        if mode == "side_input":
            field_map, table = transforms.pack(field_map, "F"), transforms.pack(table, "T")
        parsed = p | transforms.ParseAndJoin(plan, [(feat.TRAIN, cfg.input)], field_map, [table])
        records = parsed["records"] | beam.FlatMap(lambda b: [(b[0], r) for r in b[1]])
        assert_that(records, equal_to([(feat.TRAIN, r) for r in _JOINED]), label="records")
        dead = tuple(parsed["dead"]) | "Dead" >> beam.Flatten()
        assert_that(dead | beam.Map(lambda kv: (kv[0], json.loads(kv[1])["reason"], json.loads(kv[1])["line"])),
                    equal_to([(feat.TRAIN, parsing.UNMAPPED_FEATURE, "0 u1:1 zz:1")]), label="dead")


def test_compute_bins_zero_inflated_field_and_value_stats():
    # zi: 70 zeros and 1..30. 0 holds 70% >= 1/4 of the rows: its own bin, (-inf, next(0)) as it is
    # the minimum. The 30 others share m = 3 bins at Beam's lower weighted quantiles: the first value
    # whose cumulative count exceeds (j*30 - 1)/3, j = 1, 2: 9.67 -> 10, 19.67 -> 20.
    # u: 1..100 in 4 bins, no heavy value: (j*100 - 1)/4 -> 25, 50, 75.
    # n: a numeric field with log1p: values 0 and 3 -> transformed 0 and ln 4.
    values = ([(("zi", 0.0), 70)] + [(("zi", float(v)), 1) for v in range(1, 31)]
              + [(("u", float(v)), 1) for v in range(1, 101)] + [(("n", 0.0), 1), (("n", 3.0), 1)])
    with TestPipeline() as p:
        pc = p | beam.Create(values)
        assert_that(pc | transforms.ComputeBins({"zi": 4, "u": 4}),
                    equal_to([("zi", (singleton_edge(0.0), 10.0, 20.0)), ("u", (25.0, 50.0, 75.0))]), label="bins")
        stats = (pc | transforms.ValueStats({"n": "log1p"}) | beam.Filter(lambda kv: kv[0] != "u")
                 | beam.Map(lambda kv: (kv[0], {k: round(v, 9) for k, v in kv[1].items()})))
        ln4 = math.log(4.0)
        # zi: 465 / 100 = 4.65; mean of squares 9455 / 100 (sum of k^2 for k <= 30 is 9455).
        assert_that(stats, equal_to([
            ("zi", {"count": 100.0, "mean": 4.65, "std": round(math.sqrt(94.55 - 4.65 ** 2), 9), "min": 0.0,
                    "max": 30.0}),
            ("n", {"count": 2.0, "mean": round(ln4 / 2, 9), "std": round(ln4 / 2, 9), "min": 0.0,
                   "max": round(ln4, 9)})]), label="stats")
    # Zero alone; 1..9, 10..19 and 20..30 in the other three bins.
    edges = (singleton_edge(0.0), 10.0, 20.0)
    counts = [0] * 4
    for v, n in [(0.0, 70)] + [(float(v), 1) for v in range(1, 31)]:
        counts[bin_index(v, edges)] += n
    assert counts == [70, 9, 10, 11]


def test_statistics_builds_the_vocabulary_from_training_records(tmp_path):
    cfg = EtlConfig(input="unused", out=str(tmp_path), min_count=2, fields=(
        FieldConfig("user"), FieldConfig("price", kind="binned", num_bins=2), FieldConfig("age", kind="numeric")))
    plan = plan_lib.plan_job(cfg)
    train = [((1.0,), (("user", "a", 1.0), ("price", "price", 1.0), ("age", "age", 30.0))),
             ((0.0,), (("user", "a", 1.0), ("price", "price", 2.0))),
             ((0.0,), (("user", "b", 1.0), ("price", "price", 3.0), ("age", "age", 50.0))),
             ((1.0,), (("user", "b", 1.0), ("price", "price", 4.0)))]
    evals = [((1.0,), (("user", "c", 1.0), ("shop", "s", 1.0)))]  # shop is only seen in eval
    with TestPipeline() as p:
        records = p | beam.Create([(feat.TRAIN, train), (feat.EVAL, evals)])
        layout = records | transforms.Statistics(plan, str(tmp_path))
        # Rows: user rare 0, a 1, b 2 (2x each, key order); price (edges: the median of 1..4 by Beam's
        # rule, first rank > 3/2 -> 2): rare 3, bin1 4 (2, 3, 4: 3x); bin0 (1: 1x) is rare; age: rare 5,
        # age 6 (2x); shop, first seen (in eval) after the declared fields: its rare row 7 only.
        assert_that(layout | beam.Map(lambda lay: [(s.name, s.offset, s.vocab_size, s.bin_boundaries)
                                                   for s in lay["specs"]]),
                    equal_to([[("user", 0, 3, None), ("price", 3, 2, (2.0,)), ("age", 5, 2, None),
                               ("shop", 7, 1, None)]]), label="specs")
        assert_that(layout | beam.Map(lambda lay: [(v.field, v.key, v.index, v.count) for v in lay["vocab"]]),
                    equal_to([[("user", "a", 1, 2), ("user", "b", 2, 2), ("price", "bin1", 4, 3),
                               ("age", "age", 6, 2)]]), label="vocab")
        assert_that(layout | beam.Map(lambda lay: (lay["specs"][2].value_stats, lay["usage"]["shop"])),
                    equal_to([({"count": 2.0, "mean": 40.0, "std": 10.0, "min": 30.0, "max": 50.0},
                               {"rows": 0, "rows_count": 0, "top": None, "occurrences": 0, "lines": 0})]),
                    label="stats")
    assert read_vocabulary(str(tmp_path / "vocabulary.tsv"))[0].key == "a"


def test_feature_counts_travel_as_stable_shard_dicts():
    """A bundle's training counts leave as one dict per shard; a feature's shard is the same in
    every process (Python's own str hash is salted per process)."""
    train = [((1.0,), (("user", "a", 1.0), ("item", "x", 1.0))), ((0.0,), (("user", "a", 1.0), ("user", "b", 1.0)))]
    evals = [((1.0,), (("user", "c", 1.0),))]
    expected = {("user", "a"): 2, ("user", "b"): 1, ("item", "x"): 1}  # eval features are not counted
    with TestPipeline() as p:
        sums = (p | beam.Create([(feat.TRAIN, train), (feat.EVAL, evals)])
                | beam.ParDo(transforms.SumFeaturesFn((), (), ())).with_outputs(
                    transforms.COUNTS, transforms.VALUES, transforms.TOTALS))
        assert_that(sums[transforms.COUNTS] | beam.FlatMap(lambda kv: [(kv[0], k, n) for k, n in kv[1].items()]),
                    equal_to([(transforms.count_shard(*k), k, n) for k, n in expected.items()]))
    code = "from etl.transforms import count_shard; print([count_shard(*k) for k in (('user', 'a'), ('item', 'x'))])"
    shards = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, check=True,
                             capture_output=True, text=True).stdout for seed in ("1", "2")}
    assert shards == {f"{[transforms.count_shard('user', 'a'), transforms.count_shard('item', 'x')]}\n"}


def test_write_records_deals_round_robin_to_num_shards_files(tmp_path):
    out = str(tmp_path)
    recs = [((float(i % 2),), (("user", f"u{i}", 1.0), ("tag", "t", 1.0), ("tag", "s", 1.0))[:1 + i % 3])
            for i in range(7)]
    with TestPipeline() as p:
        records = p | beam.Create([(feat.TRAIN, recs), (feat.EVAL, recs[:1])])
        written = records | transforms.WriteRecords(out, ("train", "eval", "valid"), 3, ("click",), ExampleKeys(),
                                                     multi_hot=True)
        assert_that(written["files"] | beam.Map(lambda fs: [os.path.relpath(f, out) for f in fs]), equal_to([[
            f"{s}/part-0000{i}-of-00003.tfrecord.gz" for s in ("eval", "train", "valid") for i in range(3)]]),
            label="files")
        stats = written["stats"] | beam.CombineGlobally(transforms.MergeStats())
        # Most features: 3 (i = 2, 5); most repeated fields: record 5 holds tag twice -> 1.
        assert_that(stats, equal_to([{"train.written": 7, "train.positives.0": 3.0, "train.max_features": 3,
                                      "train.max_repeats": 1, "eval.written": 1, "eval.positives.0": 0.0,
                                      "eval.max_features": 1, "eval.max_repeats": 0}]), label="stats")
    # One bundle: record i went to file i mod 3; valid got no records, so three empty files.
    sizes = [len(_examples_of(os.path.join(out, "train", f"part-0000{i}-of-00003.tfrecord.gz"))) for i in range(3)]
    assert sizes == [3, 2, 2]
    first = _examples_of(os.path.join(out, "train", "part-00000-of-00003.tfrecord.gz"))
    assert [list(e.features.feature["feat_hashes"].int64_list.value) for e in first] == [
        [feature_hash("user", f"u{i}")] + [feature_hash("tag", k) for k in ("t", "s")[:i % 3]] for i in (0, 3, 6)]
    assert [len(_examples_of(os.path.join(out, "valid", f"part-0000{i}-of-00003.tfrecord.gz"))) for i in range(3)] \
        == [0, 0, 0]
    assert not glob.glob(os.path.join(out, transforms.TMP + "*"))


def _examples_of(path):
    return [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset([path], compression_type="GZIP")]


class _Graph(beam.pipeline.PipelineVisitor):
    def __init__(self):
        self.nodes = []

    def visit_transform(self, node):
        self.nodes.append(node)


def _graph(cfg):
    p = beam.Pipeline()
    pipeline.build_pipeline(p, cfg)
    g = _Graph()
    p.visit(g)
    return g.nodes


@pytest.mark.parametrize("limit", [64 << 20, 0], ids=["side_input", "keyed"])
def test_records_stream_through_pardos_only(tmp_path, limit):
    """No GroupByKey, Flatten or side input computed from the data on the records' way; only a
    dictionary joined by key shuffles them (a CoGroupByKey inside ParseAndJoin)."""
    d, fmap, items = _join_inputs(tmp_path / "in", parquet=False)
    nodes = _graph(_join_config(d, fmap, items, limit))
    produced = {out: node for node in nodes for out in node.outputs.values()}
    records = {out for node in nodes for tag, out in node.outputs.items()
               if tag == transforms.RECORDS and isinstance(getattr(node.transform, "fn", None), transforms.LinesDoFn)}
    consumers = [node for node in nodes if set(node.inputs) & records]
    assert {c.full_label.split("/")[0] for c in consumers} == {"Statistics", "WriteRecords"}
    for c in consumers:
        assert isinstance(c.transform, beam.ParDo) and not c.side_inputs, c.full_label
    # Side inputs on the records' way are the packed dictionaries (read from files, not from the logs).
    for node in nodes:
        if node.full_label.startswith("ParseAndJoin") and node.side_inputs:
            for si in node.side_inputs:
                assert produced[si.pvalue].full_label.startswith(("PackFieldMap", "PackEntity_items")), node.full_label
    shuffles = sorted({n.full_label.split("/")[1] for n in nodes
                       if n.full_label.startswith("ParseAndJoin") and "GroupByKey" in type(n.transform).__name__})
    assert shuffles == ([] if limit else ["KeyedFieldMap", "KeyedTables"])


# ---------------------------------------------------------------- whole jobs

def test_hashed_records_and_vocabulary_hand_derived(tmp_path):
    train = tmp_path / "train.libffm"
    evalf = tmp_path / "eval.libffm"
    _write(train, [b"1 user:a:1 item:x:1", b"0 user:a:1 item:y:1", b"0 user:b:1 item:x:1",
                   b"not a line", b"1 user:a:1 item:x:0.5", b"0 user:a:1"])
    _write(evalf, [b"1 user:b:1 item:x:1", b"0 user:new:1 item:x:1"])
    out = str(tmp_path / "out")
    cfg = EtlConfig(input=str(train), eval_input=str(evalf), format="libffm", out=out, min_count=2,
                    num_shards=2, fields=(FieldConfig("user"), FieldConfig("item")))
    schema = _run(cfg)
    # user: a (4x) kept, b (1x) rare; item: x (3x) kept, y (1x) rare. Rows: user rare 0, a 1; item rare 2, x 3.
    assert [(f.name, f.offset, f.vocab_size) for f in schema.fields] == [("user", 0, 2), ("item", 2, 2)]
    assert schema.num_features == 4 and schema.vocabulary_mode == "build" and schema.version == 2
    assert schema.counts["train"] == {"read": 6, "written": 5, "dead_lettered": 1,
                                      "dead_letter_reasons": {parsing.BAD_LABEL: 1}}
    assert schema.counts["eval"] == {"read": 2, "written": 2, "dead_lettered": 0, "dead_letter_reasons": {}}
    assert set(schema.splits) == {"train", "eval"} and schema.fill_missing
    assert schema.labels[0].positives == 2 and abs(schema.labels[0].positive_rate - 0.4) < 1e-9
    # Two fields, one feature each (the layer adds a missing item): 2 features at most.
    assert schema.max_features_per_example == 2
    vocab = read_vocabulary(schema.vocabulary_file())
    assert [(v.field, v.key, v.index, v.count) for v in vocab] == [("user", "a", 1, 4), ("item", "x", 3, 3)]
    # Records hold every feature of the line, rare or not, with its value; nothing for missing fields.
    names = [("user", k) for k in ("a", "b", "new")] + [("item", k) for k in ("x", "y")]
    assert _named(out, "train", names) == sorted([
        (("user", "a", 1.0), ("item", "x", 1.0)), (("user", "a", 1.0), ("item", "y", 1.0)),
        (("user", "b", 1.0), ("item", "x", 1.0)), (("user", "a", 1.0), ("item", "x", 0.5)), (("user", "a", 1.0),)])
    assert _named(out, "eval", names) == [(("user", "b", 1.0), ("item", "x", 1.0)),
                                          (("user", "new", 1.0), ("item", "x", 1.0))]
    assert sorted(os.listdir(os.path.join(out, "train"))) == [f"part-0000{i}-of-00002.tfrecord.gz" for i in range(2)]
    assert [(d["reason"], d["line"]) for d in _dead(out, "train")] == [(parsing.BAD_LABEL, "not a line")]
    assert schema.warnings == ()


def test_generated_log_with_entity_join_and_bins(tiny_etl, tiny_raw):
    _, truth = tiny_raw
    schema = load_schema(tiny_etl)
    assert [f.name for f in schema.fields] == ["user", "item", "category", "brand", "price", "position", "hour",
                                               "device", "query"]
    assert schema.field("category").source == "dict:items"
    assert schema.field("position").linear_only
    price = schema.field("price")
    assert price.kind == "binned" and 5 <= len(price.bin_boundaries) <= 9
    assert all(a < b for a, b in zip(price.bin_boundaries, price.bin_boundaries[1:]))
    assert all(to_float32(b) == b for b in price.bin_boundaries)
    assert price.vocab_size <= 1 + len(price.bin_boundaries) + 1
    assert price.value_stats["min"] < price.bin_boundaries[0] and price.value_stats["count"] > 0
    for split, n in (("train", truth["config"]["n_train"]), ("eval", truth["config"]["n_eval"])):
        c = schema.counts[split]
        assert c["read"] == n == c["written"] + c["dead_lettered"]
    assert schema.sources["input_lines"] == truth["config"]["n_train"] + truth["config"]["n_eval"]
    assert schema.label_names == ("click", "conversion")
    # Every record holds the 6 log fields and, its item being in the table, the 3 joined ones.
    fields = {field_hash(f.name): f.name for f in schema.fields}
    ex = _examples(tiny_etl, "eval")[0]
    assert sorted(fields[fh] for fh, _, _ in _feats(ex)) == sorted(f.name for f in schema.fields)
    assert schema.max_features_per_example == 9 and schema.warnings == ()


def test_libfm_with_field_map_keeps_the_maps_field_order(tiny_raw, tmp_path):
    raw, _ = tiny_raw
    cfg = EtlConfig(input=os.path.join(raw, "train.libfm"), eval_input=os.path.join(raw, "eval.libfm"),
                    format="libfm", field_map=os.path.join(raw, "field_map.tsv"), labels=("click", "conversion"),
                    out=str(tmp_path / "fm"), num_shards=1)
    schema = _run(cfg)
    # The generator's field map lists user, item, position, hour, device, query in this order.
    assert [f.name for f in schema.fields] == ["user", "item", "position", "hour", "device", "query"]
    assert schema.counts["train"]["dead_lettered"] == 0


def test_dictionaries_join_by_key_above_the_side_input_limit_tsv_and_parquet(tmp_path):
    results = {}
    for name, parquet, limit in (("side_tsv", False, 64 << 20), ("keyed_tsv", False, 0), ("keyed_parquet", True, 0)):
        d, fmap, items = _join_inputs(tmp_path / name, parquet)
        cfg = _join_config(d, fmap, items, limit)
        schema = _run(cfg)
        out = cfg.out
        # Rows: user rare 0, u1 1, u2 2 (2x each: key order); item rare 3, i1 4 (2x), i2 5, i3 6;
        # category rare 7, c1 8 (2x), c2 9; price (numeric, one row) rare 10, price 11.
        assert [(f.name, f.offset, f.vocab_size) for f in schema.fields] == [
            ("user", 0, 3), ("item", 3, 4), ("category", 7, 3), ("price", 10, 2)], name
        assert schema.field("price").value_stats == {"count": 3.0, "mean": 40 / 3, "std": (200 - (40 / 3) ** 2) ** 0.5,
                                                     "min": 10.0, "max": 20.0}
        assert [(d["reason"], d["line"]) for d in _dead(out, "train")] == [(parsing.UNMAPPED_FEATURE, "0 u1:1 zz:1")]
        assert [(d["reason"], d["line"]) for d in _dead(out, "eval")] == [(parsing.UNMAPPED_FEATURE, "1 u3:1 i1:1")]
        names = [(f, k) for f, ks in (("user", ("u1", "u2")), ("item", ("i1", "i2", "i3")),
                                      ("category", ("c1", "c2")), ("price", ("price",))) for k in ks]
        results[name] = tuple(sorted(tuple(sorted(r)) for r in _named(out, split, names)) for split in ("train", "eval"))
    # Line i3 has no table row: no category, no price (the layer adds their missing rows).
    expected = (sorted(tuple(sorted(f)) for _, f in _JOINED),
                [tuple(sorted((("user", "u1", 1.0), ("item", "i2", 1.0), ("category", "c2", 1.0),
                               ("price", "price", 20.0))))])
    assert results == {"side_tsv": expected, "keyed_tsv": expected, "keyed_parquet": expected}


def test_fixed_and_extended_vocabulary_keep_old_rows(tmp_path):
    _write(tmp_path / "d1.libffm", [b"1 user:a:1 item:x:1", b"0 user:a:1 item:y:1", b"0 user:b:1 item:x:1",
                                    b"1 user:a:1 item:x:1"])
    _write(tmp_path / "d1e.libffm", [b"1 user:a:1 item:x:1"])
    _write(tmp_path / "d2.libffm", [b"1 user:b:1 item:z:1 query:q1:1", b"0 user:b:1 item:z:1 query:q1:1",
                                    b"1 user:c:1 item:x:1", b"0 user:a:1 item:z:1"])
    _write(tmp_path / "d2e.libffm", [b"0 user:b:1 item:x:1"])
    day1 = str(tmp_path / "day1")
    base = dict(format="libffm", min_count=2, num_shards=1, fields=(FieldConfig("user"), FieldConfig("item")))
    s1 = _run(EtlConfig(input=str(tmp_path / "d1.libffm"), eval_input=str(tmp_path / "d1e.libffm"), out=day1, **base))
    # Day 1: user rare 0, a 1 (3x); item rare 2, x 3 (3x).
    assert s1.num_features == 4
    day2 = dict(input=str(tmp_path / "d2.libffm"), eval_input=str(tmp_path / "d2e.libffm"), vocabulary=day1, **base)
    names = [("user", k) for k in "abc"] + [("item", k) for k in "xz"] + [("query", "q1")]

    fixed = str(tmp_path / "fixed")
    s2 = _run(EtlConfig(out=fixed, vocabulary_mode="fixed", **day2))
    assert (s2.vocabulary_mode, s2.base_num_features, s2.num_features) == ("fixed", 4, 4)
    assert [(v.key, v.index, v.count) for v in read_vocabulary(s2.vocabulary_file())] == [("a", 1, 3), ("x", 3, 3)]
    # The two lines with query, a field day 1 did not have, are dead-lettered when parsed.
    assert _named(fixed, "train", names) == [(("user", "a", 1.0), ("item", "z", 1.0)),
                                             (("user", "c", 1.0), ("item", "x", 1.0))]
    assert s2.counts["train"]["dead_letter_reasons"] == {parsing.UNKNOWN_FIELD: 2}

    extend = str(tmp_path / "extend")
    s3 = _run(EtlConfig(out=extend, vocabulary_mode="extend", **day2))
    # Old rows stay (counts add up); new frequent features are appended after row 3:
    # user b -> 4, item z -> 5, then the new field query: rare 6, q1 7. c (1x) is rare.
    assert (s3.vocabulary_mode, s3.base_num_features, s3.num_features) == ("extend", 4, 8)
    assert [(v.field, v.key, v.index, v.count) for v in read_vocabulary(s3.vocabulary_file())] == [
        ("user", "a", 1, 4), ("item", "x", 3, 4), ("user", "b", 4, 2), ("item", "z", 5, 3), ("query", "q1", 7, 2)]
    assert [(f.name, f.id, f.offset, f.vocab_size, f.extra_ranges) for f in s3.fields] == [
        ("user", 0, 0, 2, ((4, 1),)), ("item", 1, 2, 2, ((5, 1),)), ("query", 2, 6, 2, ())]
    assert len(_examples(extend, "train")) == 4 and s3.counts["train"]["dead_lettered"] == 0
    # A day-3 run can extend day 2's extended vocabulary: the schema round-trips its extra ranges.
    assert load_schema(extend).fields == s3.fields


# One line of every malformed kind the ETL can see in libffm input with integer field ids.
_BAD = {b"": parsing.EMPTY, b"1,0 0:u1:1 \xff\xfe:1": parsing.NON_UTF8, b"yes,0 0:u1:1": parsing.BAD_LABEL,
        b"1 0:u1:1": parsing.LABEL_COUNT, b"1,0 0:u1": parsing.BAD_TOKEN, b"1,0 0:u1:abc": parsing.BAD_VALUE,
        b"1,0 0:u1:nan": parsing.NON_FINITE, b"1,0 0:u2:inf": parsing.NON_FINITE,
        b"1,0 0:u1:1 0:u2:1": parsing.DUPLICATE_FIELD, b"1,0 3:x:1 0:u1:1": parsing.FIELD_OUT_OF_RANGE,
        b"1,0 0:u1:1 1:i1:1 2:q1:1 1:i2:1 0:u3:1": parsing.TOO_MANY_FEATURES, b"1,0": parsing.NO_FEATURES}


def _mixed_input(tmp_path):
    """30 good lines (10 users x 3) with the 12 bad ones interleaved."""
    good = [f"{u % 2},0 0:u{u}:1 1:i{(u * 7 + j) % 5}:1 2:q{j}:1".encode() for u in range(10) for j in range(3)]
    bad = list(_BAD)
    lines = []
    for i, g in enumerate(good):
        lines.append(g)
        if i % 2 == 0 and i // 2 < len(bad):
            lines.append(bad[i // 2])
    path = tmp_path / "mixed.libffm"
    if not path.exists():
        _write(path, lines)
    return str(path), lines, good


def _mixed_config(path, out):
    return EtlConfig(input=path, format="libffm", labels=("click", "conversion"), out=out, field_ids="index",
                     max_features=4, min_count=1, num_shards=2, split_key="user", eval_percent=50,
                     fields=(FieldConfig("user"), FieldConfig("item"), FieldConfig("query")))


def _check_mixed(schema, out, lines, good):
    total = {k: sum(schema.counts[s][k] for s in ("train", "eval")) for k in ("read", "written", "dead_lettered")}
    assert total == {"read": len(lines), "written": len(good), "dead_lettered": len(_BAD)} == {
        "read": 42, "written": 30, "dead_lettered": 12}
    assert schema.sources["input_lines"] == 42
    for s in ("train", "eval"):
        c = schema.counts[s]
        assert c["read"] == c["written"] + c["dead_lettered"] == c["written"] + sum(c["dead_letter_reasons"].values())
    dead = _dead(out, "train") + _dead(out, "eval")
    assert {base64.b64decode(d["line_b64"]): d["reason"] for d in dead} == _BAD and len(dead) == len(_BAD)
    # All lines of a user land in the split given by the hash of its user feature.
    user_of = {feature_hash("user", f"u{u}"): f"u{u}" for u in range(10)}
    for split in ("train", "eval"):
        for ex in _examples(out, split):
            h = {fh: h for fh, h, _ in _feats(ex)}[field_hash("user")]
            assert ("eval" if feature_hash("user", user_of[h]) % 100 < 50 else "train") == split
    assert schema.counts["train"]["written"] == 3 * sum(feature_hash("user", f"u{u}") % 100 >= 50 for u in range(10))


def test_every_malformed_kind_is_dead_lettered_and_counted(tmp_path):
    path, lines, good = _mixed_input(tmp_path)
    cfg = _mixed_config(path, str(tmp_path / "out"))
    _check_mixed(_run(cfg), cfg.out, lines, good)


@pytest.mark.slow
def test_every_malformed_kind_is_dead_lettered_with_multi_processing(tmp_path):
    from apache_beam.options.pipeline_options import PipelineOptions

    path, lines, good = _mixed_input(tmp_path)
    cfg = _mixed_config(path, str(tmp_path / "out_mp"))
    options = PipelineOptions(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    _check_mixed(_run(cfg, options), cfg.out, lines, good)


def test_valid_split_carved_by_hash_or_read_from_its_own_input(tmp_path):
    lines = [f"{i % 2} user:u{i % 40}:1 item:i{i % 7}:1".encode() for i in range(600)]
    _write(tmp_path / "train.libffm", lines)
    _write(tmp_path / "eval.libffm", lines[:10])
    base = dict(input=str(tmp_path / "train.libffm"), format="libffm", min_count=1, num_shards=2,
                fields=(FieldConfig("user"), FieldConfig("item")))
    carved = _run(EtlConfig(out=str(tmp_path / "carved"), valid_fraction=0.25, **base))
    # Eval: the line hash's last two digits < 20; valid: of the rest, digits 3-6 < 2500.
    expected = {s: [raw for raw in lines if feat.line_split(raw, 20, 2500) == i] for i, s in enumerate(pipeline.SPLITS)}
    assert {s: carved.counts[s]["written"] for s in pipeline.SPLITS} == {s: len(v) for s, v in expected.items()}
    assert 0.15 < len(expected["valid"]) / len(expected["train"] + expected["valid"]) < 0.35
    assert set(carved.splits) == set(pipeline.SPLITS) and carved.splits["valid"]["examples"] == len(expected["valid"])
    names = [("user", f"u{u}") for u in range(40)] + [("item", f"i{i}") for i in range(7)]

    def as_records(raws):
        return sorted((("user", r.split()[1].split(b":")[1].decode(), 1.0), ("item", r.split()[2].split(b":")[1].decode(),
                                                                          1.0)) for r in raws)
    assert _named(str(tmp_path / "carved"), "valid", names) == as_records(expected["valid"])
    # The vocabulary counts the train split only.
    counts = {(v.field, v.key): v.count for v in read_vocabulary(carved.vocabulary_file())}
    assert sum(n for (f, _), n in counts.items() if f == "user") == len(expected["train"])
    # Stable across runs, and with eval from its own file the carve takes the same lines of the input.
    again = _run(EtlConfig(out=str(tmp_path / "again"), valid_fraction=0.25, **base))
    assert _named(str(tmp_path / "again"), "valid", names) == as_records(expected["valid"])
    assert again.counts == carved.counts
    by_path = _run(EtlConfig(out=str(tmp_path / "by_path"), eval_input=str(tmp_path / "eval.libffm"),
                             valid_fraction=0.25, **base))
    assert by_path.counts["valid"]["written"] == sum(feat.line_split(raw, 0, 2500) == feat.VALID for raw in lines)
    assert by_path.counts["eval"]["written"] == 10
    given = _run(EtlConfig(out=str(tmp_path / "given"), valid_input=str(tmp_path / "eval.libffm"), **base))
    assert given.counts["valid"] == {"read": 10, "written": 10, "dead_lettered": 0, "dead_letter_reasons": {}}
    assert _named(str(tmp_path / "given"), "valid", names) == as_records(lines[:10])


def test_fields_tsv_names_integer_field_ids_and_marks_continuous_ones(tmp_path, capsys):
    # libffm with integer field ids; fields 2 and 3 carry numbers in line (the key is ignored).
    (tmp_path / "fields.tsv").write_text("field\tname\tkind\tnum_bins\ttransform\n"
                                         "0\tuser\tcategorical\t\t\n1\tad\tcategorical\t\t\n"
                                         "2\tage\tbinned\t2\t\n3\tincome\tnumeric\t\tlog1p\n")
    lines = [b"1 0:u1:1 1:a1:1 2:0:30 3:0:0", b"0 0:u2:1 1:a1:1 2:0:40 3:0:3", b"1 0:u1:1 1:a2:1 2:0:50",
             b"0 0:u2:1 1:a1:1 2:0:60 3:0:3", b"1 0:u1:1 1:a1:1 4:x:1"]
    _write(tmp_path / "train.libffm", lines)
    _write(tmp_path / "eval.libffm", [b"1 0:u3:1 2:1:35.5"])
    out = str(tmp_path / "out")
    schema = pipeline.run(["--input", str(tmp_path / "train.libffm"), "--eval_input", str(tmp_path / "eval.libffm"),
                           "--fields_tsv", str(tmp_path / "fields.tsv"), "--out", out, "--set", "min_count=1",
                           "--set", "num_shards=1"])
    assert schema.sources["config"]["field_ids"] == "index"
    assert [(f.name, f.kind, f.transform) for f in schema.fields] == [
        ("user", "categorical", "none"), ("ad", "categorical", "none"), ("age", "binned", "none"),
        ("income", "numeric", "log1p")]
    # age: 30, 40, 50, 60 in 2 bins: first rank > 3/2 -> edge 40. income: log1p of 0, 3, 3.
    assert schema.field("age").bin_boundaries == (40.0,)
    ln4 = math.log(4.0)
    assert schema.field("income").value_stats == pytest.approx(
        {"count": 3.0, "mean": 2 * ln4 / 3, "std": math.sqrt(2 * ln4 ** 2 / 3 - (2 * ln4 / 3) ** 2), "min": 0.0,
         "max": ln4})
    assert schema.counts["train"]["dead_letter_reasons"] == {parsing.FIELD_OUT_OF_RANGE: 1}
    names = [("user", "u3"), ("age", "age")]
    assert _named(out, "eval", names) == [(("user", "u3", 1.0), ("age", "age", 35.5))]


def test_a_field_with_one_used_row_is_warned_about(tmp_path, capsys):
    _write(tmp_path / "train.libffm", [b"1 user:a:1 device:d1:1", b"0 user:b:1 device:d1:1", b"1 user:a:1 device:d1:1"])
    _write(tmp_path / "eval.libffm", [b"1 user:a:1 device:d2:1 shop:s:1"])
    out = str(tmp_path / "out")
    schema = pipeline.run(["--input", str(tmp_path / "train.libffm"), "--eval_input", str(tmp_path / "eval.libffm"),
                           "--out", out, "--set", "min_count=1"])
    # device is d1 in every training line; shop appears in eval only (its rare row, the missing one in training).
    assert [w.split(":")[0] for w in schema.warnings] == ["field 'device'", "field 'shop'"]
    assert [f.name for f in schema.fields] == ["device", "shop", "user"]
    printed = capsys.readouterr().out
    assert all(f"etl: warning: {w}" in printed for w in schema.warnings)


def test_make_etl_output_is_the_jobs_own_lines_only(tmp_path):
    _write(tmp_path / "train.libffm", [b"1 user:a:1", b"0 user:b:1"])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "etl.pipeline", "--input", str(tmp_path / "train.libffm"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout and all(line.startswith("etl: ") for line in proc.stdout.splitlines())


@pytest.mark.slow
def test_rerun_replaces_outputs_and_a_failed_run_leaves_them(tmp_path, capsys):
    path, lines, good = _mixed_input(tmp_path)
    out = str(tmp_path / "out")
    args = ["--input", path, "--format", "libffm", "--labels", "click,conversion", "--out", out,
            "--set", "field_ids=index", "--set", "max_features=4", "--set", "min_count=1",
            "--set", "fields=[{name: user}, {name: item}, {name: query}]"]
    pipeline.run(args + ["--set", "num_shards=3"])
    assert len(glob.glob(os.path.join(out, "train", "part-*"))) == 3
    # The rerun writes one shard per split; none of the three earlier shards may survive. It runs
    # on the BundleBasedDirectRunner, which lost counters of DoFns with side inputs: they are
    # published from the job's stats, so they print there too.
    schema = pipeline.run(args + ["--set", "num_shards=1", "--runner=BundleBasedDirectRunner"])
    assert sorted(os.listdir(os.path.join(out, "train"))) == ["part-00000-of-00001.tfrecord.gz"]
    assert not glob.glob(os.path.join(out, pipeline.STAGING_PREFIX + "*"))
    printed = capsys.readouterr().out
    assert f"etl: counter input.read = {len(lines)}" in printed
    assert "etl: input lines 42 = train read + eval read 42 [ok]" in printed
    before = {p: open(p, "rb").read() for p in glob.glob(os.path.join(out, "**", "*"), recursive=True)
              if os.path.isfile(p)}
    # A run that fails inside the job (an entity table row with a missing cell) publishes nothing.
    bad_table = tmp_path / "items.tsv"
    bad_table.write_text("item\tcategory\ni1\n")
    with pytest.raises(Exception, match="has 1 cells"):
        pipeline.run(args + ["--set", f"entity_tables=[{{name: items, path: '{bad_table}', key_field: item}}]"])
    after = {p: open(p, "rb").read() for p in glob.glob(os.path.join(out, "**", "*"), recursive=True)
             if os.path.isfile(p) and pipeline.STAGING_PREFIX not in p}
    assert after == before
    assert load_schema(out).counts == schema.counts


def test_background_writes_keep_order_bound_the_queue_and_reraise():
    out, started = [], []

    def write(i):
        started.append(i)
        if i == 7:
            raise OSError("disk full")
        out.append(i)

    writes = transforms._BackgroundWrites(depth=2)
    for i in range(5):
        writes.submit(write, i)
        assert len(writes._pending) <= 2
    writes.drain()
    assert out == [0, 1, 2, 3, 4]  # one thread, in submission order
    writes.submit(write, 7)
    writes.submit(write, 8)
    with pytest.raises(OSError, match="disk full"):
        writes.drain()
    writes.close()
    assert out == [0, 1, 2, 3, 4, 8] and started == [0, 1, 2, 3, 4, 7, 8]
