"""The headline of metrics/finetune.json (moola.answer): flat short keys, the lift first, numbers rounded.

Unit tests on hand-made reports (no training); the stage's own answer.json is checked against its finetune.json
in test_finetune_stage.py, and what `dvc exp show` / `dvc metrics diff` make of it in test_tour.py.
"""

from __future__ import annotations

import json

from moola.answer import headline


def _ci(point: float, low: float, high: float, **extra) -> dict:
    return {"point": point, "ci_low": low, "ci_high": high, **extra}


def _model(acc: float, mcc: float) -> dict:
    return {"accuracy": _ci(acc, acc - 0.02, acc + 0.02), "balanced_accuracy": _ci(acc, acc - 0.03, acc + 0.03),
            "mcc": _ci(mcc, mcc - 0.05, mcc + 0.05), "recall_consolidation": _ci(0.5, 0.4, 0.6)}


def _report(heldout_windows: int = 300, **heldout_extra) -> dict:
    """A finetune report as the stage writes it today (the keys headline reads, and some it does not)."""
    oof_lift = {"accuracy": _ci(0.0112359, -0.0674157, 0.0898876, contains_zero=True),
                "balanced_accuracy": _ci(0.02, -0.05, 0.09, contains_zero=True), "resamples": 1000, "verdict": "..."}
    heldout = {"windows": 0, "note": "no held-out set"} if not heldout_windows else {
        "windows": heldout_windows, "class_counts": {"consolidation": 180, "retracement": 120}, "resamples": 1000,
        "pretrained": _model(0.6233333, 0.2104871), "scratch": _model(0.5866667, 0.1392), "logreg": _model(0.55, 0.1),
        "majority": _model(0.6, 0.0),
        "lift": {"accuracy": _ci(0.0366667, -0.0133333, 0.0866667, contains_zero=True),
                 "balanced_accuracy": _ci(0.0412345, -0.0098765, 0.0923456, contains_zero=True),
                 "mcc": _ci(0.0712871, -0.0301, 0.1734, contains_zero=True), "verdict": "inside the noise"},
        **heldout_extra,
    }
    return {"heldout": heldout, "pretrained": {}, "lift": oof_lift, "selected_encoder": "exp2_conservative"}


def _lift_first(keys: list[str]) -> bool:
    lifts = [k.startswith("lift_") for k in keys]
    return lifts == sorted(lifts, reverse=True) and lifts[0]


def test_todays_report_gives_the_lift_first_then_models_then_encoder():
    answer = headline(_report(), "exp2_conservative", 0.012345678)
    assert list(answer) == [
        "lift_acc", "lift_acc_lo", "lift_acc_hi", "lift_bacc", "lift_bacc_lo", "lift_bacc_hi",
        "lift_mcc", "lift_mcc_lo", "lift_mcc_hi", "lift_covers",
        "pretrained_acc", "pretrained_mcc", "scratch_acc", "scratch_mcc", "logreg_acc", "logreg_mcc",
        "majority_acc",  # majority's MCC is 0 by definition: no column
        "selected_encoder", "selected_val_loss", "test_windows",
    ]
    # `dvc exp show` keeps the file's order, `dvc metrics diff` sorts the names: the lift comes first in both.
    assert _lift_first(list(answer)) and _lift_first(sorted(answer))
    assert (answer["lift_acc"], answer["lift_acc_lo"], answer["lift_acc_hi"]) == (0.037, -0.013, 0.087)
    assert (answer["lift_mcc"], answer["pretrained_acc"], answer["pretrained_mcc"]) == (0.071, 0.623, 0.21)
    assert answer["lift_covers"] == "held-out windows" and answer["test_windows"] == 300
    assert answer["selected_encoder"] == "exp2_conservative" and answer["selected_val_loss"] == 0.01235
    # A flat file of numbers and short strings: what `dvc exp show` can put in one column each.
    assert all(isinstance(v, (int, float, str)) for v in answer.values())
    assert json.loads(json.dumps(answer)) == answer


def test_the_same_schedule_lift_and_its_covers_are_included_when_the_report_has_them():
    covers = ["held-out windows in blocks", "fine-tuning seeds"]
    report = _report(lift_same_schedule={"accuracy": _ci(0.02, -0.03, 0.07, covers=covers),
                                         "mcc": _ci(0.04, -0.06, 0.14, covers=covers)},
                     scratch_same_schedule=_model(0.6033333, 0.17))
    for metric in ("accuracy", "balanced_accuracy", "mcc"):
        report["heldout"]["lift"][metric]["covers"] = covers
    answer = headline(report, "exp1_baseline", None)
    keys = list(answer)
    assert keys[:9] == ["lift_acc", "lift_acc_lo", "lift_acc_hi", "lift_bacc", "lift_bacc_lo", "lift_bacc_hi",
                        "lift_mcc", "lift_mcc_lo", "lift_mcc_hi"]
    # Only the metrics the report has; after the plain lift, before the models.
    assert keys[9:16] == ["lift_ss_acc", "lift_ss_acc_lo", "lift_ss_acc_hi", "lift_ss_mcc", "lift_ss_mcc_lo",
                          "lift_ss_mcc_hi", "lift_covers"]
    assert answer["lift_covers"] == "held-out windows in blocks, fine-tuning seeds"
    assert answer["scratch_ss_acc"] == 0.603 and answer["scratch_ss_mcc"] == 0.17
    assert keys.index("scratch_mcc") < keys.index("scratch_ss_acc") < keys.index("logreg_acc")
    assert _lift_first(keys) and _lift_first(sorted(keys))
    assert "selected_val_loss" not in answer and len(answer) <= 40


def test_without_a_heldout_set_the_out_of_fold_lift_stands_in_under_its_own_names():
    answer = headline(_report(heldout_windows=0), "exp1_baseline", 0.5)
    assert answer == {
        "oof_lift_acc": 0.011, "oof_lift_acc_lo": -0.067, "oof_lift_acc_hi": 0.09,
        "oof_lift_bacc": 0.02, "oof_lift_bacc_lo": -0.05, "oof_lift_bacc_hi": 0.09,
        "oof_lift_covers": "out-of-fold windows", "selected_encoder": "exp1_baseline", "selected_val_loss": 0.5,
        "test_windows": 0,
    }


def test_rounding_never_writes_minus_zero():
    report = _report()
    report["heldout"]["lift"]["accuracy"] = _ci(-0.0001, -0.0004, 0.0003)
    answer = headline(report, "exp1_baseline", 1e-7)
    assert json.dumps([answer["lift_acc"], answer["lift_acc_lo"], answer["lift_acc_hi"]]) == "[0.0, 0.0, 0.0]"
    assert answer["selected_val_loss"] == 1e-7
