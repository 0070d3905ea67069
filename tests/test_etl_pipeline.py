"""Beam ETL on the DirectRunner: transforms with TestPipeline/assert_that and whole jobs."""
from __future__ import annotations

import base64
import glob
import json
import os

import apache_beam as beam
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from etl import parsing, pipeline, transforms
from etl.config import EtlConfig, FieldConfig
from feature_schema import feature_hash, field_hash, load_schema, read_vocabulary


def _reasons(records):
    return sorted(json.loads(r)["reason"] for _, r in records)


def _write(path, lines):
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")


def _read_examples(out, split):
    files = sorted(glob.glob(os.path.join(out, split, "part-*.tfrecord.gz")))
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP")
    return [tf.train.Example.FromString(r.numpy()) for r in ds]


def _ids(out, split):
    """Sorted per-record tuples of vocabulary rows, as the featurization layer maps the records
    (a record's own features in order, then its missing fields' rare rows)."""
    from trainer import data

    out_rows = []
    for features, _, _ in data.make_dataset(load_schema(out), split, 1024):
        ids = features["ids"]
        per = [[] for _ in range(int(ids.dense_shape[0]))]
        for (b, _), r in zip(ids.indices.numpy(), ids.values.numpy()):
            per[b].append(int(r))
        out_rows.extend(tuple(p) for p in per)
    return sorted(out_rows)


def _dead(out, split):
    return [json.loads(line) for path in glob.glob(os.path.join(out, "dead_letter", f"{split}-*"))
            for line in open(path, encoding="utf-8") if line.strip()]


def _run(cfg, options=None):
    with beam.Pipeline(options=options) as p:
        pipeline.build_pipeline(p, cfg)
    return pipeline.write_schema(cfg)


def test_lines_dofn_routes_each_malformed_line_to_dead_letter():
    cfg = EtlConfig(input="unused", format="libffm", labels=("click", "conversion"), max_features=3,
                    strict_fields=True, fields=(FieldConfig("user"), FieldConfig("item")))
    plan = pipeline.plan_job(cfg)
    lines = [b"1,0 user:a:1 item:x:2", b"", b"1,0 user:a:1 \xff", b"x,0 user:a:1", b"1 user:a:1",
             b"1,0 user:a", b"1,0 user:a:nan", b"1,0 user:a:1 user:b:1", b"1,0 shop:s:1",
             b"1,0 user:a:1 item:x:1 item:y:1 item:z:1", b"1,0", b"1,0 item:y:z", b"0,0 item:y:1"]
    with TestPipeline() as p:
        out = transforms.run_lines(p | beam.Create([lines]), "Lines", transforms.LinesDoFn(plan.spec, source_split=0))
        assert_that(out.train, equal_to([[(b"1,0 user:a:1 item:x:2", (1.0, 0.0), (("user", "a", 1.0), ("item", "x", 2.0))),
                                          (b"0,0 item:y:1", (0.0, 0.0), (("item", "y", 1.0),))]]), label="good")
        assert_that(out.dead | beam.combiners.ToList() | beam.Map(_reasons), equal_to([sorted([
            parsing.EMPTY, parsing.NON_UTF8, parsing.BAD_LABEL, parsing.LABEL_COUNT, parsing.BAD_TOKEN,
            parsing.NON_FINITE, parsing.DUPLICATE_FIELD, parsing.UNKNOWN_FIELD, parsing.TOO_MANY_FEATURES,
            parsing.NO_FEATURES, parsing.BAD_VALUE])]), label="dead")
        # Per bundle sums of the training split: one element per distinct feature.
        assert_that(out.counts, equal_to([(("user", "a"), 1), (("item", "x"), 1), (("item", "y"), 1)]), label="counts")
        stats = out.stats | beam.CombineGlobally(transforms.MergeStats())
        assert_that(stats | beam.Map(lambda d: (d["input.read"], d["train.read"], d["train.dead_lettered"])),
                    equal_to([(13, 13, 11)]), label="stats")


def test_dead_letter_keeps_exact_raw_bytes():
    rec = json.loads(transforms.dead_letter("train", b"1 a:\xff\n", "non_utf8", "x"))
    assert base64.b64decode(rec["line_b64"]) == b"1 a:\xff\n"
    assert rec["line"] == "1 a:\\xff" and rec["reason"] == "non_utf8" and rec["split"] == "train"


def test_bins_and_value_stats_from_weighted_values():
    # price 1..100 once each; "w" has 10 three times and 20 once.
    values = [(("price", float(v)), 1) for v in range(1, 101)] + [(("w", 10.0), 3), (("w", 20.0), 1)]
    with TestPipeline() as p:
        pc = p | beam.Create(values)
        bounds = pc | transforms.ComputeBinBoundaries({"price": 4, "w": 2})
        stats = pc | transforms.ValueStats()
        # Quartiles of 1..100: edges 25, 50, 75 (exact on this small input); w's median is 10 -> one edge.
        assert_that(bounds, equal_to([("price", (25.0, 50.0, 75.0)), ("w", (10.0,))]), label="bounds")
        # w: mean (3*10 + 20) / 4 = 12.5, variance (3 * 2.5**2 + 7.5**2) / 4 = 18.75.
        assert_that(stats | beam.Filter(lambda kv: kv[0] == "w"),
                    equal_to([("w", {"count": 4.0, "mean": 12.5, "std": 18.75 ** 0.5, "min": 10.0, "max": 20.0})]),
                    label="stats")


def test_keyed_lookup_joins_by_key():
    pending = [("l1", (b"r1", 0, (1.0,), (("item", "i1", 1.0), ("item", "i2", 1.0)))),
               ("l2", (b"r2", 1, (0.0,), (("item", "i3", 1.0),))),
               ("l3", (b"r3", 0, (0.0,), (("item", "i1", 1.0),)))]
    table = [((0, "i1"), "c1"), ((0, "i2"), "c2"), ((0, "i9"), "c9")]
    with TestPipeline() as p:
        found = ((p | "P" >> beam.Create(pending), p | "T" >> beam.Create(table))
                 | transforms.KeyedLookup(transforms.EntityKeys([(0, "item")]), "Lookup"))
        assert_that(found, equal_to([(pending[0][1], {(0, "i1"): "c1", (0, "i2"): "c2"}),
                                     (pending[1][1], {}),  # i3 is not in the table
                                     (pending[2][1], {(0, "i1"): "c1"})]))


def test_rare_ids_vocabulary_and_sparse_examples_hand_derived(tmp_path):
    train = tmp_path / "train.libffm"
    evalf = tmp_path / "eval.libffm"
    _write(train, [b"1 user:a:1 item:x:1", b"0 user:a:1 item:y:1", b"0 user:b:1 item:x:1",
                   b"not a line", b"1 user:a:1 item:x:1", b"0 user:a:1"])
    _write(evalf, [b"1 user:b:1 item:x:1", b"0 user:new:1 item:x:1"])
    out = str(tmp_path / "out")
    cfg = EtlConfig(input=str(train), eval_input=str(evalf), format="libffm", out=out, min_count=2,
                    num_shards=1, fields=(FieldConfig("user"), FieldConfig("item")))
    schema = _run(cfg)
    # user: a (4x) kept, b (1x) rare; item: x (3x) kept, y (1x) rare. Rows: user rare 0, a 1; item rare 2, x 3.
    assert [(f.name, f.offset, f.vocab_size) for f in schema.fields] == [("user", 0, 2), ("item", 2, 2)]
    assert schema.num_features == 4 and schema.vocabulary_mode == "build"
    assert schema.counts["train"] == {"read": 6, "written": 5, "dead_lettered": 1,
                                      "dead_letter_reasons": {parsing.BAD_LABEL: 1}}
    assert schema.counts["eval"] == {"read": 2, "written": 2, "dead_lettered": 0, "dead_letter_reasons": {}}
    assert schema.labels[0].positives == 2 and abs(schema.labels[0].positive_rate - 0.4) < 1e-9
    vocab = read_vocabulary(schema.vocabulary_file())
    assert [(v.field, v.key, v.index, v.count) for v in vocab] == [("user", "a", 1, 4), ("item", "x", 3, 3)]
    # The last line has no item: the missing field is filled with item's rare id 2.
    assert _ids(out, "train") == sorted([(1, 3), (1, 2), (0, 3), (1, 3), (1, 2)])
    assert _ids(out, "eval") == [(0, 3), (0, 3)]  # b and the unseen "new" are both user-rare
    assert [(d["reason"], d["line"]) for d in _dead(out, "train")] == [(parsing.BAD_LABEL, "not a line")]


def test_generated_log_with_entity_join_and_bins(tiny_etl, tiny_raw):
    _, truth = tiny_raw
    schema = load_schema(tiny_etl)
    assert [f.name for f in schema.fields] == ["user", "item", "category", "brand", "price", "position", "hour",
                                               "device", "query"]
    assert schema.field("category").source == "dict:items"
    assert schema.field("position").linear_only
    price = schema.field("price")
    # Up to 9 edges for 10 bins; tied quantiles (popular items share a price) merge.
    assert price.kind == "binned" and 5 <= len(price.bin_boundaries) <= 9
    assert all(a < b for a, b in zip(price.bin_boundaries, price.bin_boundaries[1:]))
    assert price.vocab_size <= 1 + len(price.bin_boundaries) + 1
    assert price.value_stats["min"] < price.bin_boundaries[0] and price.value_stats["count"] > 0
    for split, n in (("train", truth["config"]["n_train"]), ("eval", truth["config"]["n_eval"])):
        c = schema.counts[split]
        assert c["read"] == n == c["written"] + c["dead_lettered"]
    assert schema.sources["input_lines"] == truth["config"]["n_train"] + truth["config"]["n_eval"]
    assert schema.label_names == ("click", "conversion")
    # Every record carries its log fields and, when the item is in the table, the 3 joined columns.
    ex = _read_examples(tiny_etl, "eval")[0]
    assert sorted(ex.features.feature["feat_field_hashes"].int64_list.value) == sorted(
        field_hash(f.name) for f in schema.fields)


def test_libfm_with_field_map_keeps_the_maps_field_order(tiny_raw, tmp_path):
    raw, _ = tiny_raw
    cfg = EtlConfig(input=os.path.join(raw, "train.libfm"), eval_input=os.path.join(raw, "eval.libfm"),
                    format="libfm", field_map=os.path.join(raw, "field_map.tsv"), labels=("click", "conversion"),
                    out=str(tmp_path / "fm"), num_shards=1)
    schema = _run(cfg)
    # The generator's field map lists user, item, position, hour, device, query in this order.
    assert [f.name for f in schema.fields] == ["user", "item", "position", "hour", "device", "query"]
    assert schema.counts["train"]["dead_lettered"] == 0


class _Labels(beam.pipeline.PipelineVisitor):
    def __init__(self):
        self.labels = []

    def enter_composite_transform(self, node):
        self.labels.append(node.full_label)

    def visit_transform(self, node):
        self.labels.append(node.full_label)


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


def test_dictionaries_join_by_key_above_the_side_input_limit_tsv_and_parquet(tmp_path):
    from etl.config import EntityTableConfig

    results = {}
    for name, parquet, limit in (("side_tsv", False, 64 << 20), ("keyed_tsv", False, 0), ("keyed_parquet", True, 0)):
        d, fmap, items = _join_inputs(tmp_path / name, parquet)
        cfg = EtlConfig(input=str(d / "train.libfm"), eval_input=str(d / "eval.libfm"), format="libfm", field_map=fmap,
                        out=str(d / "out"), min_count=1, num_shards=1, side_input_max_bytes=limit,
                        fields=(FieldConfig("user"), FieldConfig("item"), FieldConfig("category"),
                                FieldConfig("price", kind="numeric")),
                        entity_tables=(EntityTableConfig(name="items", path=items, key_field="item"),))
        p = beam.Pipeline()
        pipeline.build_pipeline(p, cfg)
        visitor = _Labels()
        p.visit(visitor)
        keyed = {k for k in ("KeyedFieldMap/CoGroupByKey", "KeyedTables/CoGroupByKey")
                 if any(label.startswith(k) for label in visitor.labels)}
        assert keyed == (set() if limit else {"KeyedFieldMap/CoGroupByKey", "KeyedTables/CoGroupByKey"}), name
        if limit:  # the side-input path runs in the other job tests; here only its graph is checked
            continue
        p.run().wait_until_finish()
        schema = pipeline.write_schema(cfg)
        out = cfg.out
        results[name] = (_ids(out, "train"), _ids(out, "eval"))
        # Rows: user rare 0, u1 1, u2 2 (2x each: key order); item rare 3, i1 4 (2x), i2 5, i3 6;
        # category rare 7, c1 8 (2x), c2 9; price (numeric, one row) rare 10, price 11.
        assert [(f.name, f.offset, f.vocab_size) for f in schema.fields] == [
            ("user", 0, 3), ("item", 3, 4), ("category", 7, 3), ("price", 10, 2)], name
        assert schema.field("price").value_stats == {"count": 3.0, "mean": 40 / 3, "std": (200 - (40 / 3) ** 2) ** 0.5,
                                                     "min": 10.0, "max": 20.0}
        assert [(d["reason"], d["line"]) for d in _dead(out, "train")] == [(parsing.UNMAPPED_FEATURE, "0 u1:1 zz:1")]
        assert [(d["reason"], d["line"]) for d in _dead(out, "eval")] == [(parsing.UNMAPPED_FEATURE, "1 u3:1 i1:1")]
        vals = sorted(tuple(e.features.feature["feat_vals"].float_list.value) for e in _read_examples(out, "train"))
        # Records hold the raw price (the layer scales it); the i3 line has no table row, so no columns.
        assert vals == [(1.0, 1.0), (1.0, 1.0, 1.0, 10.0), (1.0, 1.0, 1.0, 10.0), (1.0, 1.0, 1.0, 20.0)]
    # Line i3 has no table row: category and price are missing -> their rare rows 7 and 10.
    expected = (sorted([(1, 4, 8, 11), (2, 5, 9, 11), (1, 6, 7, 10), (2, 4, 8, 11)]), [(1, 5, 9, 11)])
    assert results == {"keyed_tsv": expected, "keyed_parquet": expected}


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

    fixed = str(tmp_path / "fixed")
    s2 = _run(EtlConfig(out=fixed, vocabulary_mode="fixed", **day2))
    assert (s2.vocabulary_mode, s2.base_num_features, s2.num_features) == ("fixed", 4, 4)
    assert [(v.key, v.index, v.count) for v in read_vocabulary(s2.vocabulary_file())] == [("a", 1, 3), ("x", 3, 3)]
    # b, c -> user rare 0; z -> item rare 2; the two lines with the new field query are dead-lettered.
    assert _ids(fixed, "train") == [(0, 3), (1, 2)] and _ids(fixed, "eval") == [(0, 3)]
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
    assert _ids(extend, "train") == sorted([(4, 5, 7), (4, 5, 7), (0, 3, 6), (1, 5, 6)])
    assert _ids(extend, "eval") == [(4, 3, 6)]
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
        for ex in _read_examples(out, split):
            f = ex.features.feature
            h = dict(zip(f["feat_field_hashes"].int64_list.value, f["feat_hashes"].int64_list.value))[field_hash("user")]
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


@pytest.mark.slow
def test_rerun_replaces_outputs_and_a_failed_run_leaves_them(tmp_path, capsys):
    from etl.config import EntityTableConfig  # noqa: F401 - the failing run's table comes from --set

    path, lines, good = _mixed_input(tmp_path)
    out = str(tmp_path / "out")
    args = ["--input", path, "--format", "libffm", "--labels", "click,conversion", "--out", out,
            "--set", "field_ids=index", "--set", "max_features=4", "--set", "min_count=1",
            "--set", "fields=[{name: user}, {name: item}, {name: query}]"]
    pipeline.run(args + ["--set", "num_shards=3"])
    assert len(glob.glob(os.path.join(out, "train", "part-*"))) == 3
    # The rerun writes one shard per split; none of the three earlier shards may survive. It runs
    # on the BundleBasedDirectRunner, which lost counters of DoFns with side inputs: they are
    # now published from the job's stats, so they print there too.
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
