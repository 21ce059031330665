"""`dvc status` says "up to date" only over outputs that the current data, code and params would make.

Through real `dvc` in temporary copies: every moola module a stage's command imports is one of its deps (or on the
plumbing list), every input that decides an output (a label row, a bar's price, a module, a param) makes
`dvc status` name the stage and `dvc repro` re-run it, for the example market and for a user's own files, and an
edit of plumbing re-runs nothing.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT, make_repo, run
from moola.market import generate_market
from moola.windows import read_windows

pytest.register_assert_rewrite("pipeline_runs")
pytest_plugins = ["pipeline_runs"]

# Modules that decide no number, so no stage lists them (dvc.yaml's comment block says the same, and
# test_plumbing_list_is_the_one_dvc_yaml_states keeps the two equal). Anything else a stage imports is its dep.
PLUMBING = (
    "src/moola/errors.py",  # error types, the one-line `error: ...` and exit 2
    "src/moola/io.py",  # atomic writers (temporary file, then rename)
    "src/moola/validation.py",  # params.yaml type and range checks, and their error texts
    "src/moola/paths.py",  # where each output lives (the same paths as dvc.yaml; test_agreement.py)
)

DATA_STAGES = ["example_market", "prepare", "augment@warp12_x4", "augment@warp10_x3", "augment@warp15_x5"]
LABELED = "data/prepared/labeled_windows.parquet"
UNLABELED = "data/prepared/unlabeled_windows.parquet"
LABEL_POOL = "data/prepared/label_pool.parquet"
TEST = "data/prepared/test_windows.parquet"


# --- what each stage imports and lists -------------------------------------------------------------------------


def stage_table(repo: Path) -> dict[str, dict]:
    """Each stage of the repository's dvc.yaml (foreach resolved by DVC itself): its cmd and its deps."""
    code = (
        "import json\nfrom dvc.repo import Repo\n"
        "with Repo('.') as repo:\n"
        "    print(json.dumps({s.addressing: {'cmd': s.cmd, 'deps': [d.def_path for d in s.deps]}"
        " for s in repo.index.stages}))"
    )
    return json.loads(run([sys.executable, "-c", code], repo).stdout)


def module_file(repo: Path, dotted: str) -> str | None:
    base = repo / "src" / Path(*dotted.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path.relative_to(repo).as_posix()
    return None


def static_moola_imports(repo: Path, rel: str) -> set[str]:
    """moola modules a file imports anywhere in it (also inside functions), by its syntax tree."""
    found = set()
    for node in ast.walk(ast.parse((repo / rel).read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "moola" and (path := module_file(repo, name)):
                found.add(path)
    return found


def imported_modules(repo: Path, module: str) -> set[str]:
    """moola source files that importing `module` loads (in a fresh interpreter), plus what they import lazily."""
    code = (
        "import importlib, json, sys\nimportlib.import_module(sys.argv[1])\n"
        "print(json.dumps(sorted(m.__file__ for n, m in list(sys.modules.items())"
        " if n.split('.')[0] == 'moola' and getattr(m, '__file__', None))))"
    )
    loaded = json.loads(run([sys.executable, "-c", code, module], repo).stdout)
    files = {Path(f).resolve().relative_to(repo.resolve()).as_posix() for f in loaded}
    todo = list(files)
    while todo:
        for path in static_moola_imports(repo, todo.pop()) - files:
            files.add(path)
            todo.append(path)
    return files


def needed_deps(repo: Path, files: set[str]) -> set[str]:
    """The imported files a stage must list: all but the plumbing and empty package markers."""
    return {f for f in files if f not in PLUMBING and not (f.endswith("__init__.py") and not (repo / f).read_text().strip())}


def stage_modules(repo: Path, stages: dict[str, dict]) -> dict[str, set[str]]:
    """Each stage of stage_table(repo) -> the moola files its cmd module imports (transitively)."""
    out, cache = {}, {}
    for name, stage in stages.items():
        match = re.search(r"python -m (moola(?:\.\w+)+)", stage["cmd"])
        assert match, f"{name}: cmd {stage['cmd']!r} does not run a moola module"
        if match.group(1) not in cache:
            cache[match.group(1)] = imported_modules(repo, match.group(1))
        out[name] = cache[match.group(1)]
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("deps") / "repo")


@pytest.fixture(scope="module")
def stages(project) -> dict[str, dict]:
    return stage_table(project)


@pytest.fixture(scope="module")
def modules(project, stages) -> dict[str, set[str]]:
    """The import scan (a fresh interpreter per stage module), made once for the two tests that read it."""
    return stage_modules(project, stages)


def test_plumbing_list_is_the_one_dvc_yaml_states():
    stated = re.findall(r"^#\s+plumbing:\s+(\S+)", (ROOT / "dvc.yaml").read_text(), flags=re.M)
    assert tuple(stated) == PLUMBING
    assert all((ROOT / path).is_file() for path in PLUMBING)


def test_every_stage_lists_every_module_its_command_imports(project, stages, modules):
    # conftest.TINY's two replicate seeds: one replicate@<seed> entry each
    replicates = {"replicate@101", "replicate@102"}
    assert set(stages) >= set(DATA_STAGES) | replicates | {"budget_curve"} and len(stages) == 21
    for name, stage in stages.items():
        deps = set(stage["deps"])
        missing = needed_deps(project, modules[name]) - deps
        assert not missing, f"dvc.yaml: stage {name} imports {sorted(missing)} but does not list it under deps"
        # Plumbing stays out: a better error message must not re-run a training.
        assert not deps & set(PLUMBING), f"dvc.yaml: stage {name} lists plumbing {sorted(deps & set(PLUMBING))}"
        listed_code = {d for d in deps if d.startswith("src/")}
        assert all((project / d).is_file() for d in listed_code), name
        assert "src/moola/params.py" in deps, name
    # The loader really sees the imports (a broken discovery would make this test vacuous).
    assert {"src/moola/pretraining.py", "src/moola/masking.py", "src/moola/params.py"} <= modules["pretrain@exp1_baseline"]
    assert "src/moola/market.py" in modules["example_market"] and "src/moola/market.py" not in modules["prepare"]
    # A replicate runs pretrain's code; the fine-tuning stages train through moola.fits.
    assert {"src/moola/stages/pretrain.py", "src/moola/pretraining.py"} <= modules["replicate@101"]
    assert all("src/moola/fits.py" in modules[name] for name in ("finetune", "label_curve", "budget_curve"))


# --- dvc status and dvc repro over real runs --------------------------------------------------------------------


def status(repo: Path, *targets: str) -> dict:
    return json.loads(run(["dvc", "status", "--json", *targets], repo).stdout or "{}")


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def with_param(text: str, dotted: str, value) -> str:
    """params.yaml's text with one param set."""
    params = yaml.safe_load(text)
    *path, last = dotted.split(".")
    node = params
    for key in path:
        node = node[key]
    node[last] = value
    return yaml.safe_dump(params, sort_keys=False)


def set_param(repo: Path, dotted: str, value) -> None:
    (repo / "params.yaml").write_text(with_param((repo / "params.yaml").read_text(), dotted, value))


# What `dvc status --json` prints is Repo.status()'s dict, keyed by stage address ("augment@warp12_x4"); these
# scripts ask the same API in one process for many edits instead of one `dvc status` start-up per edit. A fresh
# Repo per question, as each CLI run had.
DVC_STATUS = """\
import json, sys
from pathlib import Path
from dvc.repo import Repo


def status(targets=None):
    with Repo(".") as repo:
        return repo.status(targets=targets)
"""


@pytest.fixture
def data_repo(tmp_path) -> Path:
    """A tiny repository whose example_market, prepare and augment stages have run: `dvc status` is clean."""
    repo = make_repo(tmp_path / "repo")
    out = run(["dvc", "repro", "augment"], repo).stdout
    assert ran(out) == set(DATA_STAGES)
    assert status(repo, *DATA_STAGES) == {}
    return repo


def scalar_leaves(node, prefix=""):
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from scalar_leaves(value, dotted + ".")
        elif not isinstance(value, (list, bool)):
            yield dotted, value


def perturbed(dotted: str, value):
    if dotted == "mask":
        return "block" if value != "block" else "patch"
    if dotted == "data.heldout":
        return "anywhere" if value != "anywhere" else "after"
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.25 if value else 0.01
    return None


DATA_OUTPUTS = {
    "example_market": ["data/example/bars.parquet", "data/example/labels.csv", "data/example/test_labels.csv"],
    "prepare": [UNLABELED, LABELED, LABEL_POOL, TEST],
    "augment@warp12_x4": ["data/augmented/warp12_x4.npy"],
}
# argv[1]: a JSON file {"targets": [...], "outputs": DATA_OUTPUTS, "perturbations": {param: params.yaml text}}. For
# each perturbation: write params.yaml, ask `dvc status` (the API) over the targets, run the three data stages'
# commands (what dvc.yaml runs, in this process), see whose outputs changed, and put params and outputs back (cheaper
# than dvc checkout). Prints {"decided": {param: {"named", "changed"}}, "final": the status after all of them}.
PERTURB_EACH = DVC_STATUS + """\
import contextlib
from moola.stages import augment, example_market, prepare

job = json.loads(Path(sys.argv[1]).read_text())
outputs = job["outputs"]
params = Path("params.yaml")
original = params.read_bytes()


def output_bytes():
    return {stage: [Path(p).read_bytes() for p in paths] for stage, paths in outputs.items()}


baseline = output_bytes()
decided = {}
with contextlib.redirect_stdout(sys.stderr):  # the stages' own lines: stdout carries the JSON alone
    for dotted, text in job["perturbations"].items():
        params.write_text(text)
        named = sorted(status(job["targets"]))
        example_market.main()
        prepare.main()
        sys.argv = ["augment", "--recipe", "warp12_x4"]
        augment.main()
        now = output_bytes()
        decided[dotted] = {"named": named, "changed": sorted(s for s in outputs if now[s] != baseline[s])}
        params.write_bytes(original)
        for stage, paths in outputs.items():
            for path, blob in zip(paths, baseline[stage]):
                Path(path).write_bytes(blob)
    final = status(job["targets"])
print(json.dumps({"decided": decided, "final": final}, default=str))
"""


@pytest.mark.integration
@pytest.mark.slow
def test_each_param_that_changes_a_data_stage_output_makes_status_name_the_stage(data_repo, tmp_path):
    """For every scalar param a data stage could read (seed, mask, scale, data, augment; the recipe it runs): run the
    stages' commands by hand with the changed param; whichever stage's output changed, `dvc status` named first."""
    repo = data_repo
    original_params = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original_params)
    sections = {k: params[k] for k in ("seed", "mask", "scale", "data")}
    sections["augment"] = {k: v for k, v in params["augment"].items() if k != "recipes"}
    sections["augment"]["recipes"] = {"warp12_x4": params["augment"]["recipes"]["warp12_x4"]}
    perturbations = {}
    for dotted, value in scalar_leaves(sections):
        if dotted in ("data.bars", "data.labels", "data.test_labels"):  # the files themselves: the source tests below
            continue
        new = perturbed(dotted, value)
        assert new is not None, dotted
        perturbations[dotted] = with_param(original_params, dotted, new)
    job = tmp_path / "perturbations.json"
    job.write_text(json.dumps({"targets": DATA_STAGES, "outputs": DATA_OUTPUTS, "perturbations": perturbations}))
    result = json.loads(run([sys.executable, "-c", PERTURB_EACH, str(job)], repo).stdout)
    assert list(result["decided"]) == list(perturbations)
    decided = {}
    for dotted, seen in result["decided"].items():
        named, changed = set(seen["named"]), set(seen["changed"])
        # Upstream first: a changed upstream output is a changed dep, which `dvc status` names once upstream re-ran.
        first = next((s for s in DATA_OUTPUTS if s in changed), None)
        if first is not None:
            assert first in named, f"params.yaml {dotted}: {first}'s output changed, but `dvc status` named {named}"
        decided[dotted] = sorted(changed)
    assert (repo / "params.yaml").read_text() == original_params
    assert result["final"] == {}  # the restored workspace is what dvc.lock records
    # Non-vacuous: the perturbations really reach each stage's numbers.
    assert decided["seed"] == ["augment@warp12_x4", "example_market", "prepare"]
    assert decided["scale.windows"] == ["augment@warp12_x4", "prepare"]
    assert decided["data.val_fraction"] == ["augment@warp12_x4", "prepare"]
    assert decided["augment.jitter_sigma"] == ["augment@warp12_x4"]
    assert decided["scale.epochs"] == [] and decided["mask"] == []
    # The pool and the held-out set come from the example market's continuation: the unlabeled windows (and so
    # every augmented array) stay as they were.
    assert decided["data.label_pool"] == ["example_market", "prepare"]
    assert decided["data.test_windows"] == ["example_market", "prepare"]


@pytest.mark.integration
def test_example_source_a_label_row_a_bar_and_a_param(data_repo):
    repo = data_repo
    labels = repo / "data/example/labels.csv"
    original = labels.read_text()
    lines = original.splitlines(keepends=True)
    labels.write_text("".join(lines[:89] + lines[90:]))  # the 89th labeled window goes (the 90th takes its place)
    named = status(repo, *DATA_STAGES)
    assert {"example_market", "prepare"} <= set(named)
    assert ran(run(["dvc", "repro", "-s", "prepare"], repo).stdout) == {"prepare"}
    assert len(read_windows(repo / LABELED)) == 89 and len(read_windows(repo / LABEL_POOL)) == 119
    # The example files are example_market's outputs: a full repro puts them (and the windows) back.
    run(["dvc", "repro", "augment"], repo)
    assert labels.read_text() == original and len(read_windows(repo / LABELED)) == 89
    assert status(repo, *DATA_STAGES) == {}

    bars_path = repo / "data/example/bars.parquet"
    bars = pd.read_parquet(bars_path)
    before = read_windows(repo / UNLABELED).values[0].copy()
    bars.loc[50, "close"] = (bars.loc[50, "high"] + bars.loc[50, "low"]) / 2  # still a valid bar
    bars.to_parquet(bars_path, index=False)
    assert "prepare" in status(repo, *DATA_STAGES)
    assert ran(run(["dvc", "repro", "-s", "prepare"], repo).stdout) == {"prepare"}
    assert not np.array_equal(read_windows(repo / UNLABELED).values[0], before)

    # The param: named here; that a changed seed changes every data stage's output, and so re-runs it downstream,
    # the per-param test shows (its decided["seed"]). A `dvc repro` here would re-prove only DVC's propagation.
    set_param(repo, "seed", 7)
    assert "example_market" in status(repo, *DATA_STAGES)


@pytest.mark.integration
def test_user_files_a_label_row_a_bar_and_a_param(tmp_path):
    repo = make_repo(tmp_path / "repo")
    raw = repo / "data/raw"
    raw.mkdir(parents=True)
    bars = generate_market(3000, seed=11).bars
    stamps = bars["timestamp"]
    bars.to_csv(raw / "bars.csv", index=False)
    pd.DataFrame({"start": [stamps[0], stamps[200], stamps[900], stamps[1500], stamps[2200]],
                  "label": ["consolidation", "retracement", "retracement", "consolidation", "consolidation"]}).to_csv(
        raw / "labels.csv", index=False)
    set_param(repo, "finetune.folds", 2)  # prepare refuses fewer windows of a class than folds
    set_param(repo, "data.bars", "data/raw/bars.csv")
    set_param(repo, "data.labels", "data/raw/labels.csv")
    set_param(repo, "data.test_labels", "data/no_test_labels.csv")
    run(["dvc", "add", "data/raw/bars.csv", "data/raw/labels.csv"], repo)  # README's way to track them
    out = run(["dvc", "repro", "prepare"], repo).stdout
    assert ran(out) == {"prepare"}  # the example market is not upstream of a user's files
    assert "prepare" not in status(repo, "prepare") and len(read_windows(repo / LABELED)) == 5

    labels = raw / "labels.csv"
    labels.write_text("".join(labels.read_text().splitlines(keepends=True)[:-1]))
    assert "prepare" in status(repo, "prepare")
    run(["dvc", "add", "data/raw/labels.csv"], repo)
    assert ran(run(["dvc", "repro", "prepare"], repo).stdout) == {"prepare"}
    assert list(read_windows(repo / LABELED).label) == [0, 1, 1, 0]

    before = read_windows(repo / LABELED).values[1].copy()  # the window from bar 200
    edited = pd.read_csv(raw / "bars.csv")
    edited.loc[250, "close"] = (edited.loc[250, "high"] + edited.loc[250, "low"]) / 2
    edited.to_csv(raw / "bars.csv", index=False)
    assert "prepare" in status(repo, "prepare")
    assert ran(run(["dvc", "repro", "prepare"], repo).stdout) == {"prepare"}
    assert not np.array_equal(read_windows(repo / LABELED).values[1], before)

    set_param(repo, "data.stride", 7)
    assert "prepare" in status(repo, "prepare")
    assert ran(run(["dvc", "repro", "prepare"], repo).stdout) == {"prepare"}
    # The module (windows.py): prepare's code deps do not depend on which files data.* names (only its data deps
    # do), and test_an_edit_of_any_module_a_stage_imports_makes_status_name_it edits windows.py with the rest.


@pytest.mark.integration
def test_a_plumbing_edit_reruns_nothing(data_repo):
    repo = data_repo
    edits = {
        "src/moola/errors.py": ('print("interrupted"', 'print("interrupted by the user"'),
        "src/moola/io.py": ("never half of one.", "never a half-written one."),
        "src/moola/validation.py": ("must be greater than 0", "must be above 0"),
        "src/moola/paths.py": ("Every file the pipeline writes, named once", "Each file the pipeline writes, named once"),
    }
    assert set(edits) == set(PLUMBING)
    for rel, (old, new) in edits.items():
        text = (repo / rel).read_text()
        assert old in text, rel
        (repo / rel).write_text(text.replace(old, new))
    assert status(repo, *DATA_STAGES) == {}
    out = run(["dvc", "repro", "augment"], repo).stdout
    assert ran(out) == set() and "didn't change, skipping" in out


# argv[1]: a JSON list of files. For each: append an edit, ask `dvc status` (the API) over the whole pipeline, put
# the bytes back. Prints {"stages": every stage's address, "before": the status first, "named": {file: [stages]},
# "after": the status last}. (The whole pipeline's status, not the importers' alone: each target costs DVC a parse
# of dvc.yaml, and 21 targets take several times as long as none.)
EDIT_EACH = DVC_STATUS + """\
with Repo(".") as repo:
    stages = sorted(stage.addressing for stage in repo.index.stages)
before, named = status(), {}
for rel in json.loads(sys.argv[1]):
    path = Path(rel)
    original = path.read_bytes()
    path.write_bytes(original + b"\\n# an edit\\n")
    try:
        named[rel] = sorted(status())
    finally:
        path.write_bytes(original)
print(json.dumps({"stages": stages, "before": before, "named": named, "after": status()}, default=str))
"""

UPSTREAM = {"example_market", "prepare"}
AUGMENT = {"augment@warp12_x4", "augment@warp10_x3", "augment@warp15_x5"}


@pytest.mark.integration
@pytest.mark.slow
def test_an_edit_of_any_module_a_stage_imports_makes_status_name_it(reference_run, modules, tmp_path):
    """Over a pipeline whose every stage really ran (pipeline_runs.reference_run): touch each non-plumbing module
    in turn; `dvc status` names every stage that imports it."""
    repo = tmp_path / "repo"
    shutil.copytree(reference_run.repo, repo, symlinks=True)
    importers: dict[str, set[str]] = {}
    for stage, files in modules.items():  # the import scan of `project`: the same code and dvc.yaml as this copy
        for f in needed_deps(repo, files):
            importers.setdefault(f, set()).add(stage)
    assert len(importers) >= 12
    originals = {rel: (repo / rel).read_bytes() for rel in importers}
    result = json.loads(run([sys.executable, "-c", EDIT_EACH, json.dumps(sorted(importers))], repo).stdout)
    assert result["stages"] == sorted(modules)  # the scan covered this pipeline's stages, all of them
    assert result["before"] == {}
    assert set(result["named"]) == set(importers)
    for rel, stages in sorted(importers.items()):
        named = set(result["named"][rel])
        assert stages <= named, f"{rel} changed, but `dvc status` did not name {sorted(stages - named)}"
    assert all((repo / rel).read_bytes() == blob for rel, blob in originals.items())  # each edit was put back
    assert result["after"] == {}
    # No `dvc repro augment` after an edit of the augmentation core: that `dvc repro` re-runs the stages `dvc status`
    # names, and their downstream, is DVC's own propagation. What it showed of this project (the three recipes
    # re-ran, nothing upstream did) the status says: no upstream stage lists the augmentation code.
    augment_only = [rel for rel, stages in importers.items() if stages == AUGMENT]
    assert len(augment_only) >= 2, importers  # stages/augment.py and the augmentation core
    for rel in augment_only:
        assert not UPSTREAM & set(result["named"][rel]), f"{rel} changed, and `dvc status` named upstream stages"
