"""The generator is deterministic and plants what it claims."""
from __future__ import annotations

import dataclasses
import filecmp
import json
import os

import numpy as np
import pytest

from generator.clicklog import PRESETS, GeneratorConfig, PlantedModel, generate, main

SMALL = GeneratorConfig(n_train=3000, n_eval=1000, n_users=200, n_items=100, n_queries=40, n_categories=8,
                        n_brands=20, seed=5)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    generate(a, SMALL)
    generate(b, SMALL)
    generate(c, dataclasses.replace(SMALL, seed=6))
    for name in ("train.libffm", "eval.libffm", "items.tsv", "field_map.tsv", "truth.json"):
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name
    assert not filecmp.cmp(os.path.join(a, "train.libffm"), os.path.join(c, "train.libffm"), shallow=False)


def test_lines_fields_and_dictionaries(tmp_path):
    out = str(tmp_path)
    truth = generate(out, SMALL, formats=("libffm", "libfm"))
    ffm = open(os.path.join(out, "train.libffm")).read().splitlines()
    fm = open(os.path.join(out, "train.libfm")).read().splitlines()
    assert len(ffm) == len(fm) == 3000
    labels, *tokens = ffm[0].split()
    click, conv = (int(x) for x in labels.split(","))
    assert [t.split(":")[0] for t in tokens] == ["user", "item", "position", "hour", "device", "query"]
    # The libfm line is the libffm line without fields, and the field map restores them.
    fmap = dict(line.split("\t") for line in open(os.path.join(out, "field_map.tsv")).read().splitlines()[1:])
    assert [fmap[t.split(":")[0]] for t in fm[0].split()[1:]] == [t.split(":")[0] for t in tokens]
    items = open(os.path.join(out, "items.tsv")).read().splitlines()
    assert items[0] == "item\tcategory\tbrand\tprice" and len(items) == 1 + SMALL.n_items
    # With fields user..query from the log and category, brand, price from the item table: 9 fields.
    assert len(truth["log_fields"]) + len(truth["item_fields"]) >= 8


def test_conversions_only_after_clicks_and_rates_near_targets(tmp_path):
    truth = generate(str(tmp_path), SMALL)
    pairs = [tuple(int(x) for x in line.split()[0].split(","))
             for line in open(tmp_path / "train.libffm").read().splitlines()]
    assert all(click == 1 for click, conv in pairs if conv == 1)
    ctr = np.mean([c for c, _ in pairs])
    assert abs(ctr - SMALL.ctr) < 0.03
    b = truth["bayes"]["eval"]
    # Scoring with the planted probabilities is informative but not perfect.
    assert 0.6 < b["click"]["auc"] < 0.99
    assert 0.55 < b["cvr_given_click"]["auc"] < 0.99


def test_position_bias_decreases_ctr_and_is_absent_from_conversion():
    model = PlantedModel(SMALL)
    x = model.sample(60_000, np.random.default_rng(1))
    ctr_by_pos = [x["click"][x["position"] == p].mean() for p in range(SMALL.n_positions)]
    assert ctr_by_pos[0] > ctr_by_pos[2] > ctr_by_pos[4]
    # p(conversion | click) does not depend on the position.
    conv_logit_by_pos = [x["conv_logit"][x["position"] == p].mean() for p in range(SMALL.n_positions)]
    assert np.ptp(conv_logit_by_pos) < 0.1


def test_presets_override_only_their_fields_and_flags_override_presets(tmp_path):
    q = GeneratorConfig.preset("quality")
    default = GeneratorConfig()
    for f in dataclasses.fields(GeneratorConfig):
        want = PRESETS["quality"].get(f.name, getattr(default, f.name))
        assert getattr(q, f.name) == want, f.name
    assert GeneratorConfig.preset("quality", n_train=10).n_train == 10
    with pytest.raises(ValueError, match="unknown generator preset"):
        GeneratorConfig.preset("nope")
    with pytest.raises(TypeError):
        GeneratorConfig.preset("quality", n_rows=10)
    # CLI: --preset sets the preset's fields; an explicit flag still wins; no preset = the defaults.
    main(["--out", str(tmp_path / "p"), "--preset", "quality", "--n-train", "300", "--n-eval", "100"])
    cfg = json.load(open(tmp_path / "p" / "truth.json"))["config"]
    assert cfg == dataclasses.asdict(GeneratorConfig.preset("quality", n_train=300, n_eval=100))
    main(["--out", str(tmp_path / "d"), "--n-train", "300", "--n-eval", "100"])
    cfg = json.load(open(tmp_path / "d" / "truth.json"))["config"]
    assert cfg == dataclasses.asdict(dataclasses.replace(default, n_train=300, n_eval=100))
    assert open(tmp_path / "d" / "train.libffm").read().count("\n") == 300


def test_conversion_click_share_mixes_click_effects_into_conversion_effects():
    base = dataclasses.replace(SMALL, n_users=3000, n_items=2000)
    own = PlantedModel(base)
    # rho = 1: every conversion effect is the click effect rescaled to the conversion effect's std.
    full = PlantedModel(dataclasses.replace(base, conversion_click_share=1.0))
    for conv, click, independent in (("cv_user", full.w["user"], own.cv_user),
                                     ("cv_item", full.w["item"], own.cv_item),
                                     ("cv_brand", full.w["brand"], own.cv_brand),
                                     ("cv_u", full.v[("user", "brand")], own.cv_u),
                                     ("cv_b", full.v[("brand", "user")], own.cv_b)):
        np.testing.assert_allclose(getattr(full, conv), click * independent.std() / click.std(), rtol=1e-12)
    # The click model itself is untouched by rho.
    np.testing.assert_array_equal(full.w["user"], own.w["user"])
    # rho = 0.6: rho * (rescaled click) + sqrt(1 - rho^2) * own, two independent effects of equal std,
    # so the conversion and click effects correlate at about rho and keep the conversion effect's std.
    half = PlantedModel(dataclasses.replace(base, conversion_click_share=0.6))
    np.testing.assert_allclose(half.cv_item, 0.6 * own.w["item"] * own.cv_item.std() / own.w["item"].std()
                               + 0.8 * own.cv_item, rtol=1e-12)
    assert abs(np.corrcoef(half.cv_user, half.w["user"])[0, 1] - 0.6) < 0.05
    assert abs(half.cv_user.std() / own.cv_user.std() - 1) < 0.05
    for bad in (1.5, -1.01):
        with pytest.raises(ValueError, match="conversion_click_share"):
            PlantedModel(dataclasses.replace(base, conversion_click_share=bad))


def test_generator_imports_no_stage():
    """The generator may use numpy and the bottom package (feature_schema: the shared metrics), never a stage."""
    import ast
    import glob

    stages = ("etl", "trainer", "export", "serving")
    for path in glob.glob(os.path.join(os.path.dirname(__file__), "..", "generator", "*.py")):
        for node in ast.walk(ast.parse(open(path).read())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in stages, f"{path} imports {name}"
