"""The plots: every one of `dvc plots show` draws the comparison its title names, and `moola figures` renders them
to PNG and SVG offline. The pipeline checks read the shared reference run (tests/pipeline_runs.py: no new run);
each asks DVC for the plots (about 2 s) and renders them (about 2 s). `dvc plots diff` is tested in test_tour.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, run

from moola import figures, finetuning
from moola.params import CLASS_NAMES, load_params
from moola.stages.finetune import heldout_confusion_csv

pytest_plugins = ["pipeline_runs"]

CURVES = "Fine-tuning losses per epoch"
PRETRAIN_VAL, PRETRAIN_TRAIN = "Pretraining validation loss", "Pretraining training loss"
HELDOUT_CONFUSION, OOF_CONFUSION = "Held-out confusion matrices", "Out-of-fold confusion matrices"


def rev_channels(spec) -> set[str]:
    """The encoding channels (and facet rows/columns) anywhere in a spec that draw the field `rev`."""
    found = set()
    if isinstance(spec, dict):
        for key, value in spec.items():
            if isinstance(value, dict) and value.get("field") == "rev":
                found.add(key)
            found |= rev_channels(value)
    elif isinstance(spec, list):
        for value in spec:
            found |= rev_channels(value)
    return found


def by_title(shown: dict, title: str) -> dict:
    names = [name for name in shown["data"] if name.startswith(title)]
    assert len(names) == 1, (title, list(shown["data"]))
    return shown["data"][names[0]][0]["content"]


@pytest.fixture(scope="module")
def shown(reference_run) -> dict:
    return json.loads(run(["dvc", "plots", "show", "--json"], reference_run.repo).stdout)


@pytest.fixture(scope="module")
def svgs(shown) -> dict[str, str]:
    """Each plot's picture as SVG text: what a reader sees (legends, facet headers, the numbers in the cells)."""
    return {name: figures.render(entries[0]["content"], "svg").decode() for name, entries in shown["data"].items()}


def svg_of(svgs: dict[str, str], title: str) -> str:
    return next(text for name, text in svgs.items() if name.startswith(title))


def test_heldout_confusion_csv_counts_every_cell_of_every_model():
    labels = np.array([0, 0, 1, 1, 1])
    proba = {"pretrained": np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4]]),
             "majority": np.tile([0.7, 0.3], (5, 1))}
    table = pd.read_csv(io.StringIO(heldout_confusion_csv(labels, proba)))
    assert list(table.columns) == ["model", "actual", "predicted", "windows"]
    cells = {(m, a, p): n for m, a, p, n in table.itertuples(index=False)}
    c0, c1 = CLASS_NAMES
    assert cells == {
        ("pretrained", c0, c0): 1, ("pretrained", c0, c1): 1, ("pretrained", c1, c0): 1, ("pretrained", c1, c1): 2,
        ("majority", c0, c0): 2, ("majority", c0, c1): 0, ("majority", c1, c0): 3, ("majority", c1, c1): 0,
    }


def test_dvc_yaml_plots_are_the_top_level_ones_only(shown):
    """No stage lists plots of its own: each file is drawn once, in a plot with a title that says what it shows."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        assert "plots" not in stage.get("do", stage), name
    titles = [next(iter(plot)) for plot in dvc["plots"]]
    assert sorted(shown["data"]) == sorted(titles)
    assert not shown.get("errors")


def test_finetuning_curves_draw_every_network_init_training_and_validation(reference_run, shown, svgs):
    spec = by_title(shown, CURVES)
    values = spec["data"]["values"]
    curves = pd.read_csv(reference_run.repo / "plots/finetune/curves.csv")
    # Every loss column of curves.csv is drawn (a new init's columns need their line in dvc.yaml).
    assert {v["field"] for v in values} == set(curves.columns) - {"epoch"}
    assert {f"{init}_{split}_loss" for init in finetuning.NETWORK_INITS for split in ("train", "val")} <= {
        v["field"] for v in values}
    assert spec["encoding"]["color"]["field"] == "model" and spec["encoding"]["column"]["field"] == "loss"
    assert rev_channels(spec) == {"strokeDash"}
    picture = svg_of(svgs, CURVES)
    for words in (*finetuning.NETWORK_INITS, "training loss", "validation loss"):
        assert words in picture, words


@pytest.mark.parametrize("title,field", [(PRETRAIN_VAL, "val_loss"), (PRETRAIN_TRAIN, "train_loss")])
def test_pretraining_losses_colour_every_experiment(reference_run, shown, svgs, title, field):
    spec = by_title(shown, title)
    experiments = list(load_params(reference_run.repo / "params.yaml").experiments)
    values = spec["data"]["values"]
    assert {v["filename"] for v in values} == {f"{exp}.csv" for exp in experiments}
    assert {v["field"] for v in values} == {field}
    assert spec["encoding"]["color"]["field"] == "experiment" and rev_channels(spec) == {"strokeDash"}
    # The legend names the experiments (the template derives them from the file names).
    picture = svg_of(svgs, title)
    for exp in experiments:
        assert exp in picture, exp
    # The epoch axis ends at the last epoch any experiment ran.
    assert spec["encoding"]["x"]["scale"]["nice"] is False


def test_heldout_confusion_counts_every_models_windows(reference_run, shown, svgs):
    spec = by_title(shown, HELDOUT_CONFUSION)
    table = pd.DataFrame(spec["data"]["values"]).astype({"windows": int})
    heldout = json.loads((reference_run.repo / "metrics/finetune.json").read_text())["heldout"]
    assert set(table["model"]) == set(finetuning.NETWORK_INITS + finetuning.REFERENCE_INITS)
    for model, cells in table.groupby("model"):
        assert len(cells) == 4 and cells["windows"].sum() == heldout["windows"] == 300, model
        assert cells.groupby("actual")["windows"].sum().to_dict() == heldout["class_counts"], model
        # One fine-tuning seed (conftest.TINY): a model's ensemble is its one run, whose accuracy is the reported
        # point. Not pretrained's: its ensemble averages both replicates, its point is the mean of their accuracies.
        if model != "pretrained":
            right = cells.loc[cells["actual"] == cells["predicted"], "windows"].sum()
            assert right / 300 == pytest.approx(heldout[model]["accuracy"]["point"], abs=1e-6), model
    text = spec["spec"]["layer"][1]
    assert text["mark"]["type"] == "text" and text["encoding"]["text"]["field"] == "windows"
    assert spec["facet"]["column"]["field"] == "model" and rev_channels(spec) == {"row"}
    picture = svg_of(svgs, HELDOUT_CONFUSION)
    for n in table["windows"]:
        assert f">{n}<" in picture, n


def test_out_of_fold_confusion_is_labelled_out_of_fold(reference_run, shown, svgs):
    spec = by_title(shown, OOF_CONFUSION)
    assert {v["filename"] for v in spec["data"]["values"]} == {
        f"confusion_{init}.csv" for init in finetuning.NETWORK_INITS}
    assert "Out-of-fold" in spec["title"] and len(spec["data"]["values"]) == 89 * len(finetuning.NETWORK_INITS)
    picture = svg_of(svgs, OOF_CONFUSION)
    for init in finetuning.NETWORK_INITS:
        assert init in picture


def test_label_curve_axis_ends_at_the_data_and_its_bands_say_what_they_cover(shown):
    for title in ("Held-out accuracy", "Held-out MCC"):
        spec = by_title(shown, title)
        x = spec["encoding"]["x"]
        assert x["scale"] == {"type": "log", "nice": False, "padding": 8}
        assert x["axis"]["labelOverlap"] == "greedy"
        assert "95% bootstrap interval" in spec["title"]["subtitle"]
        assert rev_channels(spec) == {"strokeDash", "detail"}


def test_moola_figures_writes_every_plot_as_png_and_svg(reference_run, shown, tmp_path):
    out = tmp_path / "figures"
    proc = run(["python", "-m", "moola.cli", "figures", str(out), "--format", "png", "--format", "svg"],
               reference_run.repo)
    stems = {figures.file_stem(name) for name in shown["data"]}
    assert len(stems) == len(shown["data"])
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.{f}" for s in stems for f in ("png", "svg"))
    for stem in stems:
        png, svg = (out / f"{stem}.png").read_bytes(), (out / f"{stem}.svg").read_text()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000, stem
        assert svg.lstrip().startswith("<svg") and "</svg>" in svg, stem
    assert proc.stdout.count("wrote ") == 2 * len(stems)


def test_moola_figures_refuses_a_folder_without_plots_in_one_line(tmp_path):
    repo = tmp_path / "empty"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    proc = run(["python", "-m", "moola.cli", "figures", str(tmp_path / "out")], repo, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: dvc plots show gave no plot with data")
    assert not (tmp_path / "out").exists()


def test_moola_figures_skips_a_plot_without_data_and_names_its_file(tmp_path):
    repo = tmp_path / "repo"
    (repo / "plots").mkdir(parents=True)
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    (repo / ".dvc" / "plots").mkdir(exist_ok=True)
    (repo / ".dvc" / "plots" / "experiments.json").write_text((ROOT / ".dvc/plots/experiments.json").read_text())
    pd.DataFrame({"epoch": [1, 2, 3], "val_loss": [0.5, 0.3, 0.2]}).to_csv(repo / "plots/exp_a.csv", index=False)
    plot = {"template": "experiments", "x": "epoch"}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": [
        {"Drawn": {**plot, "y": {"plots/exp_a.csv": "val_loss"}}},
        {"Not run": {**plot, "y": {"plots/exp_b.csv": "val_loss"}}},
    ]}))
    proc = run(["python", "-m", "moola.cli", "figures", str(tmp_path / "out")], repo)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["drawn.png"]
    assert "skipped 'Not run': plots/exp_b.csv: " in proc.stderr and "No such file" in proc.stderr
