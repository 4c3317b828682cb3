import math

import pandas as pd
import pytest
from scipy import stats

from fedclip.attacks.metrics import clopper_pearson, epsilon_lower_bound, membership_metrics, per_site_rates


def _frame(tp, fn, fp, tn):
    rows = [(True, True)] * tp + [(True, False)] * fn + [(False, True)] * fp + [(False, False)] * tn
    return pd.DataFrame(
        {
            "target": range(len(rows)),
            "site": ["a"] * (tp + fn) + [""] * (fp + tn),
            "is_member": [r[0] for r in rows],
            "predicted_member": [r[1] for r in rows],
        }
    )


def test_rates_by_hand():
    m = membership_metrics(_frame(tp=8, fn=2, fp=1, tn=9), delta=1e-5)
    assert m["tpr"] == 0.8 and m["fpr"] == 0.1 and m["recall"] == 0.8
    assert m["precision"] == pytest.approx(8 / 9) and m["accuracy"] == pytest.approx(17 / 20)


def test_clopper_pearson_matches_the_beta_quantiles():
    lo, hi = clopper_pearson(3, 10, confidence=0.95)
    assert lo == pytest.approx(stats.beta.ppf(0.05, 3, 8)) and hi == pytest.approx(stats.beta.ppf(0.95, 4, 7))
    assert clopper_pearson(0, 10, confidence=0.95)[0] == 0.0 and clopper_pearson(10, 10, confidence=0.95)[1] == 1.0


def test_epsilon_lower_bound_is_zero_without_signal_and_grows_with_it():
    assert epsilon_lower_bound(5, 5, 5, 5, delta=1e-5) == 0.0
    weak = epsilon_lower_bound(30, 70, 1, 59, delta=1e-5)
    strong = epsilon_lower_bound(90, 10, 0, 60, delta=1e-5)
    assert 0 < weak < strong
    # strong: TPR >= beta(0.05; 90, 11), FPR <= 1 - 0.05^(1/60): the bound is their log-ratio
    expected = math.log((stats.beta.ppf(0.05, 90, 11) - 1e-5) / (1 - 0.05 ** (1 / 60)))
    assert strong >= expected - 1e-9


def test_per_site_rates():
    frame = _frame(tp=3, fn=1, fp=1, tn=3)
    frame.loc[0, "site"] = "b"
    rates = per_site_rates(frame).set_index("site")
    assert rates.loc["a", "tpr"] == pytest.approx(2 / 3) and rates.loc["b", "tpr"] == 1.0
    assert (rates["fpr"] == 0.25).all()
