"""App. B toy example (workshop Fig. 4 / NeurIPS Fig. 5): brute-force minima and GD paths."""

import numpy as np
import pytest

from theory import toy_minima as tm

REPRO = tm.ToyReading("standard", "pm1", "2sigma-1", "sum", "zero", 0.1)


@pytest.fixture(scope="module")
def literal():
    return tm.claims(tm.PAPER_READING)


@pytest.fixture(scope="module")
def repro():
    return tm.claims(REPRO)


def test_literal_reading_is_not_reproduced(literal):
    # the pretrain landscape has the two minima the paper describes ...
    assert literal["c1"] and [tm.decision_pattern(t) for t, _ in literal["minima"]["pretrain"]] == [tm.TYPE_A, tm.TYPE_B]
    # ... but the retrain loss's global minimum is the *GDA* basin (type B), not type A
    assert not literal["c2"] and literal["patterns"]["retrain"] == tm.TYPE_B
    # GDA and fine-tuning land in type B, which is the oracle's global minimum here
    assert literal["c3"] and literal["c4"] and not literal["reproduced"]
    # only retraining *from scratch* (theta = 0) stops in the type-A local minimum
    assert literal["c2_path"]
    losses = dict((tm.decision_pattern(t), v) for t, v in literal["minima"]["retrain"])
    assert losses[tm.TYPE_B] < losses[tm.TYPE_A]


def test_reproducing_reading(repro):
    assert repro["c1"] and repro["c2"] and repro["c3"] and repro["c4"] and repro["reproduced"]
    # GDA's endpoint is a strict local minimum of the retrain loss, worse than the global one
    ft = repro["theta_ft"]
    mins = repro["minima"]["retrain"]
    assert any(np.allclose(ft, t, atol=1e-6) for t, _ in mins[1:])
    assert tm.toy_loss(ft, REPRO, "retrain") > mins[0][1] + 1.0


def test_grid_minima_agree_with_multistart_descent(repro):
    # independent brute force: gradient descent from a grid of starts ends only in listed minima
    listed = [t for t, _ in repro["minima"]["retrain"]]
    for a0 in np.linspace(-4, 8, 4):
        for b0 in np.linspace(-3, 2, 3):
            end = tm.descend(REPRO, "retrain", np.array([a0, b0]))
            assert any(np.allclose(end, t, atol=1e-5) for t in listed), (a0, b0, end)


def test_minima_are_stationary_and_strict(literal):
    # finite differences of the float64 loss, independent of the autodiff used to find them
    h = 1e-4
    E = np.eye(2) * h
    for problem, mins in literal["minima"].items():
        f = lambda th: tm.toy_loss(th, tm.PAPER_READING, problem)
        for th, val in mins:
            g = np.array([(f(th + e) - f(th - e)) / (2 * h) for e in E])
            H = np.array([[(f(th + e1 + e2) - f(th + e1 - e2) - f(th - e1 + e2) + f(th - e1 - e2)) / (4 * h * h) for e2 in E] for e1 in E])
            assert np.max(np.abs(g)) < 1e-7 and np.all(np.linalg.eigvalsh(H) > 1e-3)
            assert abs(f(th) - val) < 1e-12


def test_ridge_changes_the_number_of_minima():
    # NeurIPS App. B: "adjusting the ridge shifts minimizers radially without altering
    # their relative positions" -- false here: minima appear and disappear with lam
    r = tm.ToyReading("standard", "pm1", "2sigma-1", "points", "zero")
    counts = [len(tm.find_minima(tm.with_lam(r, lam), "pretrain", n=(241, 121))) for lam in (0.01, 0.1)]
    assert counts == [3, 1]


def test_gda_forms_and_validation():
    # "eq1" GDA puts a negative weight on x4; "zero" drops it
    c_zero = tm._params(tm.PAPER_READING, "gda")[0]
    c_eq1 = tm._params(tm.ToyReading(gda="eq1"), "gda")[0]
    assert c_zero[3] == 0 and c_eq1[3] < 0 and np.allclose(c_zero[:3], c_eq1[:3])
    with pytest.raises(ValueError):
        tm.ToyReading(sigma="tanh")
    with pytest.raises(ValueError):
        tm.ToyReading(lam=0.0)
    with pytest.raises(ValueError):
        tm.toy_loss([0.0, 0.0], tm.PAPER_READING, "finetune")
