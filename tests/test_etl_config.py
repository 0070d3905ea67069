"""ETL config: the fields TSV of `make etl FIELDS=`, `{input_dir}` dictionary paths, split options."""
from __future__ import annotations

import os

import pytest

from etl.config import EtlConfig, FieldConfig, fields_from_tsv, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fields_tsv_with_integer_ids_in_any_row_order():
    text = "field\tname\tkind\tnum_bins\ttransform\tlinear_only\n" \
           "1\tad\tcategorical\t\t\ttrue\n0\tuser\t\t\t\t\n2\tage\tbinned\t20\t\t\n3\tincome\tnumeric\t\tlog1p\t\n"
    out = fields_from_tsv(text)
    assert out["field_ids"] == "index"
    cfg = EtlConfig(**{**out, "fields": tuple(FieldConfig(**f) for f in out["fields"])})
    assert [(f.name, f.kind, f.num_bins, f.transform, f.linear_only) for f in cfg.fields] == [
        ("user", "categorical", 10, "none", False), ("ad", "categorical", 10, "none", True),
        ("age", "binned", 20, "none", False), ("income", "numeric", 10, "log1p", False)]


def test_fields_tsv_without_header_and_with_names():
    out = fields_from_tsv("# kinds of a named libffm file\nuser\t\t\nprice\tprice\tbinned\n")
    assert "field_ids" not in out
    assert [(f["name"], f["kind"]) for f in out["fields"]] == [("user", "categorical"), ("price", "binned")]


@pytest.mark.parametrize("text,message", [
    ("0\tuser\tcategorical\n2\tad\tcategorical\n", r"ids must be 0..1 once each, got \[0, 2\]"),
    ("user\tuid\tcategorical\n", "is a name, so name 'uid' must be empty or the same"),
    ("0\tuser\tcontinuous\n", "line 1: field 'user': kind 'continuous'"),
    ("field\tname\tcolour\n0\tuser\tred\n", r"unknown or repeated columns \['colour'\]"),
    ("field\tname\tkind\tnum_bins\n0\tage\tbinned\tmany\n", "line 2: num_bins 'many' is not an integer"),
    ("0\tuser\tcategorical\textra\n", "line 1: 4 cells"),
    ("0\tuser\tcategorical\n1\tuser\tcategorical\n", "field names repeated"),
    ("field\tname\tkind\n", "no field rows"),
])
def test_fields_tsv_errors_name_the_row(text, message):
    with pytest.raises(ValueError, match=message):
        fields_from_tsv(text)


def test_generated_config_reads_the_item_table_next_to_the_input():
    cfg = load_config(os.path.join(ROOT, "configs", "etl_generated.yaml"), {"input": "some/raw/train.libffm"})
    assert cfg.entity_tables[0].path == "some/raw/items.tsv"
    cfg = load_config(os.path.join(ROOT, "configs", "etl_generated.yaml"), {"input": "gs://b/x/train-*.libffm"})
    assert cfg.entity_tables[0].path == "gs://b/x/items.tsv"
    with pytest.raises(ValueError, match="itself a pattern"):
        load_config(os.path.join(ROOT, "configs", "etl_generated.yaml"), {"input": "logs/*/train.libffm"})


def test_split_and_transform_options_are_checked():
    with pytest.raises(ValueError, match="valid_input and valid_fraction"):
        EtlConfig(input="x", valid_input="v", valid_fraction=0.1)
    with pytest.raises(ValueError, match=r"valid_fraction 1.0 must be in \[0, 1\)"):
        EtlConfig(input="x", valid_fraction=1.0)
    with pytest.raises(ValueError, match="needs kind numeric"):
        FieldConfig("price", kind="binned", transform="log1p")
    assert EtlConfig(input="x").split_names == ("train", "eval")
    assert EtlConfig(input="x", valid_fraction=0.1).split_names == ("train", "eval", "valid")
