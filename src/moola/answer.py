"""The headline: the handful of numbers a reader compares across experiments, as flat short keys.

The finetune stage writes it to metrics/answer.json, the one file dvc.yaml declares as DVC metrics, so that
`dvc exp show` and `dvc metrics diff` show the answer first. The detail (per seed, per fold, per curve size,
selection, runtime) stays in the reports it is taken from, plain stage outputs that `moola report` prints.

`dvc exp show` lists the keys in the file's order, `dvc metrics diff` in alphabetical order: the names are chosen
so that both start with the lift (`lift_*`), then the models (`<model>_acc`, `<model>_mcc`), then the encoder.
"""

from __future__ import annotations

from typing import Any

# Report key -> short name. Lifts are pretrained - <baseline>; "lift_same_schedule" compares with a scratch network
# trained on the pretrained one's schedule, when the report has it.
LIFTS = {"lift": "lift", "lift_same_schedule": "lift_ss"}
METRICS = {"accuracy": "acc", "balanced_accuracy": "bacc", "mcc": "mcc"}
MODELS = {"pretrained": "pretrained", "scratch": "scratch", "scratch_same_schedule": "scratch_ss",
          "logreg": "logreg", "majority": "majority"}
# A single-class prediction has MCC 0 by definition: a column that never changes.
NO_MCC = {"majority"}
# What the held-out intervals cover when the report does not say (the bootstrap resamples the windows).
HELDOUT_COVERS = "held-out windows"
OOF_COVERS = "out-of-fold windows"


def rate(value: float | None) -> float | None:
    """An accuracy, lift or MCC to 3 decimals (0.1 accuracy point); never -0.0. None (undefined: one class only)
    stays None, written as null."""
    return None if value is None else round(float(value), 3) + 0.0


def loss(value: float) -> float:
    """A validation loss to 4 significant digits."""
    return float(f"{float(value):.4g}")


def _interval(prefix: str, entry: dict) -> dict[str, float]:
    return {prefix: rate(entry["point"]), f"{prefix}_lo": rate(entry["ci_low"]), f"{prefix}_hi": rate(entry["ci_high"])}


def _covers(lift: dict, default: str) -> str:
    """The interval's sources: a `covers` list on the lift entries (or on the lift) when the report has one."""
    covers = lift.get("accuracy", {}).get("covers", lift.get("covers"))
    if covers is None:
        return default
    return covers if isinstance(covers, str) else ", ".join(map(str, covers))


def headline(finetune_report: dict, encoder: str, encoder_val_loss: float | None) -> dict[str, Any]:
    """The headline of a finetune report (metrics/finetune.json's content) and the selected encoder.

    Held-out numbers when the report has them: each lift with its 95% interval bounds (_lo, _hi) and what the
    interval covers, each model's accuracy and MCC. Without a held-out set, the out-of-fold lift instead
    (oof_ keys), so that the columns never silently change meaning."""
    heldout = finetune_report.get("heldout") or {}
    out: dict[str, Any] = {}
    if heldout.get("windows"):
        for key, short in LIFTS.items():
            lift = heldout.get(key)
            for metric, m in METRICS.items():
                if lift and metric in lift:
                    out |= _interval(f"{short}_{m}", lift[metric])
        out["lift_covers"] = _covers(heldout.get("lift") or {}, HELDOUT_COVERS)
        for init, short in MODELS.items():
            for metric in ("accuracy", "mcc"):
                if init in heldout and not (metric == "mcc" and init in NO_MCC):
                    out[f"{short}_{METRICS[metric]}"] = rate(heldout[init][metric]["point"])
    else:
        lift = finetune_report.get("lift") or {}
        for metric, m in METRICS.items():
            if metric in lift:
                out |= _interval(f"oof_lift_{m}", lift[metric])
        out["oof_lift_covers"] = _covers(lift, OOF_COVERS)
    out["selected_encoder"] = encoder
    if finetune_report.get("replicates_of"):  # what the pretrained row's encoders are runs of
        out["replicates_of"] = finetune_report["replicates_of"]
    if encoder_val_loss is not None:
        out["selected_val_loss"] = loss(encoder_val_loss)
    out["test_windows"] = int(heldout.get("windows") or 0)
    return out
