"""Pure libfm/libffm parser: valid lines exactly, each malformed kind with its reason."""
from __future__ import annotations

import pytest

from etl import parsing
from etl.parsing import Feature, ParseError


def test_libffm_multilabel_line():
    line = b"1,0 user:u7:1 item:i3:0.5 price:price:12.25\n"
    p = parsing.parse_line(line, "libffm", num_labels=2)
    assert p.labels == (1.0, 0.0)
    assert p.features == (Feature("user", "u7", 1.0), Feature("item", "i3", 0.5), Feature("price", "price", 12.25))


def test_libfm_minus_one_label_and_string_keys():
    p = parsing.parse_line("-1 266:1 user_city=beijing:1", "libfm")
    assert p.labels == (0.0,)
    assert p.features == (Feature(None, "266", 1.0), Feature(None, "user_city=beijing", 1.0))


@pytest.mark.parametrize("line,fmt,reason", [
    (b"", "libfm", parsing.EMPTY),
    (b"   \t ", "libfm", parsing.EMPTY),
    (b"1 a:1 \xff\xfe:1", "libfm", parsing.NON_UTF8),
    (b"yes a:1", "libfm", parsing.BAD_LABEL),
    (b"2 a:1", "libfm", parsing.BAD_LABEL),
    (b"1,0 a:1", "libfm", parsing.LABEL_COUNT),
    (b"1 a", "libfm", parsing.BAD_TOKEN),
    (b"1 a:1:1", "libfm", parsing.BAD_TOKEN),
    (b"1 f:a", "libffm", parsing.BAD_TOKEN),
    (b"1 :a:1", "libffm", parsing.BAD_TOKEN),
    (b"1 a:x", "libfm", parsing.BAD_VALUE),
    (b"1 a:nan", "libfm", parsing.NON_FINITE),
    (b"1 a:inf", "libfm", parsing.NON_FINITE),
    (b"1 a:1e999", "libfm", parsing.NON_FINITE),
    (b"1 a:-3.5e38", "libfm", parsing.NON_FINITE),  # finite, but not in float32 (what a record holds)
    (b"1", "libfm", parsing.NO_FEATURES),
    (b"1 " + b" ".join(b"k%d:1" % i for i in range(6)), "libfm", parsing.TOO_MANY_FEATURES),
])
def test_malformed_lines_raise_their_reason(line, fmt, reason):
    with pytest.raises(ParseError) as e:
        parsing.parse_line(line, fmt, num_labels=1, max_features=5)
    assert e.value.reason == reason
    assert reason in parsing.REASONS


def test_field_checks():
    feats = (Feature("user", "1", 1.0), Feature("user", "2", 1.0))
    with pytest.raises(ParseError) as e:
        parsing.check_fields(feats)
    assert e.value.reason == parsing.DUPLICATE_FIELD
    parsing.check_fields(feats, multi_hot_fields={"user"})  # allowed when multi-hot
    with pytest.raises(ParseError) as e:
        parsing.check_fields((Feature("bogus", "1", 1.0),), known_fields={"user"})
    assert e.value.reason == parsing.UNKNOWN_FIELD


def test_assign_fields_from_field_map():
    feats = parsing.parse_line("1 266:1 5042:1", "libfm").features
    assert parsing.assign_fields(feats, {"266": "user", "5042": "city"}) == (
        Feature("user", "266", 1.0), Feature("city", "5042", 1.0))
    with pytest.raises(ParseError) as e:
        parsing.assign_fields(feats, {"266": "user"})
    assert e.value.reason == parsing.UNMAPPED_FEATURE


def test_libffm_field_indexes_and_out_of_range():
    names = ("user", "item")
    assert parsing.parse_line(b"1 0:u7:1 1:i3:2", "libffm", field_names=names).features == (
        Feature("user", "u7", 1.0), Feature("item", "i3", 2.0))
    for line, reason in ((b"1 2:u7:1", parsing.FIELD_OUT_OF_RANGE), (b"1 -1:u7:1", parsing.BAD_TOKEN),
                         (b"1 user:u7:1", parsing.BAD_TOKEN)):
        with pytest.raises(ParseError) as e:
            parsing.parse_line(line, "libffm", field_names=names)
        assert e.value.reason == reason


def test_parse_record_gives_plain_tuples_equal_to_features():
    labels, feats = parsing.parse_record(b"1 user:a:1", "libffm")
    assert type(feats[0]) is tuple and feats == [Feature("user", "a", 1.0)]


def test_float32_range_is_accepted_to_its_limit():
    assert parsing.parse_line(b"1 a:3.4028234663852886e38 b:-1e-45", "libfm").features == (
        Feature(None, "a", parsing.FLOAT32_MAX), Feature(None, "b", -1e-45))
