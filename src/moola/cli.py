"""The `moola` command: the laptop tour, the results table, and the parallel runner.

    moola tour       run the pipeline at a small scale through `dvc exp run`, then print the results
    moola study      every unlabeled window, three pretraining replicates and both curves, under an hour on 2 cores
    moola deep       exp1_baseline pretrained for the spec's 75 epochs, with the budget curve to epoch 75
    moola report     print the results table from the metrics files in the workspace
    moola parallel   the five pretraining experiments concurrently, then the rest (see moola.parallel)
    moola doctor     a GPU box's first command: versions, CUDA, the LSTM's real dtype, TF32; speed by benchmarks/
    moola unlock     after a killed `dvc repro`: remove DVC's stage locks (.dvc/tmp/rwlock) of processes that are gone
    moola figures    every plot of `dvc plots show` as PNG or SVG files, offline (see moola.figures)

`moola report`, `tour` and `study` validate the whole params.yaml first: DVC itself never looks at a key that no
stage reads.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

from moola.errors import run_main
from moola.params import load_params
from moola.report import report

# The tour, a smoke test of the whole pipeline in under 5 minutes from a fresh clone: 3% of the windows and 5% of
# the pretraining epochs (4 for exp1), smaller batches so that each epoch still takes many optimiser steps, one
# replicate of 4 epochs (snapshots after epochs 1, 2 and 4), one fine-tuning seed instead of three, and the curve's
# three smaller sizes. Fine-tuning keeps its 60 epochs (scale.epochs scales pretraining only): cut short, the
# classifier never trains. It runs the stages up to finetune, label_curve and budget_curve; the ablation (five more
# fine-tunings) is left to `dvc exp run`. Sized by time alone (6 min 12 s with 4%, 10%, two 10-epoch replicates on
# an Intel Xeon, 2026-12-06), not by any number it printed.
TOUR_SET = {
    "scale.windows": "0.03",
    "scale.epochs": "0.05",
    "pretrain.batch_size": "128",
    "finetune.seeds": "[1337]",
    "curve.sizes": "[20,45,89]",
    "curve.seeds": "[1337]",
    "replicates.seeds": "[101]",
    "replicates.epochs": "4",
    "replicates.snapshot_epochs": "[1,2]",
}
# The CPU study (README "Results"), at most an hour on this project's 2-core machines: every unlabeled window of the
# spec (11,873). It pays for three pretraining replicates of 8 epochs (the answer's encoders and the budget curve's
# snapshots after epochs 1, 2, 3, 5 and 8) by selecting on one epoch per experiment, and pretrains in bf16 where
# the CPU runs the LSTM in it (1.66x fp32 on an AMD EPYC Zen 4; fp32 elsewhere, said in the run's metrics).
# Fine-tuning, the label curve and the budget curve at the spec's settings (fp32).
STUDY_SET = {
    "scale.windows": "1.0",
    "scale.epochs": "0.01",
    "pretrain.batch_size": "256",
    "pretrain.precision": "bf16",
    "replicates.epochs": "8",
    "replicates.snapshot_epochs": "[1,2,3,5]",
}
# The answer at the spec's depth (README "Results"): exp1_baseline, the reference document's recommendation, pinned
# (select still runs, on one epoch per experiment, but does not choose what is replicated), pretrained for its full
# 75 epochs at the spec's batch on every unlabeled window, its encoder kept after epochs 1, 2, 4, ..., 64 and 75;
# then fine-tuning (held-out, both scratch rows) and the budget curve from every snapshot. One replicate by default:
# about an hour of bf16 training on an AVX512-BF16 CPU per replicate; add seeds with -S replicates.seeds=[101,102].
# Killed, it resumes: run the same command again (the replicate's resume checkpoint, DVC's run-cache).
DEEP_SET = {
    "scale.windows": "1.0",
    "scale.epochs": "0.01",
    "pretrain.precision": "bf16",
    "replicates.experiment": "exp1_baseline",
    "replicates.seeds": "[101]",
    "replicates.epochs": "75",
    "replicates.snapshot_epochs": "[1,2,4,8,16,32,64]",
}
TARGETS = {"tour": ["finetune", "label_curve", "budget_curve"], "study": ["finetune", "label_curve", "budget_curve"],
           "deep": ["finetune", "budget_curve"]}
RUNS = {"tour": TOUR_SET, "study": STUDY_SET, "deep": DEEP_SET}


def run_experiment(name: str, extra: list[str]) -> None:
    """`moola tour` / `moola study`: its -S settings, then the user's options, through `dvc exp run`."""
    from moola.dvc_lock import clear_stale_rwlock

    # Before DVC's templating: an empty params.yaml or an unknown key (`seeed: 7`, which no stage reads, so DVC
    # never complains) is named here in one line.
    load_params()
    for line in clear_stale_rwlock():
        print(f"removed DVC's stale {line}: that process is gone (a killed run)", flush=True)
    sets = [arg for key, value in RUNS[name].items() for arg in ("-S", f"{key}={value}")]
    cmd = ["dvc", "exp", "run", *sets, *extra, *TARGETS[name]]
    print("$ " + " ".join(cmd), flush=True)
    code = subprocess.call(cmd)
    if code != 0:
        raise SystemExit(code)
    print()
    print(report(ablation=False, curve=name != "deep"))
    if name == "tour":
        print("\nThe tour is a smoke test: 3% of the windows, one fine-tuning seed, one 4-epoch pretraining replicate; "
              "its numbers show that the pipeline runs, not whether pretraining helps (`moola study` answers that).")


@dataclass(frozen=True)
class Command:
    """A subcommand: its help line, and what runs it given the words after its name.

    own_parser: its module parses those words itself (its own options and --help); otherwise moola's parser does,
    and run gets what it did not recognise: options for `dvc exp run` where dvc_options, else none are allowed."""

    help: str
    run: Callable[[list[str]], None]
    own_parser: bool = False
    dvc_options: bool = False


def _experiment(name: str) -> Callable[[list[str]], None]:
    return lambda extra: run_main(lambda: run_experiment(name, extra))


def _module_main(module: str) -> Callable[[list[str]], None]:
    """The main(argv) of moola.<module>, imported when the command runs (its imports are its own)."""
    return lambda rest: importlib.import_module(f"moola.{module}").main(rest)


def _unlock(_: list[str]) -> None:
    from moola import dvc_lock

    run_main(dvc_lock.main)


# Every subcommand, dispatched from here alone (main); the results table itself is moola.report.
COMMANDS = {
    "tour": Command("the whole pipeline at a small scale via `dvc exp run`, then the results; further options go to "
                    "`dvc exp run` (e.g. -S mask=random)", _experiment("tour"), dvc_options=True),
    "study": Command("the CPU study: all unlabeled windows, one selection epoch per experiment, three 8-epoch "
                     "replicates of the selected one (bf16 where the CPU runs it), fine-tuning and both curves via "
                     "`dvc exp run`; under an hour on 2 cores (README \"Results\")", _experiment("study"),
                     dvc_options=True),
    "deep": Command("exp1_baseline at the spec's depth: 75 epochs at batch 2048 on every unlabeled window (bf16 where "
                    "the CPU runs it), snapshots to epoch 75, fine-tuning and the budget curve via `dvc exp run`; "
                    "about an hour of training per replicate on a CPU; run it again to resume", _experiment("deep"),
                    dvc_options=True),
    "report": Command("print the results table from the workspace's metrics",
                      lambda _: run_main(lambda: print(report()))),
    "parallel": Command("run the five pretraining experiments concurrently, then the rest (moola parallel --help)",
                        _module_main("parallel"), own_parser=True),
    "doctor": Command("a GPU box's first command: will training use the GPU, in what precision; then how fast, by "
                      "the benchmark where the checkout has it (moola doctor --help)", _module_main("doctor"),
                      own_parser=True),
    "unlock": Command("after a killed `dvc repro` that DVC calls busy: remove the stage locks (.dvc/tmp/rwlock) of "
                      "processes that are gone", _unlock),
    "figures": Command("every plot of `dvc plots show` as PNG/SVG files in a folder, rendered offline "
                       "(moola figures --help)", _module_main("figures"), own_parser=True),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = COMMANDS.get(argv[0]) if argv else None
    if command is not None and command.own_parser:  # its own options and --help: every word after its name
        command.run(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="moola", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, c in COMMANDS.items():
        sub.add_parser(name, help=c.help)
    args, extra = parser.parse_known_args(argv)
    command = COMMANDS[args.command]
    if extra and not command.dvc_options:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    command.run(extra)


if __name__ == "__main__":
    main()
