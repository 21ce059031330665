"""Every file the pipeline writes, named once: the stages, the report and the tests import these, and dvc.yaml
names the same paths (tests/test_agreement.py checks every one against it, without running anything).

Relative to the repository root, where DVC runs every stage. Per-experiment paths are functions of its name; in
dvc.yaml the name is `${key}`.
"""

from __future__ import annotations

# example_market (the files a user replaces with their own: params.yaml's data.bars, data.labels, data.test_labels)
EXAMPLE_BARS = "data/example/bars.parquet"
EXAMPLE_LABELS = "data/example/labels.csv"
EXAMPLE_TEST_LABELS = "data/example/test_labels.csv"

# prepare
UNLABELED = "data/prepared/unlabeled_windows.parquet"
LABELED = "data/prepared/labeled_windows.parquet"  # the first data.labeled_windows of the pool
LABEL_POOL = "data/prepared/label_pool.parquet"  # every window of labels.csv (the curve's pool)
TEST = "data/prepared/test_windows.parquet"  # held-out: read only by finetune and label_curve


def augmented(recipe: str) -> str:
    return f"data/augmented/{recipe}.npy"


# pretrain@<experiment>
def encoder(experiment: str) -> str:
    return f"data/pretrained/{experiment}_encoder.pt"


def pretrain_metrics(experiment: str) -> str:
    return f"metrics/pretrain/{experiment}.json"


def pretrain_curve(experiment: str) -> str:
    return f"plots/pretrain/{experiment}.csv"


# select
SELECTED_ENCODER = "data/selected/encoder.pt"
SELECT_METRICS = "metrics/select.json"

# finetune
OOF_PREDICTIONS = "data/finetune/oof_predictions.parquet"
FINETUNE_METRICS = "metrics/finetune.json"
FINETUNE_CURVES = "plots/finetune/curves.csv"


def confusion(init: str) -> str:
    return f"plots/finetune/confusion_{init}.csv"


# finetune_ablation@<experiment>
def ablation_metrics(experiment: str) -> str:
    return f"metrics/ablation/{experiment}.json"


# label_curve
CURVE_METRICS = "metrics/label_curve.json"
CURVE_PLOT = "plots/label_curve.csv"

# Not stage outputs: run-specific facts (`dvc metrics show` lists them through dvc.yaml's top-level metrics).
RUNTIME_DIR = "metrics/runtime"


def runtime(name: str) -> str:
    return f"{RUNTIME_DIR}/{name}.json"
