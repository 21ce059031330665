"""The laptop tour and the experiment workflow of the README, through real `dvc exp run` at a tiny scale:
`moola tour`, then `dvc exp run -S mask=random`, `dvc metrics diff`, `dvc params diff` and `dvc exp show`
(docs/experiments.md, "Comparing experiments": the headline first, the detail one step away).

The tour starts from a copy of the session's reference run (pipeline_runs: every stage really trained), shrunk
by -S to that run's params, so DVC restores its stages from the run-cache instead of training them again; the
`-S mask=random` experiment then really re-trains what follows the top-level mask.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import run
from moola import figures, paths
from moola.cli import TARGETS
from moola.params import CLASS_NAMES, load_params

pytest_plugins = ["pipeline_runs"]

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The tour's own scale is minutes of training; these -S options (they come after the tour's own) shrink it to
# seconds. A small model: this test is about the workflow, not the numbers.
EXPERIMENTS = ["exp1_baseline", "exp2_conservative", "exp3_aggressive", "exp4_block_mask", "exp5_random_mask"]
SHRINK = [
    "-S", "scale.windows=0.006", "-S", "scale.epochs=0.04", "-S", "pretrain.batch_size=32",
    "-S", "pretrain.hidden_size=16", "-S", "pretrain.decoder_hidden=8", "-S", "finetune.hidden_size=16",
    "-S", "finetune.folds=2", "-S", "finetune.seeds=[1337]",
    # The reference run's replicates and snapshots (conftest.TINY): the replicates and finetune come from the
    # run-cache too.
    "-S", "replicates.seeds=[101,102]", "-S", "replicates.epochs=0", "-S", "replicates.snapshot_epochs=[1]",
    # And its label curve (conftest.TINY's two sizes, not the tour's three): label_curve is not trained again.
    "-S", "curve.sizes=[20,45]",
]
# docs/experiments.md, "Comparing experiments": the recipe that makes `dvc exp show` fit a terminal.
EXP_SHOW_RECIPE = ["--only-changed", "--drop", "Created|.*/|.*_(lo|hi)$|(pretrained|scratch|logreg|majority)_"]
# The detailed reports: plain stage outputs (cached and pushed), not DVC metrics.
DETAILED = [paths.pretrain_metrics("exp1_baseline"), paths.SELECT_METRICS, paths.replicate_metrics(101),
            paths.FINETUNE_METRICS, paths.LABEL_CURVE_METRICS, paths.BUDGET_METRICS]


def _metric_names(entry: dict) -> set[str]:
    """The metric columns `dvc exp show` makes of one row of its --json (file:key; nested keys joined by '.')."""
    def flat(d: dict, prefix: str = "") -> set[str]:
        return set().union(*(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k} for k, v in d.items()))
    return {f"{path}:{name}" for path, m in (entry["data"].get("metrics") or {}).items()
            for name in flat(m.get("data") or {})}


def run_in_copy(reference_run, tmp_path_factory, command: str, options: list[str]) -> tuple[Path, str]:
    """`moola <command> <options>` in a copy of the reference run: the repository and what the command printed."""
    repo = tmp_path_factory.mktemp(command) / "repo"
    shutil.copytree(reference_run.repo, repo, symlinks=True)
    return repo, run(["python", "-m", "moola.cli", command, *options], repo, timeout=1200).stdout


@pytest.fixture(scope="module")
def toured(reference_run, tmp_path_factory):
    return run_in_copy(reference_run, tmp_path_factory, "tour", SHRINK)


def test_tour_runs_every_stage_through_dvc_and_prints_the_results(toured):
    repo, out = toured
    assert out.startswith("$ dvc exp run -S scale.windows=0.03")
    assert out.splitlines()[0].endswith(" finetune label_curve budget_curve")  # the tour's targets: no ablation
    assert (" -S replicates.seeds=[101] -S replicates.epochs=4 -S replicates.snapshot_epochs=[1,2] "
            in out.splitlines()[0])
    # The tour's own curve sizes come first; SHRINK's (the reference run's), given after them, win.
    command = out.splitlines()[0]
    assert command.index(" -S curve.sizes=[20,45,89] ") < command.index(" -S curve.sizes=[20,45] ")
    for stage in ["prepare", "augment@warp12_x4", "pretrain@exp1_baseline", "pretrain@exp5_random_mask", "select",
                  "replicate@101", "replicate@102", "finetune", "label_curve", "budget_curve"]:
        assert f"Running stage '{stage}'" in out or f"Stage '{stage}' is cached" in out or (
            f"Stage '{stage}' didn't change" in out), stage
    assert "finetune_ablation" not in out
    table = out[out.index("Pretraining (validation loss"):]
    assert "(not run)" not in table
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.startswith("  ")}
    # The -S options reached the run: the workspace's params are the shrunk ones, and each experiment trained
    # the epochs they plan, with its own mask; the table prints each one's metrics file.
    p = load_params(repo / "params.yaml")
    assert (p.scale.windows, p.finetune.folds, p.finetune.seeds) == (0.006, 2, [1337])
    for exp in EXPERIMENTS:
        m = json.loads((repo / f"metrics/pretrain/{exp}.json").read_text())
        assert m["epochs_planned"] == p.experiment(exp).epochs and 1 <= m["epochs_run"] <= m["epochs_planned"]
        assert m["mask"] == {"exp4_block_mask": "block", "exp5_random_mask": "random"}.get(exp, "patch")
        common = json.loads((repo / "metrics/select.json").read_text())["candidates"][exp]["common_val_loss"]
        assert rows[exp] == [exp, m["mask"], str(m["epochs_run"]), f"{m['best_val_loss']:.5f}",
                             f"{m['final_val_loss']:.5f}", f"{common:.5f}"], exp
    selected = json.loads((repo / "metrics/select.json").read_text())["selected"]
    assert selected in EXPERIMENTS and f"Selected encoder: {selected}" in table
    # The tour's two replicates of the selected experiment, and the budget curve at the snapshots (SHRINK's: after
    # epoch 1) and the replicates' last epoch.
    assert p.replicates.seeds == [101, 102] and p.replicates.snapshot_epochs == [1]
    for seed in p.replicates.seeds:
        m = json.loads((repo / paths.replicate_metrics(seed)).read_text())
        assert (m["experiment"], m["replicate_seed"]) == (selected, seed)
        assert f"  seed {seed:<6} {selected:<20} {m['epochs_run']:>3} epochs" in table
    budget = json.loads((repo / paths.BUDGET_METRICS).read_text())
    assert budget["epochs"] == p.budget_epochs(selected) and budget["replicates"] == ["seed101", "seed102"]
    assert f"Pretraining-budget curve ({selected}): held-out lift" in table

    def cells(m: dict) -> list[str]:  # a fine-tuning row as the table prints it: percentages, then MCC
        keys = ("accuracy", "balanced_accuracy", *(f"recall_{c}" for c in CLASS_NAMES))
        return [f"{100 * m[k]['mean']:.1f}%" for k in keys] + [f"{m['mcc']['mean']:.3f}"]

    finetune = json.loads((repo / "metrics/finetune.json").read_text())
    out_of_fold = table[table.index("Fine-tuning, out of fold"):table.index("Label-efficiency curve")]
    oof_rows = {line.split()[0]: line.split()[1:] for line in out_of_fold.splitlines() if line.startswith("  ")}
    for init in ("pretrained", "scratch", "logreg", "majority"):
        assert oof_rows[init] == cells(finetune[init]), init
    assert "Ablation: not run" in table  # the tour leaves it out, and does not show the reference run's files
    # The held-out table and the curve: SHRINK's sizes, numbers as the metrics files hold them.
    heldout = finetune["heldout"]
    assert heldout["windows"] == 300 and f"Held-out test set ({heldout['windows']} windows" in table
    lift = heldout["lift"]["accuracy"]
    assert f"accuracy {100 * lift['point']:+.1f} points [{100 * lift['ci_low']:+.1f}, {100 * lift['ci_high']:+.1f}]" in table
    curve = json.loads((repo / "metrics/label_curve.json").read_text())
    assert sorted(curve["sizes"], key=int) == ["20", "45"] and curve["skipped_sizes"] == []
    assert curve["seeds"] == [1337]
    row = next(line for line in table.splitlines() if line.strip().startswith("45 "))
    assert f"{100 * curve['sizes']['45']['pretrained']['accuracy']['point']:5.1f}%" in row

    # `dvc exp show` lists the tour's experiment with the tour's params, and the workspace holds its results.
    shown = list(csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--no-pager", "--csv"], repo).stdout)))
    workspace = next(r for r in shown if r["rev"] == "workspace")
    experiments = [r for r in shown if r["Experiment"]]
    assert experiments, "dvc exp show lists no experiment after the tour"
    for row in (workspace, experiments[0]):
        assert (row["scale.windows"], row["scale.epochs"], row["finetune.folds"]) == ("0.006", "0.04", "2"), row


def test_mask_override_reruns_only_what_follows_the_top_level_mask(toured):
    repo, _ = toured
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "--allow-empty", "-m", "the tour's results"], repo)
    # The tour's targets (`moola tour -S mask=random`, docs/experiments.md): the ablation's fine-tunings of the
    # re-trained encoders, which nothing below reads, stay out.
    out = run(["dvc", "exp", "run", "-S", "mask=random", *TARGETS["tour"]], repo, timeout=1200).stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}
    assert {"pretrain@exp1_baseline", "pretrain@exp2_conservative", "pretrain@exp3_aggressive"} <= ran
    # The replicates list the top-level mask among their params (the selected experiment may follow it).
    assert {"replicate@101", "replicate@102"} <= ran
    assert "pretrain@exp4_block_mask" not in ran and "pretrain@exp5_random_mask" not in ran
    assert "prepare" not in ran and not any(name.startswith("augment@") for name in ran)

    params = json.loads(run(["dvc", "params", "diff", "--json"], repo).stdout)
    assert params == {"params.yaml": {"mask": {"old": "patch", "new": "random"}}}  # the one param changed
    # `dvc metrics diff`: the headline alone, every key of it (--all), the lift first, one screen.
    answer = json.loads((repo / paths.ANSWER).read_text())
    everything = json.loads(run(["dvc", "metrics", "diff", "--all", "--json"], repo).stdout)
    assert list(everything) == [paths.ANSWER] and set(everything[paths.ANSWER]) == set(answer)
    assert {key: d["new"] for key, d in everything[paths.ANSWER].items()} == answer
    table = run(["dvc", "metrics", "diff"], repo).stdout.splitlines()
    assert len(table) < 30
    if len(table) > 1:  # nothing changed when the selected encoder is one that pins its own mask
        assert table[0].split()[:2] == ["Path", "Metric"] and table[1].split()[1].startswith("lift_"), table
    # The detail is one step away: the pretraining reports of the re-trained experiments changed, the others not.
    targets = [paths.pretrain_metrics(exp) for exp in EXPERIMENTS]
    changed = json.loads(run(["dvc", "metrics", "diff", "--json", "--targets", *targets], repo).stdout)
    for exp in ("exp1_baseline", "exp2_conservative", "exp3_aggressive"):
        m = json.loads((repo / paths.pretrain_metrics(exp)).read_text())
        assert changed[paths.pretrain_metrics(exp)]["mask"] == {"old": "patch", "new": "random"}, exp
        assert changed[paths.pretrain_metrics(exp)]["best_val_loss"]["new"] == m["best_val_loss"], exp
    # Experiments that pin their own mask did not re-run: their reports are unchanged.
    assert paths.pretrain_metrics("exp4_block_mask") not in changed
    assert paths.pretrain_metrics("exp5_random_mask") not in changed
    # The detailed reports are stage outputs that DVC caches, not DVC metrics; `moola report` reads them (the
    # tour's table, test above).
    lock_outs = {o["path"] for stage in yaml.safe_load((repo / "dvc.lock").read_text())["stages"].values()
                 for o in stage.get("outs", [])}
    assert {paths.ANSWER, *DETAILED} <= lock_outs
    shown_metrics = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    assert list(shown_metrics[""]["data"]) == [paths.ANSWER]

    # `dvc exp show`: the workspace and the new experiment (under the tour's commit) ran with mask random;
    # the commit itself keeps patch. Every row has the headline and nothing else as metrics.
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    workspace = next(e for e in shown if e["rev"] == "workspace")
    head = next(e for e in shown if e["rev"] != "workspace" and e.get("experiments"))
    new = head["experiments"][0]["revs"][0]
    for entry, mask in ((workspace, "random"), (new, "random"), (head, "patch")):
        assert entry["data"]["params"]["params.yaml"]["data"]["mask"] == mask, entry["rev"]
        assert list(entry["data"]["metrics"]) == [paths.ANSWER], entry["rev"]
    for entry in (workspace, new):
        assert entry["data"]["metrics"][paths.ANSWER]["data"] == answer
    metric_columns = set().union(*map(_metric_names, (workspace, head, new)))
    assert len(metric_columns) <= 40 and f"{paths.ANSWER}:lift_acc" in metric_columns
    # By default (every param and dep too) the first columns after the row's own are the headline's, lift first.
    header = next(csv.reader(io.StringIO(run(["dvc", "exp", "show", "--csv"], repo).stdout)))
    own = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}  # the row's own columns
    assert [c for c in header if c not in own][:3] == ["lift_acc", "lift_acc_lo", "lift_acc_hi"], header
    assert len([c for c in header if c in answer]) == len(answer) <= 40
    # The README's recipe: only what differs, no deps; a 240-column terminal shows every cell, the mask among them.
    recipe = next(csv.reader(io.StringIO(run(["dvc", "exp", "show", "--csv", *EXP_SHOW_RECIPE], repo).stdout)))
    assert "mask" in recipe and not any("/" in c for c in recipe) and "Created" not in recipe, recipe
    table = run(["dvc", "exp", "show", "--no-pager", *EXP_SHOW_RECIPE], repo, env={"COLUMNS": "240"}).stdout
    assert "…" not in table and "lift_acc" in table and "random" in table, table
    assert max(map(len, table.splitlines())) <= 240
    # `dvc plots diff`: every plot draws both runs (the tour's commit and the experiment in the workspace), and
    # its picture tells them apart: the legend or the facet headers name both revisions.
    plots = json.loads(run(["dvc", "plots", "diff", "HEAD", "--json"], repo).stdout)
    declared = yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
    assert not plots.get("errors") and len(plots["data"]) == len(declared) == 13
    for name, entries in plots["data"].items():
        spec = entries[0]["content"]
        assert {v["rev"] for v in spec["data"]["values"]} == {"HEAD", "workspace"}, name
    # (Each picture naming both revisions: `moola figures` below draws these same specs and the files are checked.)
    loss = next(entries[0]["content"] for name, entries in plots["data"].items() if name.startswith("Pretraining val"))
    exp1 = {rev: [v["val_loss"] for v in loss["data"]["values"] if v["rev"] == rev and v["filename"] ==
                  "exp1_baseline.csv"] for rev in ("HEAD", "workspace")}
    assert exp1["HEAD"] != exp1["workspace"]  # re-trained with the random mask
    # `moola figures --rev HEAD` draws the same diff to files (one SVG per plot, both revisions named in each).
    out = repo.parent / "figures"
    run(["python", "-m", "moola.cli", "figures", str(out), "--rev", "HEAD", "--format", "svg"], repo)
    assert sorted(p.stem for p in out.iterdir()) == sorted(figures.file_stem(name) for name in plots["data"])
    for path in out.iterdir():
        assert ">HEAD<" in path.read_text() and ">workspace<" in path.read_text(), path.name
