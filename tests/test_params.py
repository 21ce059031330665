"""params.yaml is loaded once into typed objects; every mistake is one line naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moola.errors import ParamsError
from moola.params import load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def spec() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_spec_is_the_default():
    p = load_params(ROOT / "params.yaml")
    assert p.seed == 1337 and p.mask == "patch"
    assert (p.scale.windows, p.scale.epochs) == (1.0, 1.0)
    assert p.unlabeled_windows == 11873 and p.data.labeled_windows == 89 and p.data.window == 105
    table = {e.name: (e.epochs, e.mask, e.recipe.time_warp_sigma, e.recipe.multiplier) for e in p.all_experiments()}
    assert table == {
        "exp1_baseline": (75, "patch", 0.12, 4),
        "exp2_conservative": (50, "patch", 0.10, 3),
        "exp3_aggressive": (100, "patch", 0.15, 5),
        "exp4_block_mask": (75, "block", 0.12, 4),
        "exp5_random_mask": (75, "random", 0.12, 4),
    }
    assert p.experiment("exp1_baseline").train == p.pretrain  # no overrides: exp1 trains with `pretrain` as it is
    assert p.pretrain.hidden_size == 128 and p.pretrain.mask_ratio == 0.15
    assert p.finetune.hidden_size == 128 and p.finetune.attention_heads == 8 and p.finetune.folds == 5


def test_scale_shrinks_windows_and_pretraining_epochs_not_the_table():
    raw = spec()
    raw["scale"] = {"windows": 0.01, "epochs": 0.1}
    raw["replicates"]["snapshot_epochs"] = [1, 2, 4]  # the default's 8-32 are past exp2's 5 epochs (refused)
    p = parse_params(raw)
    assert p.unlabeled_windows == 119
    assert [e.epochs for e in p.all_experiments()] == [8, 5, 10, 8, 8]
    assert p.experiments["exp3_aggressive"]["epochs"] == 100  # the literal spec number is kept
    # Fine-tuning is never scaled: a classifier cut to a few epochs does not train.
    assert (p.finetune.epochs, p.finetune.freeze_epochs) == (60, 10)


def test_top_level_mask_reaches_only_experiments_without_their_own():
    raw = spec()
    raw["mask"] = "random"
    masks = {e.name: e.mask for e in parse_params(raw).all_experiments()}
    assert masks == {
        "exp1_baseline": "random",
        "exp2_conservative": "random",
        "exp3_aggressive": "random",
        "exp4_block_mask": "block",
        "exp5_random_mask": "random",
    }


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(colour="red"), "unknown key 'colour'"),
        (lambda r: r["pretrain"].update(epoch=3), "unknown key 'pretrain.epoch'"),
        (lambda r: r["experiments"]["exp2_conservative"].update(epochs="many"),
         "experiments.exp2_conservative.epochs must be an integer, got 'many'"),
        (lambda r: r["experiments"]["exp2_conservative"].update(epochs=0),
         "experiments.exp2_conservative.epochs must be greater than 0, got 0"),
        # Every value lives in params.yaml: nothing falls back to a default in the code.
        (lambda r: r["pretrain"].pop("learning_rate"), "missing key 'pretrain.learning_rate' (a number expected)"),
        (lambda r: r["experiments"]["exp1_baseline"].pop("epochs"), "missing key 'experiments.exp1_baseline.epochs'"),
        (lambda r: r["pretrain"].update(epochs=75), "unknown key 'pretrain.epochs'"),
        # mask_from is the param dvc.yaml makes pretrain@<name> depend on: it must be the one that decides the mask.
        (lambda r: r["experiments"]["exp1_baseline"].update(mask="block"),
         "experiments.exp1_baseline.mask_from must be 'experiments.exp1_baseline.mask', the param that decides its "
         "own mask, got 'mask'"),
        (lambda r: r["experiments"]["exp4_block_mask"].pop("mask"),
         "experiments.exp4_block_mask.mask_from must be 'mask', the param that decides the top-level mask"),
        (lambda r: r["pretrain"].update(batch_size=-4), "pretrain.batch_size must be greater than 0"),
        (lambda r: r.update(mask="stripes"), "mask must be one of 'random', 'block', 'patch', got 'stripes'"),
        (lambda r: r["experiments"]["exp4_block_mask"].update(mask="dots"), "experiments.exp4_block_mask.mask"),
        (lambda r: r["experiments"]["exp2_conservative"].update(augment="warp99"), "names recipe 'warp99'"),
        (lambda r: r["experiments"]["exp2_conservative"].update(lr=1), "unknown key 'experiments.exp2_conservative.lr'"),
        (lambda r: r["data"].update(unlabeled_windows=0), "data.unlabeled_windows must be greater than 0"),
        (lambda r: r["scale"].update(windows=0), "scale.windows must be greater than 0"),
        (lambda r: r["scale"].update(epochs=True), "scale.epochs must be a number"),
        (lambda r: r["data"].update(source="files"), "data.source is gone: prepare reads the files that data.bars"),
        (lambda r: r["finetune"].update(attention_heads=5), "must be divisible by finetune.attention_heads"),
        (lambda r: r["finetune"].update(seeds=[]), "finetune.seeds must be a non-empty list"),
        (lambda r: r["finetune"].update(seeds=[1, 2, 1]), "finetune.seeds must be distinct, got [1, 2, 1]"),
        (lambda r: r["curve"].update(seeds=[5, 5, 6]), "curve.seeds must be distinct and not empty"),
        (lambda r: r["finetune"].update(bootstrap_block=0), "finetune.bootstrap_block must be a positive integer"),
        (lambda r: r["finetune"].update(bootstrap_block=-3), "finetune.bootstrap_block must be a positive integer"),
        (lambda r: r["finetune"].update(bootstrap_block="big"), "or auto, got 'big'"),
        (lambda r: r["finetune"].update(bootstrap_block=True), "finetune.bootstrap_block must be a positive integer"),
        (lambda r: r["finetune"].update(folds=90), "finetune.folds (90) must not exceed data.labeled_windows (89)"),
        (lambda r: r["augment"]["recipes"]["warp12_x4"].update(multiplier=-1), "multiplier must be at least 0"),
        (lambda r: r["finetune"].update(precision="fp16"), "finetune.precision must be one of 'fp32', 'bf16', got 'fp16'"),
    ],
)
def test_bad_params_are_one_line_errors_naming_the_key(edit, message):
    raw = spec()
    edit(raw)
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    text = str(info.value)
    assert message in text and "\n" not in text and text.startswith("params.yaml: ")


def test_stage_exits_2_with_one_line_on_bad_params(tmp_path):
    raw = spec()
    raw["pretrain"]["mask_ratio"] = "lots"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "moola.stages.prepare"], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: params.yaml: pretrain.mask_ratio must be a number, got 'lots'"]
    assert not (tmp_path / "data").exists()


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\nmask: [patch\n")
    with pytest.raises(ParamsError, match=r"params.yaml: not valid YAML at line \d"):
        load_params(path)


def test_the_spec_and_the_study_fine_tune_and_draw_the_curve_with_at_least_3_seeds():
    """The load check asks only for distinct seeds (the tour, a smoke test, runs one); the answer's runs have 3, so
    that every interval of the spec and the study covers the fine-tuning seeds (README "Results")."""
    from moola.cli import STUDY_SET

    p = parse_params(spec())
    assert len(p.finetune.seeds) >= 3 and len(p.curve.seeds) >= 3
    assert not {"finetune.seeds", "curve.seeds"} & set(STUDY_SET)
