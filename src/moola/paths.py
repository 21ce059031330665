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


# Per recipe, experiment or init: each is `str.format` of its template, e.g. encoder("exp1_baseline").
augmented = "data/augmented/{}.npy".format

# pretrain@<experiment>
encoder = "data/pretrained/{}_encoder.pt".format
pretrain_metrics = "metrics/pretrain/{}.json".format
pretrain_curve = "plots/pretrain/{}.csv".format

# select
SELECTED_ENCODER = "data/selected/encoder.pt"
SELECT_METRICS = "metrics/select.json"

# replicate@<i>: one directory per replicate seed, holding its encoder and its snapshots
replicate_dir = "data/replicates/seed{}".format
REPLICATES_DIR = "data/replicates"
REPLICATE_ENCODER = "encoder.pt"  # in replicate_dir(seed): the best validation epoch's, as pretrain keeps it
snapshot_name = "epoch_{:03d}.pt".format  # in replicate_dir(seed): the encoder after that epoch
replicate_metrics = "metrics/replicates/seed{}.json".format
replicate_curve = "plots/replicates/seed{}.csv".format

# finetune
ANSWER = "metrics/answer.json"  # the headline (moola.answer): the one file dvc.yaml declares as DVC metrics
OOF_PREDICTIONS = "data/finetune/oof_predictions.parquet"
FINETUNE_METRICS = "metrics/finetune.json"
FINETUNE_CURVES = "plots/finetune/curves.csv"
FINETUNE_LIFT_PER_SEED = "plots/finetune/lift_per_seed.csv"  # one row per (lift, replicate, seed) pair
confusion = "plots/finetune/confusion_{}.csv".format  # out of fold, first seed (and first replicate)
HELDOUT_CONFUSION = "plots/finetune/heldout_confusion.csv"  # every model's held-out counts

# finetune_ablation@<experiment>
ablation_metrics = "metrics/ablation/{}.json".format

# label_curve
LABEL_CURVE_METRICS = "metrics/label_curve.json"
LABEL_CURVE_PLOT = "plots/label_curve.csv"

# budget_curve
BUDGET_METRICS = "metrics/budget_curve.json"
BUDGET_PLOT = "plots/budget_curve.csv"

# Not stage outputs: run-specific facts (`dvc metrics show metrics/runtime` lists them).
RUNTIME_DIR = "metrics/runtime"
runtime = (RUNTIME_DIR + "/{}.json").format
