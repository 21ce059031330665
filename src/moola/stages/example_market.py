"""Stage example_market: the built-in seeded market -> data/example/bars.parquet, labels.csv and test_labels.csv.

The files have the format of a user's own (docs/data-format.md), so that prepare reads either the same way:
params.yaml's data.bars and data.labels point at these by default.
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa

from moola import io, market, paths
from moola.errors import run_main
from moola.params import EXAMPLE_MAX_BARS, DataParams, example_market_bars, load_params, reads_example_market


# The reference document's sizes (105-bar windows, 11,873 unlabeled, 89 labeled, ...): what the example market is
# written at when data.bars is your own file and data.* would ask it for more bars than fit in memory.
FALLBACK_SIZES = {"window": 105, "stride": 10, "unlabeled_windows": 11873, "labeled_windows": 89, "label_pool": 500,
                  "test_windows": 2000, "min_final_segment": 15}


def example_sizes(d: DataParams) -> DataParams:
    """The data params the example market is generated with: `d`, or, where data.bars is your own file (nothing
    reads the example) and `d` asks for more bars than fit in memory, FALLBACK_SIZES (the stage still runs in a
    plain `dvc repro`, so it must not fail on own data that needs large windows)."""
    if reads_example_market(d) or example_market_bars(d) <= EXAMPLE_MAX_BARS:
        return d
    print(f"data.bars is {d.bars}, not the example market, and data.* would ask it for {example_market_bars(d):,} "
          f"bars (more than {EXAMPLE_MAX_BARS:,}): writing it at the reference sizes instead (nothing reads it)",
          flush=True)
    return dataclasses.replace(d, **FALLBACK_SIZES)


def main() -> None:
    p = load_params()
    d = example_sizes(p.data)
    bars, labels, test_labels = market.example_data(
        p.seed, d.window, d.stride, d.unlabeled_windows, d.labeled_windows, d.min_final_segment,
        d.label_pool, d.test_windows,
    )
    # An explicit schema and no pandas metadata: the file's bytes do not depend on the pandas version.
    schema = pa.schema(
        [("timestamp", pa.timestamp("ns"))] + [(c, pa.float64()) for c in ("open", "high", "low", "close")]
        + [("volume", pa.int64())]
    )
    table = pa.Table.from_pandas(bars, schema=schema, preserve_index=False).replace_schema_metadata(None)
    with io.written_together():
        io.write_parquet(paths.EXAMPLE_BARS, table)
        io.write_text(paths.EXAMPLE_LABELS, labels.to_csv(index=False))
        io.write_text(paths.EXAMPLE_TEST_LABELS, test_labels.to_csv(index=False))
    print(
        f"Example market: {len(bars):,} bars -> {paths.EXAMPLE_BARS}, {len(labels)} labeled windows -> "
        f"{paths.EXAMPLE_LABELS}, "
        f"{len(test_labels)} held-out windows (after the pool: a continuation of the same stationary generator) "
        f"-> {paths.EXAMPLE_TEST_LABELS}",
        flush=True,
    )


if __name__ == "__main__":
    run_main(main)
