"""Stage prepare: the bars and labels files named by params (data.bars, data.labels, data.test_labels) ->
data/prepared windows (moola.preparation does the work).

The files are a user's own (see docs/data-format.md) or the example market's, which the example_market stage
writes in the same format; dvc.yaml lists whichever files params name as this stage's deps.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from moola import io, paths
from moola.data_checks import check_outliers, check_test_classes, degenerate_warnings
from moola.errors import run_main
from moola.params import CLASS_NAMES, FEATURES, DataParams, load_params
from moola.preparation import Prepared, check_test_labels_follow_bars, prepare
from moola.windows import check_pipeline_can_finish, read_bars, read_label_table, windows_table


def main() -> None:
    p = load_params()
    check_test_labels_follow_bars(p.data)
    bars, dropped = check_outliers(read_bars(p.data.bars), p.data)
    out = prepare(p, bars, read_label_table(p.data.labels), read_label_table(p.data.test_labels, "data.test_labels"))
    unlabeled, labeled = out.unlabeled, out.labeled
    # Fail now, not after hours of pretraining (finetune.folds is checked, not used: it is no dep of this stage).
    check_pipeline_can_finish(unlabeled, labeled, p.finetune.folds, p.data.bars, p.data.labels)
    check_test_classes(out.test.label, p.data)
    if dropped:
        print(f"dropped {dropped} outlier bar(s) of {p.data.bars} (one-bar spikes beyond data.outlier_threshold="
              f"{p.data.outlier_threshold:g} median moves; data.drop_outliers is true)", flush=True)
    for line in degenerate_warnings({"unlabeled": (unlabeled.values, unlabeled.start),
                                     "labeled": (out.pool.values, out.pool.start),
                                     "held-out": (out.test.values, out.test.start)}):
        print(line, file=sys.stderr, flush=True)
    n_val = int(np.sum(unlabeled.split == "val"))
    counts = np.bincount(labeled.label, minlength=len(CLASS_NAMES))
    # Every file is computed before any is written: bad input never leaves one of them behind.
    with io.written_together():
        io.write_parquet(paths.UNLABELED, windows_table(unlabeled))
        io.write_parquet(paths.LABELED, windows_table(labeled))
        io.write_parquet(paths.LABEL_POOL, windows_table(out.pool))
        io.write_parquet(paths.TEST, windows_table(out.test))
    print(
        f"Loaded {len(unlabeled):,} unlabeled windows ({len(unlabeled) - n_val:,} train, {n_val:,} validation; "
        f"{p.data.window} bars x {len(FEATURES)} features, from {p.data.bars})",
        flush=True,
    )
    print(
        f"{len(labeled)} labeled windows ({counts[0]} {CLASS_NAMES[0]}, {counts[1]} {CLASS_NAMES[1]}): the first "
        f"{len(labeled)} of the {len(out.pool)} in {p.data.labels} (the label-efficiency curve's pool)",
        flush=True,
    )
    if len(out.test):
        test_counts = np.bincount(out.test.label, minlength=len(CLASS_NAMES))
        print(
            f"{len(out.test)} held-out windows ({test_counts[0]} {CLASS_NAMES[0]}, {test_counts[1]} "
            f"{CLASS_NAMES[1]}) from {p.data.test_labels}; {out.excluded} unlabeled windows overlapped one and were "
            "left out of pretraining",
            flush=True,
        )
        print(as_of_line(p.data, out), flush=True)
    else:
        print(f"no held-out set ({p.data.test_labels} has no rows)", flush=True)


def as_of_line(d: DataParams, out: Prepared) -> str:
    """What data.heldout did: the as-of cut and what it left out, or the warning that there was none."""
    start = pd.Timestamp(np.min(out.test.start))
    if d.heldout == "after":
        return (
            f"as-of split (data.heldout: after): the held-out period starts at {start}; every labeled window ends at "
            f"least data.embargo={d.embargo} bars before it; {out.after_cut} unlabeled windows did not and were left "
            "out of pretraining"
        )
    return (
        f"warning: data.heldout is 'anywhere': no as-of split (the held-out period starts at {start}; labeled and "
        "unlabeled windows may lie near or after held-out ones), so held-out results may be optimistic"
    )


if __name__ == "__main__":
    run_main(main)
