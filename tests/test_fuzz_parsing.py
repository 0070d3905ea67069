"""Property-based tests of the line parser and an accounting check of the whole ETL on garbage.

The parser either returns a parsed line or raises ``ParseError`` with a known
reason: no other exception, whatever the bytes. Valid lines round-trip
exactly. On a file mixing valid lines with truncations, random bytes, wrong
separators, NaN/inf and huge tokens, the Beam job accounts for every line:
read = written + dead-lettered, and each dead letter names a known reason.
"""
from __future__ import annotations

import glob
import json
import math
import os
import random

import apache_beam as beam
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etl import parsing, pipeline
from etl.config import EtlConfig, FieldConfig
from etl.parsing import Feature, ParseError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_key = st.text(st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc"), blacklist_characters=":,"),
               min_size=1, max_size=12).filter(lambda s: s.split() == [s])
_value = st.floats(allow_nan=False, allow_infinity=False, width=32)
_label = st.sampled_from(["0", "1", "-1"])


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(["libfm", "libffm"]), st.integers(1, 3))
def test_arbitrary_bytes_parse_or_raise_parse_error(raw, fmt, num_labels):
    try:
        parsed = parsing.parse_line(raw, fmt, num_labels=num_labels, max_features=50)
    except ParseError as e:
        assert e.reason in parsing.REASONS
        return
    assert len(parsed.labels) == num_labels
    assert all(math.isfinite(f.value) for f in parsed.features)


@FUZZ
@given(st.lists(_label, min_size=1, max_size=3),
       st.lists(st.tuples(_key, _key, _value), min_size=1, max_size=20),
       st.sampled_from([" ", "\t"]))
def test_valid_libffm_lines_round_trip_exactly(labels, feats, sep):
    line = ",".join(labels) + sep + sep.join(f"{f}:{k}:{v!r}" for f, k, v in feats)
    parsed = parsing.parse_line(line.encode("utf-8") + b"\n", "libffm", num_labels=len(labels))
    assert parsed.labels == tuple(1.0 if lab == "1" else 0.0 for lab in labels)
    assert parsed.features == tuple(Feature(f, k, v) for f, k, v in feats)


@FUZZ
@given(st.lists(st.tuples(_key, _value), min_size=1, max_size=20))
def test_valid_libfm_lines_round_trip_exactly(feats):
    line = "-1 " + " ".join(f"{k}:{v!r}" for k, v in feats)
    parsed = parsing.parse_line(line, "libfm")
    assert parsed.labels == (0.0,)
    assert parsed.features == tuple(Feature(None, k, v) for k, v in feats)


def _mutations(rng: random.Random, good: bytes) -> bytes:
    kind = rng.randrange(9)
    if kind == 0:
        return good[: rng.randrange(len(good))]  # truncated
    if kind == 1:
        i = rng.randrange(len(good))
        return good[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 4))) + good[i:]
    if kind == 2:
        return good.replace(b":", rng.choice([b";", b"=", b"::", b""]), 1)  # wrong separators
    if kind == 3:
        return good.replace(b":1", rng.choice([b":nan", b":inf", b":-inf", b":1e999", b":x"]), 1)
    if kind == 4:
        return good.replace(b"user:", b"user:" + b"9" * rng.randint(20, 200), 1)  # huge id: a valid string key
    if kind == 5:
        return good.replace(b"1,", b"yes,", 1) if good.startswith(b"1,") else b"," + good
    if kind == 6:
        return b"x" * rng.randint(0, 3)
    if kind == 7:
        return good + b" item:i1:1"  # duplicate field
    return good.replace(b"query:", b"shop:", 1)  # field not declared


def test_etl_accounts_for_every_fuzzed_line(tmp_path):
    rng = random.Random(20261127)
    lines = []
    for i in range(600):
        good = (f"{rng.randint(0, 1)},0 user:u{rng.randint(0, 30)}:1 item:i{rng.randint(0, 20)}:1 "
                f"query:q{rng.randint(0, 5)}:{rng.choice(['1', '0.5', '2.25'])}").encode()
        lines.append(good if rng.random() < 0.5 else _mutations(rng, good))
    lines = [line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines]  # one record per line
    src = tmp_path / "fuzz.libffm"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = str(tmp_path / "out")
    cfg = EtlConfig(input=str(src), eval_percent=25, format="libffm", labels=("click", "conversion"), out=out,
                    min_count=2, num_shards=2, strict_fields=True,
                    fields=(FieldConfig("user"), FieldConfig("item"), FieldConfig("query")))
    with beam.Pipeline() as p:
        pipeline.build_pipeline(p, cfg)
    schema = pipeline.write_schema(cfg)
    expected_ok = 0
    for line in lines:
        try:
            parsed = parsing.parse_line(line, "libffm", num_labels=2)
            parsing.check_fields(parsed.features, {"user", "item", "query"})
            expected_ok += 1
        except ParseError:
            pass
    total = {k: sum(schema.counts[s][k] for s in ("train", "eval")) for k in ("read", "written", "dead_lettered")}
    assert total["read"] == len(lines) == total["written"] + total["dead_lettered"]
    assert total["written"] == expected_ok
    dead = [json.loads(rec) for path in glob.glob(os.path.join(out, "dead_letter", "*"))
            for rec in open(path, encoding="utf-8") if rec.strip()]
    assert len(dead) == total["dead_lettered"]
    assert {d["reason"] for d in dead} <= set(parsing.REASONS)
