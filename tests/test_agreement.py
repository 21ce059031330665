"""dvc.yaml and params.yaml name the same experiments everywhere, checked without running anything.

Adding an experiment is two edits (params.yaml's `experiments`, dvc.yaml's `pretrain.foreach`; select, its plots,
the ablation and the artifacts follow from the foreach or are listed here); this test names the place that was
forgotten, instead of `select` failing after hours of pretraining.
"""

from __future__ import annotations

import re

import yaml

from conftest import ROOT


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _experiments_in(paths, pattern: str) -> set[str]:
    return {m.group(1) for p in paths if (m := re.fullmatch(pattern, p))}


def test_every_place_of_dvc_yaml_names_the_experiments_of_params_yaml():
    experiments = set(_load("params.yaml")["experiments"])
    dvc = _load("dvc.yaml")
    stages = dvc["stages"]
    assert set(stages["pretrain"]["foreach"]) == experiments, "dvc.yaml stages.pretrain.foreach"
    # The ablation iterates params.yaml's experiments itself, the replicates its replicate seeds.
    assert stages["finetune_ablation"]["foreach"] == "${experiments}"
    assert stages["replicate"]["foreach"] == "${replicates.seeds}"
    select_deps = stages["select"]["deps"]
    assert _experiments_in(select_deps, r"data/pretrained/(\w+)_encoder\.pt") == experiments, "select deps (encoders)"
    assert _experiments_in(select_deps, r"metrics/pretrain/(\w+)\.json") == experiments, "select deps (metrics)"
    assert _experiments_in(select_deps, r"plots/pretrain/(\w+)\.csv") == experiments, "select deps (curves)"
    for plot in dvc["plots"]:
        (title, spec), = plot.items()
        files = list(spec["y"])
        if all(f.startswith("plots/pretrain/") for f in files):
            assert _experiments_in(files, r"plots/pretrain/(\w+)\.csv") == experiments, f"plot {title!r}"
    artifacts = [a["path"] for a in dvc["artifacts"].values()]
    assert _experiments_in(artifacts, r"data/pretrained/(\w+)_encoder\.pt") == experiments, "artifacts"


def test_every_experiment_trains_on_the_recipe_params_yaml_gives_it():
    params = _load("params.yaml")
    default_recipe = params["pretrain"]["augment"]
    foreach = _load("dvc.yaml")["stages"]["pretrain"]["foreach"]
    for name, overrides in params["experiments"].items():
        recipe = (overrides or {}).get("augment", default_recipe)
        assert foreach[name]["augment"] == recipe, f"dvc.yaml pretrain.foreach.{name}.augment"
        own_mask = "mask" in (overrides or {})
        expected = f"experiments.{name}.mask" if own_mask else "mask"
        assert foreach[name]["mask_from"] == expected, f"dvc.yaml pretrain.foreach.{name}.mask_from"


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
