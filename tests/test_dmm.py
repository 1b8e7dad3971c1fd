"""DMM with per-class datamodels: ideal attribution makes it oracle matching, and the study builds its targets.

With "ideal" per-class datamodels -- planted so that DM-direct predicts, for every replica,
its own logits plus the mean oracle-minus-pretrained logit change -- DMM must unlearn about as
well as OM (issue #15: within 1 KLoM), and clearly better than doing nothing. The study's
target builder must put DM-direct's per-class prediction on exactly the covered rows.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from ascent_jax import datamodels, klom, models, train, unlearn
from ascent_jax.ensemble import RunOptions
from experiments import study

K, NUM_TRAIN, NUM_TEST, NUM_FORGET = 8, 512, 128, 24
PRETRAIN = train.TrainConfig(epochs=4, batch_size=64, peak_lr=0.2)


@pytest.fixture(scope="module")
def ensemble_case(fashion_small, fashion_norm):
    x, y = fashion_small[0][:NUM_TRAIN], fashion_small[1][:NUM_TRAIN]
    x_test, y_test = fashion_small[2][:NUM_TEST], fashion_small[3][:NUM_TEST]
    model = models.build("mlp", 10, hidden=(32,))
    options = RunOptions(seed=0, progress=False)
    pretrained = train.train_ensemble(model, PRETRAIN, x, y, fashion_norm, options, num_members=K).states
    # a forget set the models memorise: the first points of one class
    forget = np.flatnonzero(y == 0)[:NUM_FORGET].astype(np.int32)
    oracles = unlearn.unlearn(unlearn.RetrainConfig(PRETRAIN), model, None, x, y, fashion_norm, forget, options,
                              num_members=2 * K, test_images=x_test, test_labels=y_test, keep_variables=True)
    evaluation, targets = unlearn.split_oracles(oracles.variables[PRETRAIN.epochs], K)
    return types.SimpleNamespace(
        x=x, y=y, x_test=x_test, y_test=y_test, model=model, norm=fashion_norm, pretrained=pretrained, forget=forget,
        oracle_margins=oracles.margins[PRETRAIN.epochs][:K],
        pretrained_logits=train.predict(model, pretrained, x, fashion_norm),
        target_logits=train.predict(model, targets, x, fashion_norm))


def ideal_class_datamodels(case, rows: np.ndarray) -> datamodels.ClassDatamodels:
    """Per-class datamodels whose forget-set sum is the mean pretrained-minus-oracle logit change on ``rows``."""
    change = case.pretrained_logits.mean(axis=0) - case.target_logits.mean(axis=0)  # (n, C)
    matrix = np.zeros((len(rows), 10, NUM_TRAIN), np.float32)
    matrix[:, :, case.forget[0]] = change[rows]  # all of it attributed to one forget point: the sum is what counts
    return datamodels.ClassDatamodels(rows.astype(np.int64), matrix, np.zeros((len(rows), 10), np.float32),
                                      np.zeros((len(rows), 10), np.float32))


def forget_p95(case, config, targets, **inputs) -> float:
    result = unlearn.unlearn(config, case.model, case.pretrained, case.x, case.y, case.norm, case.forget,
                             RunOptions(seed=1, progress=False), targets=targets, **inputs)
    margins = result.margins[config.epochs]
    return study.p95(klom.klom(case.oracle_margins[:, case.forget], margins[:, case.forget]))


def test_ideal_attribution_dmm_unlearns_like_oracle_matching(ensemble_case):
    case = ensemble_case
    retain = np.setdiff1d(np.arange(NUM_TRAIN), case.forget)
    rows = np.sort(np.concatenate([case.forget, retain[::4]]))
    cdm = ideal_class_datamodels(case, rows)
    fake = types.SimpleNamespace(setup=types.SimpleNamespace(class_datamodels=cdm, subset=np.arange(NUM_TRAIN)))
    targets, covered = study.Study.class_targets(fake, case.forget, case.pretrained_logits)
    np.testing.assert_array_equal(covered, rows)
    ideal = case.pretrained_logits - (case.pretrained_logits.mean(0) - case.target_logits.mean(0))
    np.testing.assert_allclose(targets[:, rows], ideal[:, rows], rtol=1e-5, atol=1e-4)
    uncovered = np.setdiff1d(np.arange(NUM_TRAIN), rows)
    np.testing.assert_array_equal(targets[:, uncovered], case.pretrained_logits[:, uncovered])

    config = dict(lr=5e-3, epochs=12, retain_multiple=3.0, batch_size=64)
    om = forget_p95(case, unlearn.OracleMatchingConfig(**config), case.target_logits)
    dmm = forget_p95(case, unlearn.DatamodelMatchingConfig(**config), targets, target_rows=covered)
    nothing = study.p95(klom.klom(case.oracle_margins[:, case.forget],
                                  klom.margins(case.pretrained_logits, case.y)[:, case.forget]))
    assert abs(dmm - om) < 1.0, (dmm, om, nothing)
    assert dmm < nothing - 1.0 and om < nothing - 1.0, (dmm, om, nothing)


def test_class_datamodels_that_miss_a_forget_set_are_refused_before_any_work(tmp_path, capsys):
    from ascent_jax import data
    from ascent_jax.cli import run_main
    from experiments import fashion

    labels = data.load("fashion_mnist", "train")[1]
    subset = datamodels.study_subset(labels, 10_000, 0)
    rows = np.arange(50, dtype=np.int64)  # covers none of the committed forget sets' points
    zeros = np.zeros((50, 10), np.float32)
    path = tmp_path / "class_datamodels.npz"
    datamodels.save_class_datamodels(path, datamodels.ClassDatamodels(rows, np.zeros((50, 10, 10_000), np.float32),
                                                                      zeros, zeros), subset, {"test": True}, lds=zeros)
    out = tmp_path / "never"
    code = run_main(fashion.main, ["--dry-run", "--class-datamodels", str(path), "--forget-set", "set8-pc2-top100",
                                   "--out", str(out)])
    assert code == 2 and not out.exists()
    assert (f"error: the class datamodels in {path} do not cover 100 points of forget set set8-pc2-top100; fit them "
            "with python -m ascent_jax.forget_sets --logits --fit-classes on forget sets that include it"
            in capsys.readouterr().err)
