"""Out-of-fold fine-tuning: every labeled window is predicted by a model that never trained on it.

For each seed, a stratified k-fold split (StratifiedKFold(shuffle=True, random_state=seed); or, with finetune.cv:
purged, time-ordered folds with an embargo: purged_splits); on every fold the same split trains SimpleLSTM from the
pretrained encoder, from scratch, and from scratch on the pretrained init's schedule (the control that separates
"pretraining helps" from "a gentler schedule helps"), and fits the two reference rows, so that all of them are
compared on identical data. The core takes arrays and finetune:'s settings as they are (FinetuneParams) and returns
frames; the stage writes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from moola import evaluation
from moola.classifier import SimpleLSTM, load_forward_weights
from moola.device import pick_device, use_threads
from moola.errors import DataError, ParamsError
from moola.numerics import Numerics, apply_cuda_settings, decide, probe_lstm_dtype
from moola.params import CLASS_NAMES, PARAMS_FILE, FinetuneParams
from moola.windows import overlapping

NETWORK_INITS = ("pretrained", "scratch", "scratch_same_schedule")
# The inits whose LSTM starts from the encoder (they get a replicate axis: one per pretraining run), and those trained
# on the pretrained schedule (LSTM frozen for freeze_epochs, then encoder_learning_rate).
FROM_ENCODER = ("pretrained",)
PRETRAINED_SCHEDULE = ("pretrained", "scratch_same_schedule")
REFERENCE_INITS = ("majority", "logreg")
PROBA_COLUMNS = tuple(f"p_{name}" for name in CLASS_NAMES)


def finetune_device(ft: FinetuneParams) -> torch.device:
    """finetune.device, with its CPU threads fixed (the bytes then do not depend on the machine's core count) and
    its CUDA numerics (TF32, deterministic cuDNN) set: what fine-tuning and the curve both train on."""
    device = pick_device(ft.device, key="finetune.device")
    use_threads(device, ft.threads)
    apply_cuda_settings(device, ft.tf32, ft.deterministic)
    return device


def fit_placement(ft: FinetuneParams, device: torch.device) -> str:
    """How the fits run, for the log: worker processes and threads on the CPU, one at a time elsewhere."""
    if device.type != "cpu" or ft.workers <= 1:
        return f"one fit at a time ({ft.threads} threads)" if device.type == "cpu" else "one fit at a time"
    return f"{ft.workers} fits at a time, {ft.threads} thread{'s' if ft.threads > 1 else ''} each"


def finetune_numerics(ft: FinetuneParams, device: torch.device, log: Callable[[str], None] = print,
                      probe=probe_lstm_dtype) -> Numerics:
    """finetune.precision on `device`, decided as pretraining decides pretrain.precision (moola.numerics.decide:
    a tiny LSTM run under autocast; a test may fake `probe`); logs why when what runs is not simply what was asked."""
    numerics = decide(device, ft.precision, ft.tf32, probe)
    if numerics.note:
        log(f"fine-tuning: {numerics.note}")
    return numerics


@dataclass
class FoldRun:
    proba: np.ndarray  # (n_test, classes) after the last epoch
    train_loss: list[float]  # per epoch: the (class-weighted) training objective
    val_loss: list[float]  # per epoch: plain cross-entropy on the held-out fold
    heldout_proba: np.ndarray | None = None  # (n_heldout, classes): the trained model on the held-out set


def predict_proba(model: SimpleLSTM, values: np.ndarray, device: torch.device, batch: int = 256) -> np.ndarray:
    """Class probabilities of a trained model (eval mode, no gradients), in batches (attention is O(window^2))."""
    model.eval()
    out = []
    with torch.no_grad():
        for lo in range(0, len(values), batch):
            x = torch.tensor(np.array(values[lo : lo + batch], dtype=np.float32), device=device)  # a copy: may be read-only
            out.append(torch.softmax(model(x).detach().cpu().double(), dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CLASS_NAMES)))


@dataclass
class OofResult:
    predictions: pd.DataFrame  # window_id, fold, seed, init, p_<class>..., prediction, label
    curves: pd.DataFrame  # epoch, <init>_train_loss, <init>_val_loss (mean over seeds and folds)
    # init -> (seeds, n_heldout, classes): per seed, the mean of that seed's fold models' probabilities (so that the
    # seeds can be resampled); empty without a held-out set
    heldout: dict[str, np.ndarray]


def class_counts(labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(np.asarray(labels), minlength=len(CLASS_NAMES))
    return {name: int(counts[i]) for i, name in enumerate(CLASS_NAMES)}


def check_folds(labels: np.ndarray, folds: int, source: str) -> None:
    """Stratified k-fold needs every class in every fold: refuse more folds than the smallest class has windows."""
    counts = class_counts(labels)
    smallest = min(counts.values())
    described = ", ".join(f"{n} {name}" for name, n in counts.items())
    if smallest == 0:
        absent = next(name for name, n in counts.items() if n == 0)
        raise DataError(
            f"{source}: no '{absent}' windows ({described}); the classifier needs both classes (re-run "
            "`dvc repro prepare` with labels of both)"
        )
    if folds > smallest:
        raise ParamsError(
            f"{PARAMS_FILE}: finetune.folds ({folds}) exceeds the smallest class's windows in {source} "
            f"({described}); expected at most {smallest} folds"
        )


def fold_splits(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(train, test) for train, test in splitter.split(np.zeros(len(labels)), labels)]


Splitter = Callable[[np.ndarray, int, int], list[tuple[np.ndarray, np.ndarray]]]  # (labels, folds, seed) -> folds


def purged_splits(bars: np.ndarray, folds: int, window: int, embargo: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Time-ordered folds, purged: the windows sorted by first bar and cut into `folds` consecutive blocks (sizes
    differ by at most one); a block is a fold's test set, and its training set is every other window with at least
    `embargo` bars between it and each test window (a neighbour in time shares the test windows' regime and would
    leak it). No randomness: every seed gets the same folds. Indices into `bars`, each sorted."""
    bars = np.asarray(bars, dtype=np.int64)
    order = np.argsort(bars, kind="stable")
    out = []
    for block in np.array_split(order, folds):
        test = np.sort(block)
        others = np.setdiff1d(np.arange(len(bars)), test)
        # Windows of `window` bars closer than `window + embargo` start to start have fewer than `embargo` between.
        near = overlapping(bars[others], bars[test], window + embargo)
        out.append((others[~near], test))
    return out


def cv_splitter(scheme: str, bars: np.ndarray | None, window: int, embargo: int, source: str) -> Splitter:
    """finetune.cv -> run_oof's fold maker. Purged folds need each window's first bar (`bar` in `source`) and a
    training set with both classes in every fold."""
    if scheme == "stratified":
        return fold_splits
    if bars is None:
        raise DataError(f"{source}: column 'bar' missing (finetune.cv: purged needs each window's first bar; "
                        "re-run `dvc repro prepare`)")

    def split(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        splits = purged_splits(bars, folds, window, embargo)
        for fold, (train, test) in enumerate(splits):
            missing = [name for i, name in enumerate(CLASS_NAMES) if not np.any(labels[train] == i)]
            if missing:
                raise DataError(
                    f"{source}: purged fold {fold + 1} of {folds} (finetune.cv: purged, data.embargo={embargo}) "
                    f"leaves {len(train)} training windows, none '{missing[0]}' (expected both classes in every "
                    "fold's training set; use fewer finetune.folds, a smaller data.embargo, or more labels)"
                )
        return splits

    return split


def cv_report(scheme: str, splits: Sequence[tuple[np.ndarray, np.ndarray]], embargo: int) -> dict:
    """What the out-of-fold protocol was, for the metrics and the report."""
    folds = len(splits)
    if scheme == "stratified":
        return {"scheme": "stratified", "description": f"stratified {folds}-fold, shuffled by seed"}
    n = sum(len(test) for _, test in splits)
    return {
        "scheme": "purged",
        "embargo": embargo,
        "description": f"time-ordered {folds}-fold, training windows within {embargo} bars of a test window purged",
        "training_windows": [int(len(train)) for train, _ in splits],
        "purged_windows": [int(n - len(test) - len(train)) for train, test in splits],
    }


def class_weights(labels: np.ndarray) -> torch.Tensor:
    """sklearn's "balanced" n / (classes * count): each class contributes equally, so the minority class cannot be
    ignored silently. A class absent from `labels` is no target of the loss: its weight (1) decides nothing."""
    present = np.unique(labels)
    weights = np.ones(len(CLASS_NAMES))
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.tensor(weights, dtype=torch.float32)


def set_encoder_trainable(model: SimpleLSTM, trainable: bool) -> None:
    for param in model.lstm.parameters():
        param.requires_grad_(trainable)


def lstm_schedule(ft: FinetuneParams, pretrained_schedule: bool) -> tuple[int, float]:
    """(epochs the LSTM stays frozen, its learning rate after them): the pretrained schedule's, or none frozen and
    the base learning rate."""
    if pretrained_schedule:
        return ft.freeze_epochs, ft.encoder_learning_rate
    return 0, ft.learning_rate


def build_model(ft: FinetuneParams, input_size: int, encoder_state: Mapping[str, torch.Tensor] | None, seed: int,
                device: torch.device, numerics: Numerics | None) -> SimpleLSTM:
    """SimpleLSTM seeded by `seed`, its LSTM from the encoder's forward direction if there is one, on `device`."""
    torch.manual_seed(seed)
    model = SimpleLSTM(ft.hidden_size, ft.attention_heads, ft.dropout, input_size=input_size)
    # After the model is built: the head's initialisation is the same whatever the LSTM starts from.
    if encoder_state is not None:
        load_forward_weights(model, {"state_dict": encoder_state})
    model.to(device)
    model.lstm_in_autocast = numerics.lstm_in_autocast if numerics else True
    return model


def build_optimizer(model: SimpleLSTM, ft: FinetuneParams, encoder_lr: float) -> torch.optim.Optimizer:
    """AdamW in two parameter groups: the LSTM's at `encoder_lr`, the rest at finetune.learning_rate."""
    encoder_params = list(model.lstm.parameters())
    encoder_ids = {id(p) for p in encoder_params}
    other_params = [p for p in model.parameters() if id(p) not in encoder_ids]
    # Frozen parameters get no gradient, and AdamW skips a parameter whose grad is None (no weight decay either).
    return torch.optim.AdamW(
        [{"params": encoder_params, "lr": encoder_lr}, {"params": other_params, "lr": ft.learning_rate}],
        weight_decay=ft.weight_decay,
    )


def as_tensors(x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows (float32) and their labels (int64) on `device`."""
    xs = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32, device=device)
    return xs, torch.as_tensor(y, dtype=torch.long, device=device)


def train_epoch(model: SimpleLSTM, optimizer: torch.optim.Optimizer, objective: nn.Module, xs: torch.Tensor,
                ys: torch.Tensor, order_rng: torch.Generator, ft: FinetuneParams, autocast: dict,
                device: torch.device) -> float:
    """One pass over the training windows in an order drawn from `order_rng`; the objective's mean per window."""
    model.train()
    total, seen = 0.0, 0
    for batch in torch.randperm(len(xs), generator=order_rng).split(ft.batch_size):
        batch = batch.to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(**autocast):  # finetune.precision bf16: the step's arithmetic, not the weights'
            loss = objective(model(xs[batch]).float(), ys[batch])
        loss.backward()
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], ft.grad_clip)
        optimizer.step()
        total += float(loss.detach()) * len(batch)
        seen += len(batch)
    return total / seen


def evaluate(model: SimpleLSTM, xt: torch.Tensor, yt: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The model's logits on the held-out fold (eval mode, no gradients) and their plain cross-entropy."""
    model.eval()
    with torch.no_grad():
        logits = model(xt)
        return logits, float(nn.functional.cross_entropy(logits, yt))


def train_fold(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray | None,
    y_test: np.ndarray | None,
    ft: FinetuneParams,
    encoder_state: Mapping[str, torch.Tensor] | None,
    seed: int,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, SimpleLSTM, torch.optim.Optimizer], None] | None = None,
    x_heldout: np.ndarray | None = None,
    pretrained_schedule: bool | None = None,
    numerics: Numerics | None = None,
) -> FoldRun:
    """Train SimpleLSTM on one fold with the settings of `ft` (finetune:) and predict its held-out windows.

    With `encoder_state`, the LSTM starts from the encoder's forward direction. On the pretrained schedule (the
    default with an encoder) the LSTM is frozen for ft.freeze_epochs, then trains at ft.encoder_learning_rate.
    Otherwise (the default without an encoder: the scratch baseline) it trains from epoch 1 at the base learning
    rate. `pretrained_schedule=True` without an encoder is the schedule-matched control: a random LSTM frozen and
    slowed exactly as the pretrained one, so that a lift over it is the encoder's weights and not the schedule.
    The last epoch's model predicts the held-out fold (choosing an epoch by that fold's loss would leak it), and,
    once training is over, the windows of `x_heldout` (the held-out test set: it never touches training).
    Without `x_test` (the label-efficiency curve trains on all its windows) there is no per-epoch validation.
    `numerics`: finetune.precision as decided on the run's device (finetune_numerics); None: fp32, no autocast.
    """
    device = torch.device(device)
    model = build_model(ft, x_train.shape[-1], encoder_state, seed, device, numerics)
    if pretrained_schedule is None:  # the default: the pretrained schedule exactly when there is an encoder
        pretrained_schedule = encoder_state is not None
    freeze_epochs, encoder_lr = lstm_schedule(ft, pretrained_schedule)
    autocast = numerics.autocast(device) if numerics else {"device_type": device.type, "enabled": False}
    optimizer = build_optimizer(model, ft, encoder_lr)
    objective = nn.CrossEntropyLoss(weight=class_weights(y_train).to(device) if ft.class_weighted else None)
    xs, ys = as_tensors(x_train, y_train, device)
    validation = None if x_test is None or y_test is None else as_tensors(x_test, y_test, device)
    order_rng = torch.Generator().manual_seed(seed)
    train_losses: list[float] = []
    val_losses: list[float] = []
    logits = None
    for epoch in range(1, ft.epochs + 1):
        set_encoder_trainable(model, epoch > freeze_epochs)
        train_losses.append(train_epoch(model, optimizer, objective, xs, ys, order_rng, ft, autocast, device))
        if validation is not None:
            logits, val_loss = evaluate(model, *validation)
            val_losses.append(val_loss)
        if on_epoch is not None:
            on_epoch(epoch, model, optimizer)
    if validation is None:
        proba = np.zeros((0, len(CLASS_NAMES)))
    else:
        assert logits is not None
        proba = torch.softmax(logits.detach().cpu().double(), dim=1).numpy()  # on the CPU first: mps has no float64
    heldout = None if x_heldout is None else predict_proba(model, x_heldout, device)
    return FoldRun(proba=proba, train_loss=train_losses, val_loss=val_losses, heldout_proba=heldout)


def _fold_seed(seed: int, fold: int) -> int:
    # Every network init shares it: same head initialisation and batch order (and scratch_same_schedule the same
    # random LSTM as scratch); only the LSTM's start and schedule differ.
    return seed * 1000 + fold


def train_init(init: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray | None,
               y_test: np.ndarray | None, ft: FinetuneParams, encoder_state: Mapping[str, torch.Tensor] | None,
               seed: int, device: torch.device | str, x_heldout: np.ndarray | None = None,
               on_epoch: Callable[[int, SimpleLSTM, torch.optim.Optimizer], None] | None = None,
               numerics: Numerics | None = None) -> FoldRun:
    """train_fold for one of NETWORK_INITS: its LSTM start (the encoder or random) and its schedule."""
    if init not in NETWORK_INITS:
        raise ValueError(f"unknown network init {init!r}")
    return train_fold(
        x_train, y_train, x_test, y_test, ft, encoder_state if init in FROM_ENCODER else None, seed, device,
        on_epoch=on_epoch, x_heldout=x_heldout, pretrained_schedule=init in PRETRAINED_SCHEDULE, numerics=numerics,
    )


# --- out of fold --------------------------------------------------------------------------------------------------

FoldKey = tuple[int, str, str, int]  # (seed, init, replicate, fold): one fold's fit of one row of the predictions
FoldProba = tuple[np.ndarray, np.ndarray | None]  # (its test fold's probabilities, the held-out windows' or None)


def replicates_of(init: str, encoder_states: Mapping[str, object]) -> list[str]:
    """An init's replicates: one per encoder for an init from an encoder; otherwise the one unnamed ''."""
    return list(encoder_states) if init in FROM_ENCODER else [""]


def row_groups(seeds: Sequence[int], inits: Sequence[str], encoder_states: Mapping[str, object]
               ) -> list[tuple[int, str, str]]:
    """Every (seed, init, replicate) of the out-of-fold predictions, in the order they are made and logged."""
    return [(seed, init, replicate) for seed in seeds for init in inits
            for replicate in replicates_of(init, encoder_states)]


@dataclass
class ReferenceFits:
    """What the reference rows (majority, logreg) fit on: the labeled windows' labels and, with logreg, their
    statistics (evaluation.window_features); the held-out windows (and their statistics) that every fit of a
    training fold also predicts, None without a held-out set."""

    labels: np.ndarray
    features: np.ndarray | None
    heldout_values: np.ndarray | None
    heldout_features: np.ndarray | None
    class_weighted: bool

    @classmethod
    def of(cls, values: np.ndarray, labels: np.ndarray, heldout_values: np.ndarray | None, inits: Sequence[str],
           class_weighted: bool) -> "ReferenceFits":
        features = evaluation.window_features(values) if "logreg" in inits else None
        heldout_features = (
            evaluation.window_features(heldout_values) if heldout_values is not None and "logreg" in inits else None
        )
        return cls(labels, features, heldout_values, heldout_features, class_weighted)

    def fit(self, init: str, train: np.ndarray, test: np.ndarray) -> FoldProba:
        """`init` fit on the `train` windows: its probabilities on the `test` windows and on the held-out ones."""
        heldout_proba = None
        if init == "majority":
            proba = evaluation.majority_proba(self.labels[train], len(test))
            if self.heldout_values is not None:
                heldout_proba = evaluation.majority_proba(self.labels[train], len(self.heldout_values))
        elif init == "logreg":
            assert self.features is not None
            if self.heldout_features is not None:
                # One fit per training fold predicts both its test fold and the held-out windows.
                both = evaluation.logreg_proba(
                    self.features[train], self.labels[train],
                    np.concatenate([self.features[test], self.heldout_features]), self.class_weighted,
                )
                proba, heldout_proba = both[: len(test)], both[len(test) :]
            else:
                proba = evaluation.logreg_proba(
                    self.features[train], self.labels[train], self.features[test], self.class_weighted
                )
        else:
            raise ValueError(f"unknown init {init!r}")
        return proba, heldout_proba


def fold_probabilities(keys: Sequence[FoldKey], trained: Mapping[FoldKey, FoldRun], references: ReferenceFits,
                       splits: Mapping[int, Sequence[tuple[np.ndarray, np.ndarray]]]) -> dict[FoldKey, FoldProba]:
    """Every fold fit's probabilities: a network's from its FoldRun, a reference row's fit here (in `keys` order)."""
    probas: dict[FoldKey, FoldProba] = {}
    for key in keys:
        seed, init, _, fold = key
        if init in NETWORK_INITS:
            probas[key] = trained[key].proba, trained[key].heldout_proba
        else:
            probas[key] = references.fit(init, *splits[seed][fold])
    return probas


def oof_predictions(groups: Sequence[tuple[int, str, str]], probas: Mapping[FoldKey, FoldProba],
                    splits: Mapping[int, Sequence[tuple[np.ndarray, np.ndarray]]], labels: np.ndarray,
                    window_ids: np.ndarray, inits: Sequence[str], log: Callable[[str], None]) -> pd.DataFrame:
    """OofResult.predictions: one row per window and (seed, init, replicate), sorted by init (in `inits` order),
    replicate, seed and window; logs each (seed, init, replicate)'s accuracy per fold."""
    rows: list[pd.DataFrame] = []
    for seed, init, replicate in groups:
        fold_accuracy = []
        for fold, (_, test) in enumerate(splits[seed]):
            proba = probas[(seed, init, replicate, fold)][0]
            predicted = proba.argmax(axis=1)
            fold_accuracy.append(float(np.mean(predicted == labels[test])))
            rows.append(pd.DataFrame({
                "window_id": np.asarray(window_ids, dtype=np.int64)[test],
                "fold": np.full(len(test), fold, dtype=np.int64),
                "seed": np.full(len(test), seed, dtype=np.int64),
                "replicate": replicate,
                "init": init,
                **{col: proba[:, i].astype(np.float64) for i, col in enumerate(PROBA_COLUMNS)},
                "prediction": predicted.astype(np.int64),
                "label": labels[test],
            }))
        log(
            f"seed {seed} {init}{f' ({replicate})' if replicate else ''}: fold-averaged accuracy "
            f"{np.mean(fold_accuracy):.3f} (folds: {' '.join(f'{a:.3f}' for a in fold_accuracy)})"
        )
    predictions = pd.concat(rows, ignore_index=True)
    init_order = {init: i for i, init in enumerate(inits)}
    return (
        predictions.assign(_order=predictions["init"].map(init_order))
        .sort_values(["_order", "replicate", "seed", "window_id"], kind="stable")
        .drop(columns="_order")
        .reset_index(drop=True)
    )


def heldout_means(keys: Sequence[FoldKey], probas: Mapping[FoldKey, FoldProba], inits: Sequence[str],
                  encoder_states: Mapping[str, object]) -> dict[str, np.ndarray]:
    """OofResult.heldout: init -> per seed, the mean of its fold models' held-out probabilities, (seeds, n,
    classes), or (replicates, seeds, n, classes) for an init from an encoder; empty without a held-out set."""
    heldout_folds: dict[tuple[str, str], list[list[np.ndarray]]] = {}  # (init, replicate) -> per seed, per fold
    for key in keys:
        _, init, replicate, fold = key
        heldout_proba = probas[key][1]
        if heldout_proba is not None:
            per_seed = heldout_folds.setdefault((init, replicate), [])
            if fold == 0:
                per_seed.append([])
            per_seed[-1].append(heldout_proba)
    heldout: dict[str, np.ndarray] = {}
    for init in inits:
        per_replicate = [np.stack([np.mean(f, axis=0) for f in heldout_folds[(init, r)]])
                         for r in replicates_of(init, encoder_states) if (init, r) in heldout_folds]
        if per_replicate:
            heldout[init] = np.stack(per_replicate) if init in FROM_ENCODER else per_replicate[0]
    return heldout


def run_oof(
    values: np.ndarray,
    labels: np.ndarray,
    window_ids: np.ndarray,
    ft: FinetuneParams,
    seeds: Sequence[int],
    folds: int,
    inits: Sequence[str],
    encoder_states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
    heldout_values: np.ndarray | None = None,
    splitter: Splitter = fold_splits,
    workers: int = 1,
    threads: int = 1,
    numerics: Numerics | None = None,
) -> OofResult:
    """Out-of-fold predictions of every init in `inits` (pretrained, scratch, majority, logreg) for every seed, and
    for an init that starts from an encoder, for every encoder of `encoder_states` (name -> weights: the pretraining
    replicates). Every network fit is trained by moola.fits (`workers` processes of `threads` threads on the CPU),
    with the settings of `ft` (finetune:) and `numerics` (train_fold).

    With `heldout_values`, every fold model (and every fold's reference fit) also predicts those windows after it
    is trained; an init's held-out prediction for a seed is the mean of those probabilities over the seed's folds."""
    from moola.fits import Fit, Shared, run_fits

    labels = np.asarray(labels, dtype=np.int64)
    encoder_states = dict(encoder_states or {})
    if any(init in FROM_ENCODER for init in inits) and not encoder_states:
        raise ValueError("the pretrained init needs encoder_states")
    heldout = heldout_values if heldout_values is not None and len(heldout_values) > 0 else None
    references = ReferenceFits.of(values, labels, heldout, inits, ft.class_weighted)
    splits = {seed: splitter(labels, folds, seed) for seed in seeds}
    groups = row_groups(seeds, inits, encoder_states)
    keys = [(seed, init, replicate, fold) for seed, init, replicate in groups for fold in range(len(splits[seed]))]
    # Every network fit at once (the slow part), then the reference fits and the bookkeeping in the order of `keys`.
    network_keys = [key for key in keys if key[1] in NETWORK_INITS]
    jobs = [Fit(init, splits[seed][fold][0], _fold_seed(seed, fold), replicate or None, splits[seed][fold][1])
            for seed, init, replicate, fold in network_keys]
    shared = Shared(values, labels, heldout, encoder_states, ft, numerics, str(torch.device(device)), threads)
    trained = dict(zip(network_keys, run_fits(jobs, shared, workers)))
    probas = fold_probabilities(keys, trained, references, splits)
    curves = {init: [trained[key] for key in network_keys if key[1] == init]
              for init in inits if init in NETWORK_INITS}
    return OofResult(
        predictions=oof_predictions(groups, probas, splits, labels, window_ids, inits, log),
        curves=mean_curves(curves, ft.epochs),
        heldout=heldout_means(keys, probas, inits, encoder_states),
    )


def mean_curves(runs: Mapping[str, Sequence[FoldRun]], epochs: int) -> pd.DataFrame:
    """Per epoch, the mean over seeds and folds of each network init's training and held-out loss."""
    table: dict[str, np.ndarray] = {"epoch": np.arange(1, epochs + 1, dtype=np.int64)}
    for init, fold_runs in runs.items():
        table[f"{init}_train_loss"] = np.mean([r.train_loss for r in fold_runs], axis=0)
        table[f"{init}_val_loss"] = np.mean([r.val_loss for r in fold_runs], axis=0)
    return pd.DataFrame(table)


# --- report ---------------------------------------------------------------------------------------------------


def metrics_per_seed(predictions: pd.DataFrame, init: str) -> list[dict[str, float]]:
    """Metrics of one init's out-of-fold predictions, one dict per (replicate, seed) (all windows at once)."""
    rows = predictions[predictions["init"] == init]
    out = []
    for _, per_seed in rows.groupby(["replicate", "seed"], sort=True):
        proba = per_seed[list(PROBA_COLUMNS)].to_numpy()
        out.append(evaluation.classification_metrics(per_seed["label"].to_numpy(), proba))
    return out


def _predictions_matrix(
    predictions: pd.DataFrame, init: str, order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n,), predictions (seeds, n), or (replicates, seeds, n) for an init from an encoder) with windows
    in the same order for every seed: `order` (window ids), or window_id."""
    rows = predictions[predictions["init"] == init].sort_values(["replicate", "seed", "window_id"], kind="stable")
    table = rows.pivot(index="window_id", columns=["replicate", "seed"], values="prediction")
    if order is not None:
        table = table.loc[order]
    labels = rows.drop_duplicates("window_id").set_index("window_id")["label"].loc[table.index]
    matrix = table.to_numpy().T
    if init in FROM_ENCODER:
        matrix = matrix.reshape(rows["replicate"].nunique(), -1, matrix.shape[-1])
    return labels.to_numpy(), matrix


# The lifts reported, each pretrained minus a scratch row: `lift` isolates the encoder's weights together with the
# gentler schedule they get; `lift_same_schedule` the weights alone (both rows train on the same schedule).
LIFTS = {"lift": ("pretrained", "scratch"), "lift_same_schedule": ("pretrained", "scratch_same_schedule")}


def with_replicates(init: str, predicted: np.ndarray) -> np.ndarray:
    """An init's (seeds, n) predictions from one encoder as (replicates=1, seeds, n) if it starts from the encoder."""
    return predicted[None] if init in FROM_ENCODER and predicted.ndim == 2 else predicted


def lifts_with_intervals(
    labels: np.ndarray, predicted: Mapping[str, np.ndarray], metrics: Sequence[str], res: evaluation.Resampling,
    independent: evaluation.Resampling | None = None,
) -> dict[str, dict]:
    """Every lift of LIFTS whose two rows are in `predicted`, per metric with its paired hierarchical interval and a
    verdict. With `independent` (the same draws but windows one at a time), each metric also gets how many times
    wider its blocked interval is."""
    out: dict[str, dict] = {}
    for name, (a, b) in LIFTS.items():
        if a not in predicted or b not in predicted:
            continue
        lift: dict = {}
        for metric in metrics:
            lift[metric] = evaluation.paired_bootstrap_lift(labels, predicted[a], predicted[b], metric, res)
            if independent is not None and lift[metric]["point"] is not None:
                plain = evaluation.paired_bootstrap_lift(labels, predicted[a], predicted[b], metric, independent)
                width = plain["ci_high"] - plain["ci_low"]
                ratio = (lift[metric]["ci_high"] - lift[metric]["ci_low"]) / width if width > 0 else None
                lift[metric]["width_vs_independent_windows"] = None if ratio is None else round(ratio, 3)
        lift["verdict"] = f"{a} - {b}: " + evaluation.lift_verdict(lift, res, len(labels))
        out[name] = lift
    return out


def lift_report(
    predictions: pd.DataFrame, resamples: int, seed: int, block: int | str = 1, order: np.ndarray | None = None
) -> dict:
    """Out of fold: every lift of LIFTS (accuracy, balanced accuracy) with paired hierarchical intervals over the
    fine-tuning seeds and the labeled windows, in blocks of `block` consecutive windows of `order` (the window ids
    in time order; default window_id order)."""
    inits = [init for init in NETWORK_INITS if (predictions["init"] == init).any()]
    matrices = {init: _predictions_matrix(predictions, init, order) for init in inits}
    labels = matrices[inits[0]][0]
    assert all(np.array_equal(labels, m[0]) for m in matrices.values())
    predicted = {init: with_replicates(init, m[1]) for init, m in matrices.items()}
    seeds = predicted[inits[0]].shape[-2]
    replicates = max(p.shape[0] for init, p in predicted.items() if init in FROM_ENCODER) if any(
        init in FROM_ENCODER for init in predicted) else 1
    where = "out-of-fold windows"
    block_n = evaluation.block_length(block, len(labels), where)
    res = evaluation.hierarchical_resampling(len(labels), seeds, replicates, resamples, seed, block_n, where)
    report = lifts_with_intervals(labels, predicted, evaluation.OOF_LIFT_METRICS, res)
    for lift in report.values():
        lift["resamples"] = resamples
    return report


def summary_report(predictions: pd.DataFrame, inits: Sequence[str]) -> dict[str, dict]:
    return {init: evaluation.summarise(metrics_per_seed(predictions, init)) for init in inits}


def pair_lift_rows(labels: np.ndarray, predicted: Mapping[str, np.ndarray], seeds: Sequence[int],
                   replicates: Sequence[str], metrics: Sequence[str]) -> list[dict]:
    """One row per lift of LIFTS and (replicate, seed) pair: the pair's lift on every window, per metric."""
    rows = []
    for name, (a, b) in LIFTS.items():
        if a not in predicted or b not in predicted:
            continue
        per_metric = {m: evaluation.pair_lifts(labels, predicted[a], predicted[b], m) for m in metrics}
        for r, replicate in enumerate(replicates):
            for s, seed in enumerate(seeds):
                rows.append({"lift": name, "replicate": replicate, "seed": int(seed),
                             **{m: round(float(per_metric[m][r, s]), 6) for m in metrics}})
    return rows


def heldout_report(
    labels: np.ndarray,
    predicted: Mapping[str, np.ndarray],
    resamples: int,
    seed: int,
    block: int | str,
    seeds: Sequence[int],
    replicates: Sequence[str],
    folds: int,
) -> dict:
    """Held-out metrics of every init, each with a 95% hierarchical bootstrap interval, and the paired lifts.

    `predicted`: class predictions in time order, (replicates, seeds, n) for an init from an encoder (one replicate
    per pretraining run), (seeds, n) for the others; a seed's prediction is its fold models' mean probability. The
    same draws score every init (replicates, seeds and blocks of consecutive held-out windows), so the lifts are
    paired. Each (replicate, seed) pair's own lift is listed in `pairs`."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    block_n = evaluation.block_length(block, n)
    res = evaluation.hierarchical_resampling(n, len(seeds), len(replicates), resamples, seed, block_n)
    independent = evaluation.hierarchical_resampling(n, len(seeds), len(replicates), resamples, seed, 1)
    report: dict = {
        "windows": int(n),
        "class_counts": class_counts(labels),
        "prediction": f"per fine-tuning seed, the mean of the probabilities of its {folds} fold models; a model's "
                      "score is the mean of its seeds' (and replicates') scores",
        "resamples": resamples,
        "block": block_n,
        "seeds": [int(s) for s in seeds],
        "replicates": list(replicates),
        "covers": res.covers(),
    }
    for init, pred in predicted.items():
        report[init] = {
            metric: evaluation.bootstrap_interval(labels, pred, metric, res) for metric in evaluation.BOOTSTRAP_METRICS
        }
    report.update(lifts_with_intervals(labels, predicted, evaluation.HELDOUT_LIFT_METRICS, res, independent))
    report["pairs"] = pair_lift_rows(labels, predicted, seeds, replicates, evaluation.HELDOUT_LIFT_METRICS)
    return report


def heldout_by_period(
    labels: np.ndarray,
    predicted: Mapping[str, np.ndarray],
    starts: np.ndarray,
    periods: int,
    resamples: int,
    seed: int,
    block: int | str,
    seeds: Sequence[int],
    replicates: Sequence[str],
    folds: int,
) -> list[dict]:
    """Walk-forward: the held-out numbers again per period, the windows in time order (by `starts`) cut into
    `periods` consecutive blocks of equal window count (sizes differ by at most one). Each period is scored by
    heldout_report on its own windows (the same hierarchical bootstrap, its blocks inside the period); kept per
    period: its first and last window's start, class counts, each init's accuracy, balanced accuracy and MCC and the
    lifts. Same predictions, nothing re-trained: a drift over time shows as periods that disagree."""
    labels = np.asarray(labels, dtype=np.int64)
    starts = np.asarray(starts)
    out = []
    for number, rows in enumerate(np.array_split(np.argsort(starts, kind="stable"), periods), start=1):
        part = heldout_report(labels[rows], {init: np.asarray(p)[..., rows] for init, p in predicted.items()},
                              resamples, seed, block, seeds, replicates, folds)
        entry: dict = {
            "period": number,
            "windows": int(len(rows)),
            "first_start": evaluation.when(starts[rows[0]]),
            "last_start": evaluation.when(starts[rows[-1]]),
            "class_counts": part["class_counts"],
            "covers": part["covers"],
        }
        for name in (*predicted, *LIFTS):
            if name in part:
                entry[name] = {m: part[name][m] for m in evaluation.HELDOUT_LIFT_METRICS}
        out.append(entry)
    return out


def pair_lift_table(heldout: Mapping) -> pd.DataFrame:
    """The plot of the pairs: one row per (lift, replicate, seed) with the pair's lift per metric and the pooled
    lift's point and interval (`<metric>_pooled`, `<metric>_low`, `<metric>_high`)."""
    metrics = evaluation.HELDOUT_LIFT_METRICS
    rows = []
    for pair in heldout.get("pairs", []):
        pooled = heldout[pair["lift"]]
        rows.append({
            "pair": f"replicate {pair['replicate']}, seed {pair['seed']}", "lift": pair["lift"],
            "replicate": pair["replicate"], "seed": pair["seed"],
            **{key: value for m in metrics for key, value in (
                (m, pair[m]), (f"{m}_pooled", pooled[m]["point"]), (f"{m}_low", pooled[m]["ci_low"]),
                (f"{m}_high", pooled[m]["ci_high"]))},
        })
    columns = ["pair", "lift", "replicate", "seed"] + [
        f"{m}{suffix}" for m in metrics for suffix in ("", "_pooled", "_low", "_high")
    ]
    return pd.DataFrame(rows, columns=columns)
