"""Quality on generated data against the generator's planted (Bayes-optimal) model. Slow.

    QUALITY_OUT=runs/quality.json nice -n 10 .venv/bin/python -m pytest -m slow tests/test_training_quality.py -s

Each test generates a click log from a generator preset, adds a third label ``cvr_all`` -- for a
clicked impression its conversion, for the others a draw from the planted P(conversion | click),
the conversion they would have had if clicked -- ETLs it, trains named ``quality_*`` experiments and
checks the trainer issue's bars against values derived from the planted model:

* ``test_click_quality_against_the_planted_model`` (``quality`` preset, 1M impressions): FFM, DeepFM
  and Wide&Deep reach a click AUC within 0.02 of the Bayes-optimal AUC (LR and FM report their gap);
  the multi-task model's click AUC is within 0.005 of the same architecture trained on click alone.
* ``test_esmm_beats_clicked_only_cvr_over_all_impressions`` (``esmm`` preset): ESMM's pCVR over ALL
  eval impressions (against ``cvr_all``) beats a CVR model of the same architecture trained on
  clicked impressions only. See that test's docstring for why it has its own data.

The tables go to stdout and, with ``QUALITY_OUT=<file>``, to a JSON file (one key per test).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from generator.clicklog import GeneratorConfig, PlantedModel, _format_lines, generate
from tests.conftest import generated_etl_config
from trainer import config as config_lib
from trainer import metrics
from trainer import train as trainer_lib

pytestmark = pytest.mark.slow

SINGLE = ("lr", "fm", "ffm", "deepfm", "wide_deep")
BAR = {"ffm": 0.02, "deepfm": 0.02, "wide_deep": 0.02}
SEEDS = (42, 1)  # train.seed of the ESMM comparison's runs


def _write_with_cvr_all(raw: str, cfg: GeneratorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Rewrites train/eval.libffm with a third label ``cvr_all``; returns the eval (planted P(cvr), cvr_all)."""
    model = PlantedModel(cfg)
    rng = model._rng  # generate() samples train then eval from this generator: same draws again
    draw = np.random.default_rng(cfg.seed + 99)
    p_cvr = None
    for split, n in (("train", cfg.n_train), ("eval", cfg.n_eval)):
        x = model.sample(n, rng)
        path = os.path.join(raw, f"{split}.libffm")
        with open(path, encoding="utf-8") as f:
            written = [line.split(" ", 1)[0] for line in f]
        assert written == [f"{c},{v}" for c, v in zip(x["click"], x["conversion"])], "resampling diverged"
        cvr_all = np.where(x["click"] == 1, x["conversion"], draw.random(n) < x["p_cvr"]).astype(int)
        lines = _format_lines(x, with_fields=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(f"{line.split(' ', 1)[0]},{a} {line.split(' ', 1)[1]}"
                              for line, a in zip(lines, cvr_all)) + "\n")
        if split == "eval":
            p_cvr = (x["p_cvr"], cvr_all)
    return p_cvr


def _run(name: str, etl: str, run_dir: str, seed: int | None = None):
    train = {"verbose": 2, "report": False, **({"seed": seed} if seed is not None else {})}
    cfg = config_lib.resolve(f"quality_{name}", overrides={
        "data": {"path": etl}, "run_dir": os.path.join(run_dir, name if seed is None else f"{name}-{seed}"),
        "train": train})
    trainer_lib.train(cfg)
    _, schema, model = trainer_lib.load_trained(cfg.run_dir)
    outputs = tuple(dict.fromkeys(model.tasks + tuple(model.serving_outputs)))
    return trainer_lib.predict_split(model, schema, "eval", 8192, outputs)


def _prepare(tmp_path, gcfg: GeneratorConfig):
    """Generates ``gcfg``'s log with the ``cvr_all`` label and ETLs it.

    Returns:
      (etl dir, runs dir, truth dict, eval planted P(cvr), eval cvr_all labels).
    """
    import apache_beam as beam

    from etl import pipeline

    raw, etl, runs = (str(tmp_path / d) for d in ("raw", "etl", "runs"))
    truth = generate(raw, gcfg)
    p_cvr, cvr_all = _write_with_cvr_all(raw, gcfg)
    ecfg = generated_etl_config(raw, etl, labels=("click", "conversion", "cvr_all"), num_shards=4)
    with beam.Pipeline() as p:
        pipeline.build_pipeline(p, ecfg)
    pipeline.write_schema(ecfg)
    return etl, runs, truth, p_cvr, cvr_all


def _cvr_rows(preds, labels, w) -> dict:
    """CVR AUC over all eval impressions (against ``cvr_all``) and over the clicked ones."""
    cvr = preds["cvr"] if "cvr" in preds else preds["conversion"]
    clicked = labels["click"] > 0.5
    return {"cvr_all_auc": metrics.auc(labels["cvr_all"], cvr, w),
            "cvr_clicked_auc": metrics.auc(labels["conversion"][clicked], cvr[clicked], w[clicked])}


def _click_rows(preds, labels, w) -> dict:
    return {"click_auc": metrics.auc(labels["click"], preds["click"], w),
            "click_logloss": metrics.logloss(labels["click"], preds["click"], w)}


def _report(key: str, truth: dict, rows: dict) -> None:
    for r in rows.values():
        if "click_auc" in r:
            r["click_gap"] = rows["bayes"]["click_auc"] - r["click_auc"]
    print(f"\n[{key}] model  click AUC  gap to Bayes  click logloss  CVR AUC (all impressions)  CVR AUC (clicked)")
    for name, r in rows.items():
        fmt = lambda k, f="{:.4f}": f.format(r[k]) if k in r else "-"  # noqa: E731
        print(f"{name:12s} {fmt('click_auc'):>9s}  {fmt('click_gap'):>12s}  {fmt('click_logloss'):>13s}  "
              f"{fmt('cvr_all_auc'):>25s}  {fmt('cvr_clicked_auc'):>17s}")
    out = os.environ.get("QUALITY_OUT")
    if out:
        table = {}
        if os.path.exists(out):
            with open(out, encoding="utf-8") as f:
                table = json.load(f)
        table[key] = {"generator": truth["config"], "rows": rows}
        with open(out, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=2)


def _bayes_row(truth: dict, p_cvr, cvr_all) -> dict:
    bayes = truth["bayes"]["eval"]
    return {"click_auc": bayes["click"]["auc"], "click_logloss": bayes["click"]["logloss"],
            "cvr_all_auc": metrics.auc(cvr_all, p_cvr),
            "cvr_clicked_auc": bayes["cvr_given_click"]["auc"]}


def test_click_quality_against_the_planted_model(tmp_path):
    """Click models against Bayes and multi-task against single-task, on the ``quality`` preset."""
    etl, runs, truth, p_cvr, cvr_all = _prepare(tmp_path, GeneratorConfig.preset("quality"))
    rows = {"bayes": _bayes_row(truth, p_cvr, cvr_all)}
    for name in SINGLE:
        preds, labels, w = _run(name, etl, runs)
        rows[name] = _click_rows(preds, labels, w)
    for name in ("mtl", "ctr_single"):
        preds, labels, w = _run(name, etl, runs)
        rows[name] = _click_rows(preds, labels, w)
    _report("quality", truth, rows)

    for name, bar in BAR.items():
        assert rows[name]["click_gap"] <= bar, (name, rows[name])
    assert rows["mtl"]["click_auc"] >= rows["ctr_single"]["click_auc"] - 0.005, (rows["mtl"], rows["ctr_single"])


def test_esmm_beats_clicked_only_cvr_over_all_impressions(tmp_path):
    """ESMM's pCVR against a clicked-only CVR model over ALL eval impressions, on the ``esmm`` preset.

    ESMM (Ma et al., SIGIR 2018) claims two advantages over a CVR model trained on clicked
    impressions: its CVR tower shares embeddings with a click task trained on every impression, and
    so suffers less from the sparsity of conversions in clicked data. Neither shows on the
    ``quality`` preset: there the planted P(conversion | click) is independent of the click model
    and 1M impressions leave 120k clicks, so the clicked-only model is unbiased and has data enough
    (an earlier session measured it ahead of ESMM there).

    The ``esmm`` preset plants what ESMM needs. (1) Conversion shares the click model's structure:
    ``conversion_click_share = 1`` makes the conversion model's user, item and brand effects and
    its user x brand vectors rescaled copies of the click model's, so users and items that attract
    clicks also convert. (2) Conversions are sparse, clicks are not: 300k impressions over the
    ``quality`` cardinalities give 36k clicks but, with ``cvr = 0.05``, only 2.5k conversions,
    while the click task sees all 300k impressions. Clicks must stay dense: ESMM's pCVR is
    pCTCVR / pCTR and inherits pCTR's errors, and on long-tailed data (300k impressions over 3,000
    users and 2,000 items, rho 0.8-1.0, or ctr 0.04) the click AUC was ~0.81 against a Bayes 0.88
    and ESMM lost to the clicked-only model or won by less than the spread across seeds.

    The label ``cvr_all`` is drawn from the planted P(conversion | click) for every impression, so
    the planted scores' AUC on it (the Bayes row) bounds both models. Each model trains with two
    seeds and the means are compared: one seed's AUC moved by up to 0.01 in the probes.
    """
    etl, runs, truth, p_cvr, cvr_all = _prepare(tmp_path, GeneratorConfig.preset("esmm"))
    rows = {"bayes": _bayes_row(truth, p_cvr, cvr_all)}
    for name in ("esmm", "cvr_clicked"):
        for seed in SEEDS:
            preds, labels, w = _run(name, etl, runs, seed=seed)
            rows[f"{name}-{seed}"] = _cvr_rows(preds, labels, w)
            if "click" in preds:
                rows[f"{name}-{seed}"].update(_click_rows(preds, labels, w))
        rows[name] = {k: float(np.mean([rows[f"{name}-{s}"][k] for s in SEEDS]))
                      for k in rows[f"{name}-{SEEDS[0]}"]}
    _report("esmm", truth, rows)

    assert rows["esmm"]["cvr_all_auc"] > rows["cvr_clicked"]["cvr_all_auc"], (rows["esmm"], rows["cvr_clicked"])
    # Neither model beats the planted scores by more than the AUC's sampling noise.
    for name in ("esmm", "cvr_clicked"):
        assert rows[name]["cvr_all_auc"] <= rows["bayes"]["cvr_all_auc"] + 0.01, rows
