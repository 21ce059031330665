"""The laptop tour and the experiment workflow of the README, through real `dvc exp run` at a tiny scale:
`moola tour`, then `dvc exp run -S mask=random`, `dvc metrics diff`, `dvc params diff` and `dvc exp show`.

The tour starts from a copy of the session's reference run (pipeline_runs: every stage really trained), shrunk
by -S to that run's params, so DVC restores its stages from the run-cache instead of training them again; the
`-S mask=random` experiment then really re-trains what follows the top-level mask.
"""

from __future__ import annotations

import json

import pytest

import shutil

from conftest import run

pytest_plugins = ["pipeline_runs"]

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The tour's own scale is minutes of training; these -S options (they come after the tour's own) shrink it to
# seconds. A small model: this test is about the workflow, not the numbers.
SHRINK = [
    "-S", "scale.windows=0.006", "-S", "scale.epochs=0.04", "-S", "pretrain.batch_size=32",
    "-S", "pretrain.hidden_size=16", "-S", "pretrain.decoder_hidden=8", "-S", "finetune.hidden_size=16",
    "-S", "finetune.folds=2", "-S", "finetune.seeds=[1337]",
]


@pytest.fixture(scope="module")
def toured(reference_run, tmp_path_factory):
    repo = tmp_path_factory.mktemp("tour") / "repo"
    shutil.copytree(reference_run.repo, repo, symlinks=True)
    out = run(["python", "-m", "moola.cli", "tour", *SHRINK], repo, timeout=1200).stdout
    return repo, out


def test_tour_runs_every_stage_through_dvc_and_prints_the_results(toured):
    repo, out = toured
    assert out.startswith("$ dvc exp run -S scale.windows=0.04")
    assert out.splitlines()[0].endswith(" finetune label_curve")  # the tour's targets: no ablation
    for stage in ["prepare", "augment@warp12_x4", "pretrain@exp1_baseline", "pretrain@exp5_random_mask", "select",
                  "finetune", "label_curve"]:
        assert f"Running stage '{stage}'" in out or f"Stage '{stage}' is cached" in out or (
            f"Stage '{stage}' didn't change" in out), stage
    assert "finetune_ablation" not in out
    table = out[out.index("Pretraining (validation loss"):]
    for exp in ["exp1_baseline", "exp2_conservative", "exp3_aggressive", "exp4_block_mask", "exp5_random_mask"]:
        assert exp in table and "(not run)" not in table
    selected = json.loads((repo / "metrics/select.json").read_text())["selected"]
    assert f"Selected encoder: {selected}" in table
    finetune = json.loads((repo / "metrics/finetune.json").read_text())
    accuracy = finetune["pretrained"]["accuracy"]["mean"]
    out_of_fold = table.split("Fine-tuning, out of fold")[1]
    assert f"{100 * accuracy:5.1f}%" in out_of_fold.split("pretrained")[1].splitlines()[0]
    assert "majority" in table and "logreg" in table and "Ablation: not run" in table
    # The held-out table and the curve: the tour's own sizes, numbers as the metrics files hold them.
    heldout = finetune["heldout"]
    assert heldout["windows"] == 300 and f"Held-out test set ({heldout['windows']} windows" in table
    lift = heldout["lift"]["accuracy"]
    assert f"accuracy {100 * lift['point']:+.1f} points [{100 * lift['ci_low']:+.1f}, {100 * lift['ci_high']:+.1f}]" in table
    curve = json.loads((repo / "metrics/label_curve.json").read_text())
    assert list(curve["sizes"]) == ["20", "45", "89"] and curve["skipped_sizes"] == [] and curve["seeds"] == [1337]
    row = next(line for line in table.splitlines() if line.strip().startswith("45 "))
    assert f"{100 * curve['sizes']['45']['pretrained']['accuracy']['point']:5.1f}%" in row
    shown = run(["dvc", "exp", "show", "--no-pager", "--csv"], repo).stdout
    assert "scale.windows" in shown or "0.006" in shown


def test_mask_override_reruns_only_what_follows_the_top_level_mask(toured):
    repo, _ = toured
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "--allow-empty", "-m", "the tour's results"], repo)
    out = run(["dvc", "exp", "run", "-S", "mask=random"], repo, timeout=1200).stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}
    assert {"pretrain@exp1_baseline", "pretrain@exp2_conservative", "pretrain@exp3_aggressive"} <= ran
    assert "pretrain@exp4_block_mask" not in ran and "pretrain@exp5_random_mask" not in ran
    assert "prepare" not in ran and not any(name.startswith("augment@") for name in ran)

    params = run(["dvc", "params", "diff"], repo).stdout
    assert "mask" in params and "patch" in params and "random" in params
    diff = run(["dvc", "metrics", "diff", "--json"], repo).stdout
    changed = json.loads(diff)
    assert "metrics/pretrain/exp1_baseline.json" in changed
    assert changed["metrics/pretrain/exp1_baseline.json"]["mask"]["new"] == "random"
    # Experiments that pin their own mask did not re-run: their metrics are unchanged.
    assert "metrics/pretrain/exp4_block_mask.json" not in changed
    assert "metrics/pretrain/exp5_random_mask.json" not in changed
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    assert '"mask": "random"' in json.dumps(shown)
