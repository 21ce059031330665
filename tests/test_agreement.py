"""dvc.yaml and params.yaml name the same experiments everywhere, checked without running anything.

params.yaml describes each experiment once; dvc.yaml's pretrain and finetune_ablation iterate it (foreach), and select
depends on the pretrain outputs' folders. What DVC cannot iterate (the two pretraining plots, the artifacts) names the
experiments one by one: this test names the place an added experiment is missing from.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

import yaml

from conftest import ROOT


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _experiments_in(paths, pattern: str) -> set[str]:
    return {m.group(1) for p in paths if (m := re.fullmatch(pattern, p))}


def test_dvc_yaml_iterates_the_experiments_of_params_yaml():
    from moola import paths

    stages = _load("dvc.yaml")["stages"]
    pretrain = stages["pretrain"]
    assert pretrain["foreach"] == "${experiments}" and stages["finetune_ablation"]["foreach"] == "${experiments}"
    assert stages["replicate"]["foreach"] == "${replicates.seeds}"
    # The recipe file and the mask's param come from the experiment's entry, not from a copy in dvc.yaml.
    assert paths.augmented("${item.augment}") in pretrain["do"]["deps"]
    assert "${item.mask_from}" in pretrain["do"]["params"] and "experiments.${key}" in pretrain["do"]["params"]
    # select reads every experiment's encoder, metrics and curve: it depends on their folders (and on the params
    # that say which experiments there are).
    folders = {str(PurePosixPath(f("x")).parent) for f in (paths.encoder, paths.pretrain_metrics, paths.pretrain_curve)}
    assert folders <= set(stages["select"]["deps"]) and "experiments" in stages["select"]["params"]
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert all(f"/{folder}/" in ignored for folder in folders), "DVC must not write a .gitignore into select's deps"


def test_the_plots_and_artifacts_name_every_experiment_of_params_yaml():
    experiments = set(_load("params.yaml")["experiments"])
    dvc = _load("dvc.yaml")
    pretrain_plots = 0
    for plot in dvc["plots"]:
        (title, spec), = plot.items()
        files = list(spec["y"])
        if all(f.startswith("plots/pretrain/") for f in files):
            pretrain_plots += 1
            assert _experiments_in(files, r"plots/pretrain/(\w+)\.csv") == experiments, f"plot {title!r}"
    assert pretrain_plots == 2
    artifacts = [a["path"] for a in dvc["artifacts"].values()]
    assert _experiments_in(artifacts, r"data/pretrained/(\w+)_encoder\.pt") == experiments, "artifacts"


def _declared_outputs(dvc: dict) -> set[str]:
    """Every path dvc.yaml names as a stage's outs, metrics or plots (foreach templates as written)."""
    found = set()
    for stage in dvc["stages"].values():
        body = stage.get("do", stage)
        for key in ("outs", "metrics", "plots"):
            for entry in body.get(key, []):
                found.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    return found


def test_moola_paths_and_dvc_yaml_name_the_same_outputs():
    from moola import finetuning, paths

    dvc = _load("dvc.yaml")
    templated = {
        paths.augmented("${key}"), paths.encoder("${key}"), paths.pretrain_metrics("${key}"),
        paths.pretrain_curve("${key}"), paths.ablation_metrics("${key}"),
        # replicate iterates a list (replicates.seeds): its entries are ${item}
        paths.replicate_dir("${item}"), paths.replicate_metrics("${item}"), paths.replicate_curve("${item}"),
        *(paths.confusion(init) for init in finetuning.NETWORK_INITS),
    }
    # Not outputs themselves: the runtime facts' folder, the folder of the replicates' outputs (a dep, below) and a
    # file name inside each replicate's folder.
    not_outputs = {"RUNTIME_DIR", "REPLICATES_DIR", "REPLICATE_ENCODER"}
    constants = {value for name, value in vars(paths).items()
                 if name.isupper() and isinstance(value, str) and name not in not_outputs}
    assert _declared_outputs(dvc) == constants | templated
    # The stages that read the replicates' encoders depend on the folder that holds every replicate's outputs.
    assert paths.replicate_dir("101").startswith(paths.REPLICATES_DIR + "/")
    readers = {name for name, stage in dvc["stages"].items() if paths.REPLICATES_DIR in stage.get("do", stage)["deps"]}
    assert readers == {"finetune", "label_curve", "budget_curve"}
    # DVC's metrics are the headline alone (so `dvc exp show` shows the answer first); every other report is a
    # plain output, and the runtime facts are not declared at all.
    declared_metrics = [entry for stage in dvc["stages"].values()
                        for entry in stage.get("do", stage).get("metrics", [])]
    assert declared_metrics == [paths.ANSWER] and "metrics" not in dvc
    # The example files are params.yaml's defaults for prepare's inputs.
    data = _load("params.yaml")["data"]
    assert (data["bars"], data["labels"], data["test_labels"]) == (
        paths.EXAMPLE_BARS, paths.EXAMPLE_LABELS, paths.EXAMPLE_TEST_LABELS)
