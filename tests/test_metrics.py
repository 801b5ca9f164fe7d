"""Metrics against hand-computed values (and scikit-learn when it happens to be installed)."""
import math

import pytest
import torch

from isoconv.eval.metrics import (
    classification_report,
    confusion_matrix,
    per_class_metrics,
    summary_metrics,
    topk_correct,
)

import sklearn.metrics as skm  # a test dependency (pyproject [test]): the reference implementation

NAMES = ["cat", "dog", "bird", "frog", "zebra"]
# true:  3x cat, 2x dog, 4x bird, 1x frog, no zebra; zebra and frog are never predicted
TARGETS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
PREDS = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 2, 0])
CM = [
    [2, 1, 0, 0, 0],
    [0, 1, 1, 0, 0],
    [1, 0, 3, 0, 0],
    [1, 0, 0, 0, 0],
    [0, 0, 0, 0, 0],
]
# by hand: precision = TP / column sum, recall = TP / row sum, f1 = 2TP / (2TP + FP + FN)
EXPECTED = {
    #         precision recall  f1     support
    "cat": (2 / 4, 2 / 3, 4 / 7, 3),
    "dog": (1 / 2, 1 / 2, 2 / 4, 2),
    "bird": (3 / 4, 3 / 4, 6 / 8, 4),
    "frog": (0.0, 0.0, 0.0, 1),   # never predicted: precision 0/0 -> 0
    "zebra": (0.0, 0.0, 0.0, 0),  # absent everywhere: all 0/0 -> 0
}
EXPECTED_REPORT = """\
              precision    recall  f1-score   support

         cat     0.5000    0.6667    0.5714         3
         dog     0.5000    0.5000    0.5000         2
        bird     0.7500    0.7500    0.7500         4
        frog     0.0000    0.0000    0.0000         1
       zebra     0.0000    0.0000    0.0000         0

    accuracy                         0.6000        10
   macro avg     0.3500    0.3833    0.3643        10
weighted avg     0.5500    0.6000    0.5714        10
"""


def test_confusion_matrix_hand_example():
    cm = confusion_matrix(PREDS, TARGETS, 5)
    assert cm.dtype == torch.int64 and cm.shape == (5, 5)
    assert cm.tolist() == CM
    assert int(cm.sum()) == len(TARGETS)
    assert cm.sum(1).tolist() == [3, 2, 4, 1, 0]  # rows = true class


def test_confusion_matrix_random_against_loop():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 7, (500,), generator=g)
    p = torch.randint(0, 7, (500,), generator=g)
    cm = confusion_matrix(p, t, 7)
    ref = torch.zeros(7, 7, dtype=torch.int64)
    for a, b in zip(t.tolist(), p.tolist()):
        ref[a, b] += 1
    assert torch.equal(cm, ref)
    assert cm.tolist() == skm.confusion_matrix(t.numpy(), p.numpy(), labels=list(range(7))).tolist()


def test_confusion_matrix_validation():
    with pytest.raises(ValueError, match="0..4"):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 5)
    with pytest.raises(ValueError, match="targets"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([-1, 1]), 5)
    with pytest.raises(ValueError, match="argmax"):
        confusion_matrix(torch.zeros(2, 5), torch.tensor([0, 1]), 5)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), 5)
    assert confusion_matrix(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64), 3).tolist() \
        == [[0] * 3] * 3


def test_per_class_metrics_hand_example():
    rows = per_class_metrics(torch.tensor(CM), NAMES)
    assert [r["class"] for r in rows] == NAMES
    assert [r["index"] for r in rows] == list(range(5))
    for r in rows:
        p, rc, f1, support = EXPECTED[r["class"]]
        assert r["precision"] == pytest.approx(p)
        assert r["recall"] == pytest.approx(rc)
        assert r["f1"] == pytest.approx(f1)
        assert r["support"] == support
        assert all(isinstance(r[k], float) and math.isfinite(r[k]) for k in ("precision", "recall", "f1"))
    with pytest.raises(ValueError, match="4 class names"):
        per_class_metrics(torch.tensor(CM), NAMES[:4])


def test_summary_metrics_hand_example():
    s = summary_metrics(torch.tensor(CM))
    assert s["accuracy"] == pytest.approx(6 / 10)
    assert s["macro_precision"] == pytest.approx((0.5 + 0.5 + 0.75) / 5)
    assert s["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 0.75) / 5)
    assert s["macro_f1"] == pytest.approx((4 / 7 + 0.5 + 0.75) / 5)
    assert s["weighted_precision"] == pytest.approx((3 * 0.5 + 2 * 0.5 + 4 * 0.75) / 10)
    assert s["weighted_recall"] == pytest.approx(6 / 10)  # always equals accuracy
    assert s["weighted_f1"] == pytest.approx((3 * 4 / 7 + 2 * 0.5 + 4 * 0.75) / 10)
    assert s["support"] == 10


def test_all_zero_matrix_has_no_nans():
    cm = torch.zeros(3, 3, dtype=torch.int64)
    s = summary_metrics(cm)
    assert all(v == 0 for v in s.values())
    assert all(r[k] == 0.0 for r in per_class_metrics(cm, ["a", "b", "c"]) for k in ("precision", "recall", "f1"))
    assert "nan" not in classification_report(cm, ["a", "b", "c"]).lower()


def test_perfect_predictions():
    t = torch.arange(4).repeat(5)
    cm = confusion_matrix(t, t, 4)
    s = summary_metrics(cm)
    assert s["accuracy"] == s["macro_f1"] == s["weighted_f1"] == 1.0


def test_classification_report_text():
    text = classification_report(torch.tensor(CM), NAMES)
    assert text == EXPECTED_REPORT
    lines = text.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
    for name in NAMES:
        assert any(line.split()[:1] == [name] for line in lines)
    assert "0.5714" in text and "0.3643" in text and "0.6000" in text
    # digits and long class names
    long_names = ["a-very-long-class-name", "b", "c", "d", "e"]
    text2 = classification_report(torch.tensor(CM), long_names, digits=2)
    assert "a-very-long-class-name       0.50      0.67      0.57         3" in text2
    assert "   macro avg       0.35      0.38      0.36        10" in text2


def test_against_sklearn():
    g = torch.Generator().manual_seed(1)
    c = 6
    t = torch.randint(0, c - 1, (300,), generator=g)  # class 5 never true
    p = torch.randint(0, c, (300,), generator=g)
    p[p == 3] = 2  # class 3 never predicted
    cm = confusion_matrix(p, t, c)
    names = [f"class_{i}" for i in range(c)]
    labels = list(range(c))
    yt, yp = t.numpy(), p.numpy()
    pr, rc, f1, sup = skm.precision_recall_fscore_support(yt, yp, labels=labels, zero_division=0)
    for r in per_class_metrics(cm, names):
        i = r["index"]
        assert r["precision"] == pytest.approx(pr[i]) and r["recall"] == pytest.approx(rc[i])
        assert r["f1"] == pytest.approx(f1[i]) and r["support"] == sup[i]
    s = summary_metrics(cm)
    assert s["accuracy"] == pytest.approx(skm.accuracy_score(yt, yp))
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = skm.precision_recall_fscore_support(yt, yp, labels=labels, average=avg, zero_division=0)
        assert (s[f"{avg}_precision"], s[f"{avg}_recall"], s[f"{avg}_f1"]) == pytest.approx((ap, ar, af))
    assert classification_report(cm, names) == skm.classification_report(
        yt, yp, labels=labels, target_names=names, digits=4, zero_division=0)
    assert EXPECTED_REPORT == skm.classification_report(
        TARGETS.numpy(), PREDS.numpy(), labels=list(range(5)), target_names=NAMES, digits=4, zero_division=0)


# ---------------------------------------------------------------------------------------------
# top-k


def test_topk_basic():
    logits = torch.tensor([
        [0.1, 0.9, 0.0, 0.5],   # order 1, 3, 0, 2
        [2.0, 1.0, 3.0, 0.0],   # order 2, 0, 1, 3
        [0.0, 0.0, 0.0, 1.0],   # order 3, then tie 0, 1, 2
    ])
    targets = torch.tensor([1, 1, 2])
    # ranks of the targets: 0, 2, 3
    assert topk_correct(logits, targets, ks=(1, 2, 3, 4)) == {1: 1, 2: 1, 3: 2, 4: 3}
    assert topk_correct(logits, targets) == {1: 1, 5: 3}  # k=5 > 4 classes: clipped, all correct
    out = topk_correct(logits, targets, ks=(1,))
    assert list(out) == [1] and isinstance(out[1], int)


def test_topk_ties_follow_argmax():
    logits = torch.zeros(4, 5)  # all classes tied: stable order 0, 1, 2, 3, 4
    targets = torch.tensor([0, 1, 3, 4])
    assert topk_correct(logits, targets, ks=(1, 2, 3, 4, 5)) == {1: 1, 2: 2, 3: 2, 4: 3, 5: 4}
    # top-1 always agrees with argmax (first maximal index), even with many ties
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (2000, 10), generator=g).float()
    targets = torch.randint(0, 10, (2000,), generator=g)
    assert topk_correct(logits, targets, ks=(1,))[1] == int((logits.argmax(1) == targets).sum())
    # top-k counts are monotone in k and reach N at k = C
    counts = topk_correct(logits, targets, ks=range(1, 11))
    assert all(counts[k] <= counts[k + 1] for k in range(1, 10)) and counts[10] == 2000


def test_topk_matches_torch_topk_without_ties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, 10, generator=g)
    targets = torch.randint(0, 10, (1000,), generator=g)
    for k in (1, 3, 5, 10):
        ref = (logits.topk(k, dim=1).indices == targets[:, None]).any(1).sum().item()
        assert topk_correct(logits, targets, ks=(k,))[k] == ref


def test_topk_edge_cases():
    assert topk_correct(torch.zeros(0, 10), torch.zeros(0, dtype=torch.int64)) == {1: 0, 5: 0}
    two = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    assert topk_correct(two, torch.tensor([0, 0]), ks=(1, 5, 100)) == {1: 1, 5: 2, 100: 2}
    # a NaN score for the target is never counted correct at k < C
    nan = torch.tensor([[float("nan"), 1.0, 0.0]])
    assert topk_correct(nan, torch.tensor([0]), ks=(1, 2, 3)) == {1: 0, 2: 0, 3: 1}
    # bf16 / half logits work
    assert topk_correct(two.bfloat16(), torch.tensor([1, 0]), ks=(1,)) == {1: 2}
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_correct(two, torch.tensor([0, 1]), ks=(0,))
    with pytest.raises(ValueError, match="0..1"):
        topk_correct(two, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="shape"):
        topk_correct(two, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="integer"):
        topk_correct(two, torch.tensor([0.0, 1.0]))
