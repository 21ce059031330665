"""params.yaml as typed, validated objects.

`load_params()` reads the file once and returns a frozen `Params`; every stage takes what it needs from it.
An unknown key, a wrong type or a value out of range raises `ParamsError` with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from moola import paths
from moola.errors import ParamsError
from moola.validation import PARAMS_FILE, apply_rules, build, convert, did_you_mean, type_name

MASK_STRATEGIES = ("random", "block", "patch")
FEATURES = ("open", "high", "low", "close")
CLASS_NAMES = ("consolidation", "retracement")
# The example market is generated in memory, ~220 bytes a bar at its peak (measured: 1M bars, ~0.3 GB with
# Python): 4M bars stay near 1 GB. The spec (data.* defaults) needs 175,285.
EXAMPLE_MAX_BARS = 4_000_000
# Bars between the example market's stretches (unlabeled, labeled pool, held-out): a trading week of 78-bar days.
EXAMPLE_GAP_BARS = 5 * 78


def _f(**rules: Any) -> Any:
    """A field's range rules (positive=True, min=, max=): checked once at load. No defaults: every value lives in
    params.yaml, and a missing key is refused by name."""
    return field(metadata={"rules": rules})


@dataclass(frozen=True)
class ScaleParams:
    """Fractions of the spec: 1.0 is the reference run; a laptop tour sets both small.

    `epochs` scales pretraining only: fine-tuning is cheap (about 0.15 s a fold-epoch on a CPU) and a classifier
    cut to a few epochs does not train, so every run fine-tunes for finetune.epochs."""

    windows: float = _f(positive=True, max=1.0)
    epochs: float = _f(positive=True, max=1.0)


@dataclass(frozen=True)
class DataParams:
    # The files prepare reads (and dvc.yaml lists as its deps): the example_market stage's, or a user's own.
    bars: str
    labels: str
    # Held-out labeled windows (same format as labels.csv), read only by the evaluation stages. A file without
    # rows (data/no_test_labels.csv) means no held-out set.
    test_labels: str
    window: int = _f(positive=True)
    unlabeled_windows: int = _f(positive=True)
    # Fine-tuning uses the first labeled_windows rows of labels.csv (all of them if it has fewer).
    labeled_windows: int = _f(positive=True)
    # The example market only: its labels.csv holds this many windows (the label-efficiency curve's pool; its first
    # labeled_windows are the fine-tuning set) and its test_labels.csv test_windows more, after the pool (a
    # continuation of the same stationary generator: new windows, not a changed market).
    label_pool: int = _f(positive=True)
    test_windows: int = _f(min=0)
    # Unlabeled windows start every `stride` bars; labeled windows never overlap each other.
    stride: int = _f(positive=True)
    val_fraction: float = _f(positive=True, max=0.5)
    # The shortest piece of the labeling regime that must be visible at a labeled window's end.
    min_final_segment: int = _f(positive=True)
    # Bars that must lie between every training window (labeled, pool, unlabeled) and the first held-out window
    # (data.heldout: after), and between a purged fold's training and test windows (finetune.cv: purged).
    embargo: int = _f(min=0)
    # after: the held-out windows come after every training window (checked by prepare; unlabeled windows past the
    # cut are left out). anywhere: interleaved held-out windows are accepted, and every result says so.
    heldout: Literal["after", "anywhere"]
    # A bar whose range or close-to-close move (log) exceeds this many median absolute log returns of the file is
    # an outlier (moola.data_checks): refused, naming the row, or dropped (one-bar spikes only) if drop_outliers.
    outlier_threshold: float = _f(positive=True)
    drop_outliers: bool
    # A held-out set of one class is refused at prepare (its recall, balanced accuracy and MCC are undefined)
    # unless this says it is intended; those metrics are then written as null with the reason.
    allow_one_class_test: bool


@dataclass(frozen=True)
class AugmentRecipe:
    time_warp_sigma: float = _f(min=0.0)
    multiplier: int = _f(min=0)


@dataclass(frozen=True)
class AugmentParams:
    jitter_sigma: float = _f(min=0.0)
    scaling_sigma: float = _f(min=0.0)
    time_warp_knots: int = _f(positive=True)
    recipes: dict[str, AugmentRecipe]


@dataclass(frozen=True)
class PretrainParams:
    """The training settings every experiment shares; an experiment may override any of them."""

    mask_ratio: float = _f(positive=True, max=0.9)
    patch_size: int = _f(positive=True)
    block_spans: int = _f(positive=True)
    hidden_size: int = _f(positive=True)
    num_layers: int = _f(positive=True)
    decoder_hidden: int = _f(positive=True)
    batch_size: int = _f(positive=True)
    learning_rate: float = _f(positive=True)
    weight_decay: float = _f(min=0.0)
    grad_clip: float = _f(positive=True)
    # 0 switches early stopping off: the spec's epochs are what runs.
    early_stopping_patience: int = _f(min=0)
    device: Literal["auto", "cpu", "cuda", "mps"]
    # fp32 | bf16 (autocast; the LSTM runs bf16 only where cuDNN really does, else fp32 outside autocast; on a CPU
    # bf16 where oneDNN runs the LSTM in bf16, else fp32) | fp16 (autocast float16 with loss scaling, CUDA only).
    # moola.numerics decides by running a tiny LSTM. fp32 is the byte promise; bf16 differs by CPU type.
    precision: Literal["fp32", "bf16", "fp16"]
    # Let float32 matmuls and cuDNN's LSTM use TF32 on Ampere and newer (CUDA only). false = full fp32, what the
    # spec's numbers assume.
    tf32: bool
    # CUDA: deterministic cuDNN kernels, no autotuning (CPU runs are always deterministic).
    deterministic: bool
    # Torch intra-op threads on CPU. Fixed (not "all cores") so that bytes do not depend on the machine's size.
    threads: int = _f(positive=True)
    # The resume checkpoint (fsync'ed) is written after an epoch once at least this many epochs and this many
    # seconds have passed since the last one: a GPU epoch (~0.1 s) costs less than the write.
    resume_every_epochs: int = _f(positive=True)
    resume_every_seconds: float = _f(min=0.0)


MaskStrategy = Literal["random", "block", "patch"]
# What every entry of params.yaml's `experiments` states (its whole description), and what it may state besides.
EXPERIMENT_REQUIRED = {"epochs": int, "augment": str, "mask_from": str}
EXPERIMENT_OPTIONAL = {"mask": MaskStrategy}
EXPERIMENT_DESCRIPTION = {**EXPERIMENT_REQUIRED, **EXPERIMENT_OPTIONAL}  # key -> type; any other key overrides pretrain
EXPERIMENT_KEYS = (*EXPERIMENT_DESCRIPTION, *(f.name for f in dataclasses.fields(PretrainParams)))


@dataclass(frozen=True)
class Experiment:
    """One pretraining experiment, resolved: its mask (its own or the top-level one), its training settings
    (`pretrain` with its overrides), its epochs after scale.epochs and its augment recipe."""

    name: str
    mask: str
    train: PretrainParams
    epochs: int  # after scale.epochs
    recipe: AugmentRecipe
    augment: str  # the recipe's name: data/augmented/<augment>.npy


@dataclass(frozen=True)
class SelectParams:
    # Validation loss still above this at `check_epoch` means the encoder did not learn (reference red flag).
    max_val_loss_at_check: float = _f(positive=True)
    check_epoch: int = _f(positive=True)
    # Final validation loss more than this factor above the best: it diverged after its best epoch.
    max_final_over_best: float = _f(min=1.0)
    # Validation loss more than this factor above the training loss at the end: it overfits.
    max_val_over_train: float = _f(min=1.0)
    # When in doubt, the reference document's default.
    fallback: str
    # Which validation loss ranks the stable encoders: `common` scores every encoder on one masked validation set
    # (the validation windows, the top-level mask with pretrain's mask settings, masks from `seed`); `own` takes
    # each experiment's best validation loss under its own mask, which favours the easiest mask to fill in.
    compare_on: Literal["common", "own"]


@dataclass(frozen=True)
class ReplicateParams:
    """Independent pretraining runs of the selected experiment (stages replicate@<i>), the encoders the answer
    fine-tunes from: the spread between them is one of the sources its intervals cover."""

    # One run per seed (initialisation, masks, batch order); none of them is the seed the selection run used.
    seeds: list[int]
    # Which experiment the replicates run: `selected` (select's choice), or an experiment named outright (`moola
    # deep` pins exp1_baseline, the reference document's recommendation, whatever select would pick).
    experiment: str
    # 0: the selected experiment's epochs (after scale.epochs). A number: that many, whichever is selected (the
    # study trains its replicates longer than its selection runs).
    epochs: int = _f(min=0)
    # The encoder kept after these epochs (and after the last one): the pretraining-budget curve's points.
    snapshot_epochs: list[int]


@dataclass(frozen=True)
class FinetuneParams:
    folds: int = _f(min=2)
    seeds: list[int]
    epochs: int = _f(positive=True)
    freeze_epochs: int = _f(min=0)
    batch_size: int = _f(positive=True)
    learning_rate: float = _f(positive=True)
    encoder_learning_rate: float = _f(positive=True)
    weight_decay: float = _f(min=0.0)
    hidden_size: int = _f(positive=True)
    attention_heads: int = _f(positive=True)
    dropout: float = _f(min=0.0, max=0.9)
    grad_clip: float = _f(positive=True)
    class_weighted: bool
    device: Literal["auto", "cpu", "cuda", "mps"]
    # Torch threads per fit, and (CPU only) fits trained at once in worker processes (moola.fits). A fit's bytes
    # depend on its threads, not on the workers. On this project's 2-vCPU machine 2 workers of 1 thread train as
    # many fits a minute as 1 of 2 threads (BENCHMARKS.md); more real cores can take more workers.
    threads: int = _f(positive=True)
    workers: int = _f(positive=True)
    # CUDA: deterministic cuDNN and the math SDPA kernel for the attention; TF32 as in pretrain.tf32.
    deterministic: bool
    tf32: bool
    # fp32 | bf16: the training steps (forward and loss) under bf16 autocast where pretrain.precision's decision
    # (moola.numerics) says the LSTM runs in bf16; predictions stay fp32. No fp16: fine-tuning has no loss scaling.
    precision: Literal["fp32", "bf16"]
    # Bootstrap resamples for the confidence intervals (metrics and lifts).
    bootstrap: int = _f(positive=True)
    # Out-of-fold folds: stratified (shuffled by seed; the reference protocol) | purged (time-ordered, training
    # windows within data.embargo bars of the fold's test windows dropped).
    cv: Literal["stratified", "purged"]
    # The held-out numbers again, per consecutive period of equal window count (walk-forward; nothing re-trained).
    heldout_periods: int = _f(positive=True)
    # Consecutive windows per block of the bootstrap (neighbouring windows share volatility clusters): a positive
    # integer, or "auto" = round(n ** (1/3)) of the n windows resampled (13 of 2,000 held-out, 4 of 89 out of fold).
    # Checked in _cross_checks (an integer or "auto").
    bootstrap_block: Any


@dataclass(frozen=True)
class CurveParams:
    """The label-efficiency curve: models trained on `sizes` windows of the label pool, scored on held-out ones."""

    # Labeled windows per point (sizes above the pool's are left out, and said so).
    sizes: list[int]
    # One stratified draw of each size per seed; pretrained and scratch train on the same draw.
    seeds: list[int]


@dataclass(frozen=True)
class Params:
    seed: int
    mask: MaskStrategy
    scale: ScaleParams
    data: DataParams
    augment: AugmentParams
    pretrain: PretrainParams
    experiments: dict[str, dict]
    select: SelectParams
    replicates: ReplicateParams
    finetune: FinetuneParams
    curve: CurveParams

    def experiment(self, name: str) -> Experiment:
        if name not in self.experiments:
            raise ParamsError(
                f"{PARAMS_FILE}: experiments has no entry '{name}' (expected one of: {', '.join(self.experiments)})"
            )
        entry = self.experiments[name]
        overrides = {k: v for k, v in entry.items() if k not in EXPERIMENT_DESCRIPTION}
        return Experiment(
            name=name,
            mask=entry.get("mask", self.mask),
            train=dataclasses.replace(self.pretrain, **overrides),
            epochs=max(1, round(entry["epochs"] * self.scale.epochs)),
            recipe=self.recipe(entry["augment"]),
            augment=entry["augment"],
        )

    def all_experiments(self) -> list[Experiment]:
        return [self.experiment(name) for name in self.experiments]

    def replicated(self, selected: str) -> str:
        """The experiment the replicates run when select chose `selected` (replicates.experiment)."""
        return selected if self.replicates.experiment == "selected" else self.replicates.experiment

    def replicate_epochs(self, replicated: str) -> int:
        """Epochs of every replicate run of the experiment `replicated`."""
        return self.replicates.epochs or self.experiment(replicated).epochs

    def budget_epochs(self, replicated: str) -> list[int]:
        """The pretraining-budget curve's points: the snapshot epochs and the replicates' last epoch."""
        return sorted({*self.replicates.snapshot_epochs, self.replicate_epochs(replicated)})

    @property
    def unlabeled_windows(self) -> int:
        """Unlabeled windows after scale.windows (at least enough for a train and a validation batch)."""
        return max(8, round(self.data.unlabeled_windows * self.scale.windows))

    def recipe(self, name: str) -> AugmentRecipe:
        """augment.recipes[name], or the one-line error naming the recipes there are."""
        if name not in self.augment.recipes:
            raise ParamsError(f"{PARAMS_FILE}: augment.recipes has no recipe '{name}' "
                              f"(expected one of: {', '.join(self.augment.recipes)})")
        return self.augment.recipes[name]


def _validate_experiments(raw: Any, recipes: Mapping[str, AugmentRecipe]) -> dict[str, dict]:
    """params.yaml's `experiments`: each entry its whole description (EXPERIMENT_REQUIRED), optionally its own mask
    and overrides of `pretrain`; typed and range-checked like the sections."""
    if not isinstance(raw, Mapping) or not raw:
        raise ParamsError(f"{PARAMS_FILE}: experiments must be a non-empty mapping of name -> description")
    pretrain_hints = typing.get_type_hints(PretrainParams)
    pretrain_fields = {f.name: f for f in dataclasses.fields(PretrainParams)}
    experiments: dict[str, dict] = {}
    for name, entry in raw.items():
        if not isinstance(entry, Mapping):
            raise ParamsError(f"{PARAMS_FILE}: experiments.{name} must be a mapping ({', '.join(EXPERIMENT_REQUIRED)}"
                              f"[, mask, pretrain overrides]), got {entry!r}")
        clean = {}
        for key, value in entry.items():
            dotted = f"experiments.{name}.{key}"
            if key in EXPERIMENT_DESCRIPTION:
                clean[key] = convert(value, EXPERIMENT_DESCRIPTION[key], dotted)
            elif key in pretrain_fields:
                clean[key] = convert(value, pretrain_hints[key], dotted)
                apply_rules(clean[key], pretrain_fields[key].metadata.get("rules", {}), dotted)
            else:
                raise ParamsError(f"{PARAMS_FILE}: unknown key '{dotted}' ({did_you_mean(key, list(EXPERIMENT_KEYS))}"
                                  f"expected one of: {', '.join(EXPERIMENT_KEYS)})")
        for key, tp in EXPERIMENT_REQUIRED.items():
            if key not in clean:
                raise ParamsError(f"{PARAMS_FILE}: missing key 'experiments.{name}.{key}' ({type_name(tp)} expected)")
        _check_experiment(str(name), clean, recipes)
        experiments[str(name)] = clean
    return experiments


def _check_experiment(name: str, entry: dict, recipes: Mapping[str, AugmentRecipe]) -> None:
    """An experiment's recipe exists; its mask_from is the param that really decides its mask (dvc.yaml makes it
    the pretrain@<name> stage's param dep, so that `dvc exp run -S mask=...` re-runs exactly the experiments that
    follow the top-level mask)."""
    apply_rules(entry["epochs"], {"positive": True}, f"experiments.{name}.epochs")
    if entry["augment"] not in recipes:
        raise ParamsError(f"{PARAMS_FILE}: experiments.{name}.augment names recipe '{entry['augment']}', expected one "
                          f"of augment.recipes: {', '.join(recipes)}")
    own = f"experiments.{name}.mask"
    expected = own if "mask" in entry else "mask"
    if entry["mask_from"] != expected:
        why = "its own mask" if "mask" in entry else "the top-level mask (it has no mask of its own)"
        raise ParamsError(f"{PARAMS_FILE}: experiments.{name}.mask_from must be '{expected}', the param that decides "
                          f"{why}, got '{entry['mask_from']}'")


def parse_params(raw: Any) -> Params:
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{PARAMS_FILE}: the top level must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    if isinstance(raw.get("data"), Mapping) and "source" in raw["data"]:
        raise ParamsError(
            f"{PARAMS_FILE}: data.source is gone: prepare reads the files that data.bars and data.labels name "
            "(data/example/bars.parquet and data/example/labels.csv for the example market); delete data.source"
        )
    experiments_raw = raw.pop("experiments", None)
    hints = typing.get_type_hints(Params)
    known = [f.name for f in dataclasses.fields(Params)]
    for key in raw:
        if key not in known:
            raise ParamsError(
                f"{PARAMS_FILE}: unknown key '{key}' ({did_you_mean(key, known)}expected one of: {', '.join(known)})"
            )
    values: dict[str, Any] = {}
    for name in known:
        if name == "experiments":
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = build(tp, raw.get(name), name)
        elif name not in raw:
            raise ParamsError(f"{PARAMS_FILE}: missing key '{name}' ({type_name(tp)} expected)")
        else:
            values[name] = convert(raw[name], tp, name)
    if not values["augment"].recipes:
        raise ParamsError(f"{PARAMS_FILE}: augment.recipes must declare at least one recipe")
    values["experiments"] = _validate_experiments(experiments_raw, values["augment"].recipes)
    params = Params(**values)
    _cross_checks(params)
    return params


def example_bar_counts(
    window: int, stride: int, unlabeled_windows: int, labeled_windows: int, label_pool: int, test_windows: int
) -> tuple[int, int]:
    """Bars the example market generates: (first market, continuation). market.example_data sizes it with this.

    The first market holds the spec's unlabeled stretch, a trading week's gap, then room for the labeled windows
    (consolidations and retracements are about half of all bars: 6 windows' length each is generous). The
    continuation (none if 0) holds a gap and room for the rest of the label pool and the held-out windows: about
    136 bars per labeled window are used at the spec's settings, so 3 windows' length is ample."""
    first = (unlabeled_windows - 1) * stride + window + EXAMPLE_GAP_BARS + 6 * labeled_windows * window
    extra_windows = max(label_pool, labeled_windows) - labeled_windows + test_windows
    continuation = EXAMPLE_GAP_BARS + 3 * extra_windows * window if extra_windows > 0 else 0
    return first, continuation


def example_market_bars(d: DataParams) -> int:
    """Bars in the example market for `d`, all parts together."""
    return sum(example_bar_counts(d.window, d.stride, d.unlabeled_windows, d.labeled_windows, d.label_pool,
                                  d.test_windows))


def reads_example_market(d: DataParams) -> bool:
    """Whether prepare reads the example market's bars (data.bars names its file)."""
    return d.bars == paths.EXAMPLE_BARS


def _cross_checks(p: Params) -> None:
    ft = p.finetune
    d = p.data
    c = p.curve
    if not c.sizes or any(n < 2 for n in c.sizes) or len(set(c.sizes)) != len(c.sizes):
        raise ParamsError(f"{PARAMS_FILE}: curve.sizes must be distinct numbers of labeled windows, each at least 2 "
                          f"(one of each class), got {c.sizes}")
    if not c.seeds or len(set(c.seeds)) != len(c.seeds):
        raise ParamsError(f"{PARAMS_FILE}: curve.seeds must be distinct and not empty, got {c.seeds}")
    _check_replicates(p)
    if len(set(ft.seeds)) != len(ft.seeds):
        raise ParamsError(f"{PARAMS_FILE}: finetune.seeds must be distinct, got {ft.seeds}")
    block = ft.bootstrap_block
    if block != "auto" and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ParamsError(f"{PARAMS_FILE}: finetune.bootstrap_block must be a positive integer (windows per block) or "
                          f"auto, got {block!r}")
    # The example_market stage runs whichever files data.bars and data.labels name.
    # Only where prepare reads the example market: own data is checked against what its windows need, at prepare.
    # (The example_market stage, which runs either way, falls back to the default size when data.bars is own.)
    if reads_example_market(d) and example_market_bars(d) > EXAMPLE_MAX_BARS:
        unlabeled_part = (d.unlabeled_windows - 1) * d.stride
        keys = (
            f"data.unlabeled_windows ({d.unlabeled_windows}) x data.stride ({d.stride})"
            if unlabeled_part >= 6 * d.labeled_windows * d.window
            else f"data.labeled_windows ({d.labeled_windows}) x data.window ({d.window})"
        )
        raise ParamsError(
            f"{PARAMS_FILE}: {keys} ask the example market for {example_market_bars(d):,} bars, more than the "
            f"{EXAMPLE_MAX_BARS:,} it can generate in memory (about 1 GB); lower them"
        )
    _check_embargo(d)
    if ft.hidden_size % ft.attention_heads:
        raise ParamsError(
            f"{PARAMS_FILE}: finetune.hidden_size ({ft.hidden_size}) must be divisible by "
            f"finetune.attention_heads ({ft.attention_heads})"
        )
    if ft.freeze_epochs >= ft.epochs:
        raise ParamsError(
            f"{PARAMS_FILE}: finetune.freeze_epochs ({ft.freeze_epochs}) must be below finetune.epochs ({ft.epochs})"
        )
    if p.select.fallback not in p.experiments:
        raise ParamsError(
            f"{PARAMS_FILE}: select.fallback '{p.select.fallback}' is not an experiment "
            f"(expected one of: {', '.join(p.experiments)})"
        )
    if p.data.labeled_windows < ft.folds:
        raise ParamsError(
            f"{PARAMS_FILE}: finetune.folds ({ft.folds}) must not exceed data.labeled_windows "
            f"({p.data.labeled_windows})"
        )
    for exp in p.all_experiments():
        if exp.train.patch_size * 2 > p.data.window and exp.mask == "patch":
            raise ParamsError(
                f"{PARAMS_FILE}: pretrain.patch_size ({exp.train.patch_size}) must be at most half of "
                f"data.window ({p.data.window})"
            )


def _check_replicates(p: Params) -> None:
    r = p.replicates
    if r.experiment != "selected" and r.experiment not in p.experiments:
        raise ParamsError(f"{PARAMS_FILE}: replicates.experiment '{r.experiment}' is not an experiment (expected "
                          f"selected or one of: {', '.join(p.experiments)})")
    if len(set(r.seeds)) != len(r.seeds):
        raise ParamsError(f"{PARAMS_FILE}: replicates.seeds must be distinct, got {r.seeds}")
    snaps = r.snapshot_epochs
    if any(e < 1 for e in snaps) or any(b <= a for a, b in zip(snaps, snaps[1:])):
        raise ParamsError(f"{PARAMS_FILE}: replicates.snapshot_epochs must be increasing epochs, each at least 1, "
                          f"got {snaps}")
    # Whichever experiment select picks, its replicates reach every snapshot.
    if r.epochs:
        most, why = r.epochs, f"replicates.epochs ({r.epochs})"
    elif r.experiment != "selected":
        most = p.experiment(r.experiment).epochs
        why = f"the {most} epochs of {r.experiment} (replicates.experiment; replicates.epochs: 0 runs its own)"
    else:
        shortest = min(p.all_experiments(), key=lambda exp: exp.epochs)
        most, why = shortest.epochs, (f"the {shortest.epochs} epochs of {shortest.name}, the shortest experiment "
                                      f"select may pick (replicates.epochs: 0 runs the selected one's)")
    if snaps[-1] > most:
        raise ParamsError(f"{PARAMS_FILE}: replicates.snapshot_epochs {snaps} goes beyond {why}; expected epochs "
                          f"up to {most}")


def _check_embargo(d: DataParams) -> None:
    """The example market leaves EXAMPLE_GAP_BARS between its label pool and its held-out windows: a longer
    data.embargo would refuse its own labels (a user's own bars are checked by prepare, which knows their length)."""
    if d.bars == paths.EXAMPLE_BARS and d.test_windows > 0 and d.heldout == "after" and d.embargo > EXAMPLE_GAP_BARS:
        raise ParamsError(
            f"{PARAMS_FILE}: data.embargo ({d.embargo} bars) is longer than the example market's gap between its "
            f"labeled windows and its held-out windows; expected at most {EXAMPLE_GAP_BARS} (a trading week)"
        )


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the repository root, where params.yaml lives)") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raise ParamsError(
            f"{path}: empty (expected moola's parameters: seed, mask, data, pretrain, experiments, ...; restore the "
            f"project's file with `git checkout -- {path}`)"
        )
    return parse_params(raw)


def as_dict(obj: Any) -> Any:
    """A params object as plain data (for fingerprints and checkpoints)."""
    if dataclasses.is_dataclass(obj):
        return {k: as_dict(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    return obj


