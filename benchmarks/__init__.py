"""Performance harness: the pretraining loop against the bare LSTM that bounds it, and what else costs time.

    python -m benchmarks            # about 5 minutes on 2 CPU cores; prints a table, writes metrics/bench.json
    python -m benchmarks --tries    # also what could move the ceiling: bf16, oneDNN, threads, OpenMP wait
                                    # policy, batch size, layout, decoding masked steps only (10-15 minutes)
    python -m benchmarks --quick    # a sanity run at tiny shapes, under a minute (tests/test_bench.py uses it)
    python -m benchmarks.measure_precision   # fp32 against bf16 on this CPU: the loop at batch 256 and 2048,
                                             # fine-tuning per epoch (a few minutes; metrics/bench_precision.json)

Run from the repository root (it reads params.yaml). Every figure is a median over repeats after a warm-up, timed
with time.perf_counter (accelerators synchronised before each clock read); the ceiling, the model and the real
loop take turns within each repeat, so a change in the machine's load hits all of them alike. Shapes are the
spec's whatever params.yaml's `scale` says. metrics/bench.json describes this machine: it is not a DVC output.

Not part of the moola package, which measures nothing: it times the package's own functions, and `moola doctor`
runs it (`python -m benchmarks --no-dvc`) from a checkout for a GPU box's speed. throughput: the bare LSTM, its
workers sharing a device, random-walk windows and the machine record; harness: settings, repeats, timing;
measure_training, measure_data, measure_dvc: the measurements; report: the estimate, the table and the JSON;
__main__: the run, top to bottom. The DVC timings borrow the tests' temporary repository (tests/repo_copy.py).
"""
