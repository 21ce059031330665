"""Stage label_curve: held-out accuracy and MCC against the number of labeled windows (moola.label_efficiency).

    python -m moola.stages.label_curve

Reads the label pool, the held-out windows and the first replicate's encoder (replicates.seeds[0]; the curve's
intervals cover fine-tuning seeds and held-out windows, not pretraining runs); writes metrics/label_curve.json and
plots/label_curve.csv (one row per size and model: the point and its 95% interval, for `dvc plots show`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from moola import io, label_efficiency, paths
from moola.device import describe
from moola.errors import DataError, run_main
from moola.finetuning import finetune_device, finetune_numerics, fit_placement
from moola.models import load_encoder_checkpoint
from moola.numerics import attention_kernels
from moola.params import Params, load_params
from moola.windows import read_windows


def run(p: Params) -> None:
    """Train the curve's models and write its metrics and plot (without held-out windows: a note saying so)."""
    ft, c = p.finetune, p.curve
    pool, test = read_windows(paths.LABEL_POOL), read_windows(paths.TEST)
    for path, windows in ((paths.LABEL_POOL, pool), (paths.TEST, test)):
        if len(windows) and windows.label is None:
            raise DataError(f"{path}: column 'label' missing (expected labeled windows)")
    if len(test) == 0:
        note = f"no held-out set ({p.data.test_labels} has no rows): the curve needs held-out windows to score"
        print(note, flush=True)
        with io.written_together():
            io.write_json(paths.LABEL_CURVE_METRICS, {"heldout_windows": 0, "note": note})
            io.write_text(paths.LABEL_CURVE_PLOT, pd.DataFrame(columns=["labels", "model"]).to_csv(index=False))
        return
    device = finetune_device(ft)
    encoder = Path(paths.replicate_dir(p.replicates.seeds[0])) / paths.REPLICATE_ENCODER
    checkpoint = load_encoder_checkpoint(encoder, expect_hidden=ft.hidden_size)
    numerics = finetune_numerics(ft, device)
    print(f"label pool {len(pool)} windows, held-out {len(test)}; sizes {c.sizes} x seeds {c.seeds}; "
          f"{ft.epochs} epochs ({ft.freeze_epochs} frozen); encoder {encoder}; device {describe(device)}; "
          f"{fit_placement(ft, device)}", flush=True)
    with attention_kernels(device, ft.deterministic):
        result = label_efficiency.run_curve(
            pool.values, pool.label, test.values, ft, c.sizes, c.seeds, checkpoint.state_dict, device,
            workers=ft.workers, threads=ft.threads, numerics=numerics,
        )
    # Blocks of consecutive windows: the held-out windows in time order (a user's file need not be sorted).
    order = np.argsort(test.start, kind="stable")
    per_size, table = label_efficiency.curve_report(test.label, result, ft.bootstrap, p.seed, ft.bootstrap_block, order)
    first = next(iter(per_size.values()), {}).get("pretrained", {}).get("accuracy", {})
    report = {
        "heldout_windows": len(test),
        "pool_windows": len(pool),
        "seeds": list(c.seeds),
        "encoder": str(encoder),
        "epochs": ft.epochs,
        "precision": numerics.ran,
        "interval": f"95% percentile hierarchical bootstrap ({ft.bootstrap} resamples) of the mean over seeds; "
                    "seed_min/seed_max: the seeds' range",
        "covers": first.get("covers", []),
        "skipped_sizes": result.skipped,
        "sizes": per_size,
    }
    if result.skipped:
        print(f"sizes {result.skipped} left out: the label pool has {len(pool)} windows", flush=True)
    for size, entry in per_size.items():
        lifts = "; ".join(
            f"{name} {100 * entry[name]['accuracy']['point']:+.1f} [{100 * entry[name]['accuracy']['ci_low']:+.1f}, "
            f"{100 * entry[name]['accuracy']['ci_high']:+.1f}]" for name in ("lift", "lift_same_schedule")
        )
        print(f"labels {size:>4}: " + ", ".join(
            f"{m} {100 * entry[m]['accuracy']['point']:.1f}%" for m in label_efficiency.MODELS
        ) + f"; {lifts}", flush=True)
    with io.written_together():
        io.write_text(paths.LABEL_CURVE_PLOT, table.to_csv(index=False, float_format="%.6f", lineterminator="\n"))
        io.write_json(paths.LABEL_CURVE_METRICS, report)
    print(f"wrote {paths.LABEL_CURVE_METRICS}, {paths.LABEL_CURVE_PLOT}", flush=True)


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    run_main(main)
