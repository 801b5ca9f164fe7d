import numpy as np
import pytest

from isoconv.train.schedule import lr_at, onecycle_knots


@pytest.mark.parametrize("epochs", [1, 2, 3, 7, 25, 100])
def test_onecycle_matches_reference_formula_every_iteration(epochs):
    lr_max, iters = 0.05, 7
    for epoch in range(epochs):
        for i in range(iters):
            t = epoch + (i + 1) / iters
            want = np.interp(t, [0, epochs * 2 // 5, epochs * 4 // 5, epochs], [0, lr_max, lr_max / 20, 0])
            assert lr_at(t, schedule="onecycle", lr_max=lr_max, epochs=epochs) == pytest.approx(want, abs=0)


def test_onecycle_reference_values_for_25_epochs():
    assert onecycle_knots(25) == [0, 10, 20, 25]
    assert lr_at(10, schedule="onecycle", lr_max=0.01, epochs=25) == pytest.approx(0.01)
    assert lr_at(5, schedule="onecycle", lr_max=0.01, epochs=25) == pytest.approx(0.005)
    assert lr_at(20, schedule="onecycle", lr_max=0.01, epochs=25) == pytest.approx(0.0005)
    assert lr_at(25, schedule="onecycle", lr_max=0.01, epochs=25) == 0.0


def test_exact_onecycle_collapses_for_one_epoch_but_fractional_does_not():
    # the reference's integer division gives knots [0, 0, 0, 1] for E=1: lr_max is never reached
    assert onecycle_knots(1) == [0, 0, 0, 1]
    assert max(lr_at(t / 10, schedule="onecycle", lr_max=1.0, epochs=1) for t in range(1, 11)) <= 1 / 20
    assert lr_at(0.4, schedule="onecycle-frac", lr_max=1.0, epochs=1) == pytest.approx(1.0)


def test_cosine_with_warmup():
    kw = dict(schedule="cosine", lr_max=0.1, epochs=10, warmup_epochs=2)
    assert lr_at(1, **kw) == pytest.approx(0.05)
    assert lr_at(2, **kw) == pytest.approx(0.1)
    assert lr_at(6, **kw) == pytest.approx(0.05)
    assert lr_at(10, **kw) == pytest.approx(0.0, abs=1e-12)
