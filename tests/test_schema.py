"""The schema artifact: JSON round trip and the layout checks every stage relies on."""
from __future__ import annotations

import json

import pytest

from feature_schema import ExampleKeys, FieldSpec, LabelSpec, Schema, VocabEntry, load_schema, read_vocabulary, \
    write_vocabulary_lines


def _schema(**kw):
    fields = (FieldSpec("user", 0, "categorical", 0, 3, 0),
              FieldSpec("price", 1, "binned", 3, 4, 3, bin_boundaries=(1.0, 2.5, 7.0)),
              FieldSpec("position", 2, "categorical", 7, 2, 7, linear_only=True))
    args = dict(fields=fields, labels=(LabelSpec("click", 0.1, 10),), num_features=9,
                max_features_per_example=3, splits={"train": {"files": ["train/part-*"], "examples": 100}})
    args.update(kw)
    return Schema(**args)


def test_round_trip(tmp_path):
    s = _schema()
    (tmp_path / "schema.json").write_text(s.to_json())
    loaded = load_schema(str(tmp_path))
    assert loaded == s
    assert loaded.num_fields == 3 and loaded.rare_ids == (0, 3, 7) and loaded.linear_only_field_ids == (2,)
    assert loaded.field("price").bin_boundaries == (1.0, 2.5, 7.0)
    assert loaded.split_files("train") == [str(tmp_path / "train/part-*")]


def test_layout_errors():
    with pytest.raises(ValueError, match="num_features"):
        _schema(num_features=10)
    with pytest.raises(ValueError, match="gap"):
        _schema(fields=(FieldSpec("user", 0, "categorical", 0, 3, 0), FieldSpec("item", 1, "categorical", 4, 5, 4)))
    with pytest.raises(ValueError, match="unknown schema keys"):
        d = json.loads(_schema().to_json())
        d["surprise"] = 1
        Schema.from_json_dict(d)


def test_vocabulary_round_trip_with_awkward_keys(tmp_path):
    entries = [VocabEntry("user", "a\tb", 5, 1, 9), VocabEntry("city", "北京\\n", -7, 2, 3)]
    path = tmp_path / "v.tsv"
    path.write_text("\n".join(write_vocabulary_lines(entries)) + "\n", encoding="utf-8")
    assert read_vocabulary(str(path)) == entries


def test_version_1_schema_is_refused_with_the_command_that_rewrites_it(tmp_path):
    d = json.loads(_schema().to_json())
    assert d["version"] == 2 and d["example_keys"] == {"hashes": "feat_hashes", "values": "feat_vals",
                                                       "field_hashes": "feat_field_hashes", "weight": "weight"}
    d["version"] = 1
    d["example_keys"] = {"ids": "feat_ids", "values": "feat_vals", "fields": "feat_fields", "hashes": "feat_hashes",
                         "weight": "weight"}
    (tmp_path / "schema.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="schema version 1 is not 2.*rerun `make etl`"):
        load_schema(str(tmp_path))
    assert not hasattr(ExampleKeys(), "ids") and not hasattr(ExampleKeys(), "fields")
