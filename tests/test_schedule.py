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


# ---------------------------------------------------------------------------------------------- constant, stlr

import math  # noqa: E402

import torch  # noqa: E402

from isoconv.train.schedule import SCHEDULES, beta1_at, stlr  # noqa: E402


def test_constant_is_lr_max_everywhere():
    for t in (0.0, 0.01, 3.5, 10.0):
        assert lr_at(t, schedule="constant", lr_max=1e-3, epochs=10) == 1e-3
    assert beta1_at(3.0, schedule="constant", epochs=10, beta1=0.9) == 0.9


def test_stlr_closed_form():
    kw = dict(schedule="stlr", lr_max=1e-3, epochs=50)
    lo = 1e-3 / 32
    assert lr_at(0.0, **kw) == pytest.approx(lo, rel=1e-12)
    assert lr_at(5.0, **kw) == pytest.approx(1e-3, rel=1e-12)  # peak at cut_frac * epochs
    assert lr_at(2.5, **kw) == pytest.approx(1e-3 * (1 + 0.5 * 31) / 32, rel=1e-12)  # halfway up
    assert lr_at(27.5, **kw) == pytest.approx(1e-3 * (1 + 0.5 * 31) / 32, rel=1e-12)  # halfway down
    assert lr_at(50.0, **kw) == pytest.approx(lo, rel=1e-12)


def test_stlr_matches_howard_iteration_formula():
    # Howard & Ruder eq. 3 in iterations: cut = floor(T * cut_frac), p = t/cut or 1 - (t-cut)/(cut*(1/cut_frac-1))
    epochs, iters, lr_max = 5, 20, 1e-3
    T = epochs * iters
    cut = math.floor(T * 0.1)
    for k in range(T):
        step = k + 1  # progress after the k-th step, as lr_at's t counts
        p = step / cut if step < cut else 1 - (step - cut) / (cut * (1 / 0.1 - 1))
        want = lr_max * (1 + p * 31) / 32
        got = lr_at(step / iters, schedule="stlr", lr_max=lr_max, epochs=epochs)
        assert got == pytest.approx(want, rel=1e-12, abs=0)
    with pytest.raises(ValueError):
        stlr(1.0, lr_max=1.0, epochs=10, cut_frac=1.0)


# ---------------------------------------------------------------------------------------------- onecycle-torch

@pytest.mark.parametrize("epochs, iters, lr_max", [(100, 7, 1e-3), (3, 13, 2e-3), (1, 10, 0.5), (7, 1, 1e-2)])
def test_onecycle_torch_equals_stepping_torch_onecyclelr(epochs, iters, lr_max):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=lr_max)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr_max, epochs=epochs, steps_per_epoch=iters)
    for epoch in range(epochs):
        for i in range(iters):
            t = epoch + (i + 1) / iters
            group = opt.param_groups[0]
            # the lr and beta1 the k-th optimizer.step() would use
            assert lr_at(t, schedule="onecycle-torch", lr_max=lr_max, epochs=epochs,
                         iters_per_epoch=iters) == pytest.approx(group["lr"], abs=1e-9 * lr_max, rel=0)
            assert beta1_at(t, schedule="onecycle-torch", epochs=epochs,
                            iters_per_epoch=iters) == pytest.approx(group["betas"][0], abs=1e-9, rel=0)
            opt.step()
            sched.step()


def test_onecycle_torch_shape_and_needs_iters():
    kw = dict(schedule="onecycle-torch", lr_max=1e-3, epochs=100, iters_per_epoch=196)
    assert lr_at(1 / 196, **kw) == pytest.approx(1e-3 / 25)  # first step starts at lr / 25
    assert lr_at(30.0, **kw) == pytest.approx(1e-3, rel=1e-6)  # peak after 30% of the steps
    assert lr_at(100.0, **kw) == pytest.approx(1e-3 / 25 / 1e4, rel=1e-6)  # last step: lr / 2.5e5
    assert beta1_at(1 / 196, schedule="onecycle-torch", epochs=100, iters_per_epoch=196) == pytest.approx(0.95)
    assert beta1_at(30.0, schedule="onecycle-torch", epochs=100, iters_per_epoch=196) == pytest.approx(0.85, abs=1e-6)
    with pytest.raises(ValueError, match="iters_per_epoch"):
        lr_at(1.0, schedule="onecycle-torch", lr_max=1e-3, epochs=10)
    with pytest.raises(ValueError):
        beta1_at(1.0, schedule="nope", epochs=10)
    assert set(SCHEDULES) >= {"constant", "stlr", "onecycle-torch"}
