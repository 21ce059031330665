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

from moola.errors import ParamsError
from moola.validation import PARAMS_FILE, apply_rules, build, convert, type_name
MASK_STRATEGIES = ("random", "block", "patch")
FEATURES = ("open", "high", "low", "close")
CLASS_NAMES = ("consolidation", "retracement")


def _check(**rules: Any) -> dict:
    """Field metadata: positive=True, min=, max=, choices=."""
    return {"rules": rules}


def _f(default: Any = dataclasses.MISSING, **rules: Any) -> Any:
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: typing.cast(Any, type(value))(value), metadata=_check(**rules))
    return field(default=default, metadata=_check(**rules))


@dataclass(frozen=True)
class ScaleParams:
    """Fractions of the spec: 1.0 is the reference run; a laptop tour sets both small."""

    windows: float = _f(1.0, positive=True, max=1.0)
    epochs: float = _f(1.0, positive=True, max=1.0)


@dataclass(frozen=True)
class DataParams:
    # The files prepare reads (and dvc.yaml lists as its deps): the example_market stage's, or a user's own.
    bars: str = "data/example/bars.parquet"
    labels: str = "data/example/labels.csv"
    # Held-out labeled windows (same format as labels.csv), read only by the evaluation stages. A file without
    # rows (data/no_test_labels.csv) means no held-out set.
    test_labels: str = "data/example/test_labels.csv"
    window: int = _f(105, positive=True)
    unlabeled_windows: int = _f(11873, positive=True)
    # Fine-tuning uses the first labeled_windows rows of labels.csv (all of them if it has fewer).
    labeled_windows: int = _f(89, positive=True)
    # The example market only: its labels.csv holds this many windows (the label-efficiency curve's pool; its first
    # labeled_windows are the fine-tuning set) and its test_labels.csv test_windows more, from a later stretch.
    label_pool: int = _f(500, positive=True)
    test_windows: int = _f(2000, min=0)
    # Unlabeled windows start every `stride` bars; labeled windows never overlap each other.
    stride: int = _f(10, positive=True)
    val_fraction: float = _f(0.2, positive=True, max=0.5)
    # The shortest piece of the labeling regime that must be visible at a labeled window's end.
    min_final_segment: int = _f(15, positive=True)


@dataclass(frozen=True)
class AugmentRecipe:
    time_warp_sigma: float = _f(min=0.0)
    multiplier: int = _f(min=0)


@dataclass(frozen=True)
class AugmentParams:
    jitter_sigma: float = _f(0.01, min=0.0)
    scaling_sigma: float = _f(0.05, min=0.0)
    time_warp_knots: int = _f(4, positive=True)
    recipes: dict[str, AugmentRecipe] = _f({})


@dataclass(frozen=True)
class PretrainParams:
    """Defaults of every experiment; exp1_baseline is exactly this."""

    epochs: int = _f(75, positive=True)
    augment: str = "warp12_x4"
    mask_ratio: float = _f(0.15, positive=True, max=0.9)
    patch_size: int = _f(5, positive=True)
    block_spans: int = _f(1, positive=True)
    hidden_size: int = _f(128, positive=True)
    num_layers: int = _f(1, positive=True)
    decoder_hidden: int = _f(64, positive=True)
    batch_size: int = _f(2048, positive=True)
    learning_rate: float = _f(2e-3, positive=True)
    weight_decay: float = _f(0.0, min=0.0)
    grad_clip: float = _f(1.0, positive=True)
    # 0 switches early stopping off: the spec's epochs are what runs.
    early_stopping_patience: int = _f(0, min=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    # Torch intra-op threads on CPU. Fixed (not "all cores") so that bytes do not depend on the machine's size.
    threads: int = _f(2, positive=True)


EXPERIMENT_KEYS = tuple(f.name for f in dataclasses.fields(PretrainParams)) + ("mask",)


@dataclass(frozen=True)
class Experiment:
    """One pretraining experiment, resolved: its overrides applied on top of `pretrain` and `mask`."""

    name: str
    mask: str
    train: PretrainParams
    epochs: int  # after scale.epochs
    recipe: AugmentRecipe


@dataclass(frozen=True)
class SelectParams:
    # Validation loss still above this at `check_epoch` means the encoder did not learn (reference red flag).
    max_val_loss_at_check: float = _f(0.05, positive=True)
    check_epoch: int = _f(25, positive=True)
    # Final validation loss more than this factor above the best: it diverged after its best epoch.
    max_final_over_best: float = _f(1.5, min=1.0)
    # Validation loss more than this factor above the training loss at the end: it overfits.
    max_val_over_train: float = _f(3.0, min=1.0)
    # When in doubt, the reference document's default.
    fallback: str = "exp1_baseline"


@dataclass(frozen=True)
class FinetuneParams:
    folds: int = _f(5, min=2)
    seeds: list[int] = _f([1337, 1338, 1339])
    epochs: int = _f(60, positive=True)
    freeze_epochs: int = _f(10, min=0)
    batch_size: int = _f(16, positive=True)
    learning_rate: float = _f(1e-3, positive=True)
    encoder_learning_rate: float = _f(1e-4, positive=True)
    weight_decay: float = _f(1e-4, min=0.0)
    hidden_size: int = _f(128, positive=True)
    attention_heads: int = _f(8, positive=True)
    dropout: float = _f(0.1, min=0.0, max=0.9)
    grad_clip: float = _f(1.0, positive=True)
    class_weighted: bool = True
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int = _f(2, positive=True)
    # Bootstrap resamples for the confidence interval of the lift.
    bootstrap: int = _f(2000, positive=True)


@dataclass(frozen=True)
class Params:
    seed: int
    mask: Literal["random", "block", "patch"]
    scale: ScaleParams
    data: DataParams
    augment: AugmentParams
    pretrain: PretrainParams
    experiments: dict[str, dict]
    select: SelectParams
    finetune: FinetuneParams

    def experiment(self, name: str) -> Experiment:
        if name not in self.experiments:
            raise ParamsError(
                f"{PARAMS_FILE}: experiments has no entry '{name}' (expected one of: {', '.join(self.experiments)})"
            )
        overrides = dict(self.experiments[name])
        mask = overrides.pop("mask", self.mask)
        train = dataclasses.replace(self.pretrain, **overrides)
        epochs = max(1, round(train.epochs * self.scale.epochs))
        return Experiment(name=name, mask=mask, train=train, epochs=epochs, recipe=self.augment.recipes[train.augment])

    def all_experiments(self) -> list[Experiment]:
        return [self.experiment(name) for name in self.experiments]

    @property
    def unlabeled_windows(self) -> int:
        """Unlabeled windows after scale.windows (at least enough for a train and a validation batch)."""
        return max(8, round(self.data.unlabeled_windows * self.scale.windows))

    @property
    def finetune_epochs(self) -> int:
        return max(1, round(self.finetune.epochs * self.scale.epochs))

    @property
    def freeze_epochs(self) -> int:
        # Scaled with the epochs so that a tour still freezes then unfreezes.
        return min(self.finetune_epochs - 1, round(self.finetune.freeze_epochs * self.scale.epochs))


def _validate_experiments(raw: Any, params_without: dict) -> dict[str, dict]:
    if not isinstance(raw, Mapping) or not raw:
        raise ParamsError(f"{PARAMS_FILE}: experiments must be a non-empty mapping of name -> overrides")
    pretrain_hints = typing.get_type_hints(PretrainParams)
    pretrain_fields = {f.name: f for f in dataclasses.fields(PretrainParams)}
    experiments: dict[str, dict] = {}
    for name, overrides in raw.items():
        overrides = overrides or {}
        if not isinstance(overrides, Mapping):
            raise ParamsError(f"{PARAMS_FILE}: experiments.{name} must be a mapping of overrides, got {overrides!r}")
        clean = {}
        for key, value in overrides.items():
            dotted = f"experiments.{name}.{key}"
            if key == "mask":
                clean[key] = convert(value, Literal["random", "block", "patch"], dotted)
            elif key in pretrain_fields:
                clean[key] = convert(value, pretrain_hints[key], dotted)
                apply_rules(clean[key], pretrain_fields[key].metadata.get("rules", {}), dotted)
            else:
                raise ParamsError(
                    f"{PARAMS_FILE}: unknown key '{dotted}' (expected one of: {', '.join(EXPERIMENT_KEYS)})"
                )
        experiments[str(name)] = clean
    recipes = params_without["augment"].recipes
    for name, overrides in experiments.items():
        recipe = overrides.get("augment", params_without["pretrain"].augment)
        if recipe not in recipes:
            where = f"experiments.{name}.augment" if "augment" in overrides else "pretrain.augment"
            raise ParamsError(
                f"{PARAMS_FILE}: {where} names recipe '{recipe}', expected one of augment.recipes: "
                f"{', '.join(recipes) or '(none declared)'}"
            )
    return experiments


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
            raise ParamsError(f"{PARAMS_FILE}: unknown key '{key}' (expected one of: {', '.join(known)})")
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
    values["experiments"] = _validate_experiments(experiments_raw, values)
    params = Params(**values)
    _cross_checks(params)
    return params


def _cross_checks(p: Params) -> None:
    ft = p.finetune
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


