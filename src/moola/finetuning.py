"""Out-of-fold fine-tuning: every labeled window is predicted by a model that never trained on it.

For each seed, a stratified k-fold split (StratifiedKFold(shuffle=True, random_state=seed)); on every fold the
same split trains SimpleLSTM from the pretrained encoder and from scratch, and fits the two reference rows, so
that all of them are compared on identical data. The core takes arrays and returns frames; the stage writes.
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
from moola.params import CLASS_NAMES, PARAMS_FILE, FinetuneParams, Params

NETWORK_INITS = ("pretrained", "scratch")
REFERENCE_INITS = ("majority", "logreg")
PROBA_COLUMNS = tuple(f"p_{name}" for name in CLASS_NAMES)


@dataclass(frozen=True)
class FinetuneConfig:
    """What one fold's training needs; epochs are already scaled."""

    epochs: int
    freeze_epochs: int
    batch_size: int
    learning_rate: float
    encoder_learning_rate: float
    weight_decay: float
    hidden_size: int
    attention_heads: int
    dropout: float
    grad_clip: float
    class_weighted: bool
    # finetune.precision as decided on the run's device (finetune_numerics); None: fp32, no autocast.
    numerics: Numerics | None = None

    @classmethod
    def from_params(cls, p: Params, numerics: Numerics | None = None) -> "FinetuneConfig":
        ft = p.finetune
        return cls(
            epochs=p.finetune_epochs,
            freeze_epochs=p.freeze_epochs,
            batch_size=ft.batch_size,
            learning_rate=ft.learning_rate,
            encoder_learning_rate=ft.encoder_learning_rate,
            weight_decay=ft.weight_decay,
            hidden_size=ft.hidden_size,
            attention_heads=ft.attention_heads,
            dropout=ft.dropout,
            grad_clip=ft.grad_clip,
            class_weighted=ft.class_weighted,
            numerics=numerics,
        )


def finetune_device(ft: FinetuneParams) -> torch.device:
    """finetune.device, with its CPU threads fixed (the bytes then do not depend on the machine's core count) and
    its CUDA numerics (TF32, deterministic cuDNN) set: what fine-tuning and the curve both train on."""
    device = pick_device(ft.device, key="finetune.device")
    use_threads(device, ft.threads)
    apply_cuda_settings(device, ft.tf32, ft.deterministic)
    return device


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
    # init -> (n_heldout, classes): the mean of every fold model's (all seeds') probabilities; empty without a set
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


def train_fold(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray | None,
    y_test: np.ndarray | None,
    cfg: FinetuneConfig,
    encoder_state: Mapping[str, torch.Tensor] | None,
    seed: int,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, SimpleLSTM], None] | None = None,
    x_heldout: np.ndarray | None = None,
) -> FoldRun:
    """Train SimpleLSTM on one fold and predict its held-out windows.

    With `encoder_state`, the LSTM starts from the encoder's forward direction, is frozen for
    cfg.freeze_epochs, then trains at cfg.encoder_learning_rate. Without it (the scratch baseline) the LSTM
    trains from epoch 1 at the base learning rate: freezing a random LSTM would only handicap the baseline.
    The last epoch's model predicts the held-out fold (choosing an epoch by that fold's loss would leak it), and,
    once training is over, the windows of `x_heldout` (the held-out test set: it never touches training).
    Without `x_test` (the label-efficiency curve trains on all its windows) there is no per-epoch validation.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    model = SimpleLSTM(cfg.hidden_size, cfg.attention_heads, cfg.dropout, input_size=x_train.shape[-1])
    if encoder_state is not None:
        load_forward_weights(model, {"state_dict": encoder_state})
        freeze_epochs, encoder_lr = cfg.freeze_epochs, cfg.encoder_learning_rate
    else:
        freeze_epochs, encoder_lr = 0, cfg.learning_rate
    model.to(device)
    autocast = cfg.numerics.autocast(device) if cfg.numerics else {"device_type": device.type, "enabled": False}
    model.lstm_in_autocast = cfg.numerics.lstm_in_autocast if cfg.numerics else True
    encoder_params = list(model.lstm.parameters())
    encoder_ids = {id(p) for p in encoder_params}
    other_params = [p for p in model.parameters() if id(p) not in encoder_ids]
    # Frozen parameters get no gradient, and AdamW skips a parameter whose grad is None (no weight decay either).
    optimizer = torch.optim.AdamW(
        [{"params": encoder_params, "lr": encoder_lr}, {"params": other_params, "lr": cfg.learning_rate}],
        weight_decay=cfg.weight_decay,
    )
    weights = class_weights(y_train).to(device) if cfg.class_weighted else None
    train_objective = nn.CrossEntropyLoss(weight=weights)
    xs = torch.as_tensor(np.ascontiguousarray(x_train), dtype=torch.float32, device=device)
    ys = torch.as_tensor(y_train, dtype=torch.long, device=device)
    validate = x_test is not None and y_test is not None
    if validate:
        xt = torch.as_tensor(np.ascontiguousarray(x_test), dtype=torch.float32, device=device)
        yt = torch.as_tensor(y_test, dtype=torch.long, device=device)
    order_rng = torch.Generator().manual_seed(seed)
    train_losses: list[float] = []
    val_losses: list[float] = []
    logits = None
    for epoch in range(1, cfg.epochs + 1):
        set_encoder_trainable(model, epoch > freeze_epochs)
        model.train()
        total, seen = 0.0, 0
        for batch in torch.randperm(len(xs), generator=order_rng).split(cfg.batch_size):
            batch = batch.to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(**autocast):  # finetune.precision bf16: the step's arithmetic, not the weights'
                loss = train_objective(model(xs[batch]).float(), ys[batch])
            loss.backward()
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.grad_clip)
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
        train_losses.append(total / seen)
        if validate:
            model.eval()
            with torch.no_grad():
                logits = model(xt)
                val_losses.append(float(nn.functional.cross_entropy(logits, yt)))
        if on_epoch is not None:
            on_epoch(epoch, model)
    if validate:
        assert logits is not None
        # On the CPU first: mps has no float64.
        proba = torch.softmax(logits.detach().cpu().double(), dim=1).numpy()
    else:
        proba = np.zeros((0, len(CLASS_NAMES)))
    heldout = None if x_heldout is None else predict_proba(model, x_heldout, device)
    return FoldRun(proba=proba, train_loss=train_losses, val_loss=val_losses, heldout_proba=heldout)


def _fold_seed(seed: int, fold: int) -> int:
    # Pretrained and scratch share it: same head initialisation and batch order, only the LSTM's start differs.
    return seed * 1000 + fold


def run_oof(
    values: np.ndarray,
    labels: np.ndarray,
    window_ids: np.ndarray,
    cfg: FinetuneConfig,
    seeds: Sequence[int],
    folds: int,
    inits: Sequence[str],
    encoder_state: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
    heldout_values: np.ndarray | None = None,
) -> OofResult:
    """Out-of-fold predictions of every init in `inits` (pretrained, scratch, majority, logreg) for every seed.

    With `heldout_values`, every fold model (and every fold's reference fit) also predicts those windows after it
    is trained; an init's held-out prediction is the mean of those probabilities over folds and seeds."""
    labels = np.asarray(labels, dtype=np.int64)
    if "pretrained" in inits and encoder_state is None:
        raise ValueError("the pretrained init needs an encoder_state")
    features = evaluation.window_features(values) if "logreg" in inits else None
    use_heldout = heldout_values is not None and len(heldout_values) > 0
    heldout_features = (
        evaluation.window_features(heldout_values) if use_heldout and "logreg" in inits else None
    )
    heldout_sum: dict[str, np.ndarray] = {}
    heldout_models: dict[str, int] = {}
    rows: list[pd.DataFrame] = []
    curves: dict[str, list[FoldRun]] = {init: [] for init in inits if init in NETWORK_INITS}
    for seed in seeds:
        splits = fold_splits(labels, folds, seed)
        for init in inits:
            fold_accuracy = []
            for fold, (train, test) in enumerate(splits):
                heldout_proba = None
                if init in NETWORK_INITS:
                    run = train_fold(
                        values[train], labels[train], values[test], labels[test], cfg,
                        encoder_state if init == "pretrained" else None, _fold_seed(seed, fold), device,
                        x_heldout=heldout_values if use_heldout else None,
                    )
                    curves[init].append(run)
                    proba, heldout_proba = run.proba, run.heldout_proba
                elif init == "majority":
                    proba = evaluation.majority_proba(labels[train], len(test))
                    if use_heldout:
                        heldout_proba = evaluation.majority_proba(labels[train], len(heldout_values))
                elif init == "logreg":
                    assert features is not None
                    if use_heldout:
                        # One fit per training fold predicts both its test fold and the held-out windows.
                        both = evaluation.logreg_proba(
                            features[train], labels[train], np.concatenate([features[test], heldout_features]),
                            cfg.class_weighted,
                        )
                        proba, heldout_proba = both[: len(test)], both[len(test) :]
                    else:
                        proba = evaluation.logreg_proba(
                            features[train], labels[train], features[test], cfg.class_weighted
                        )
                else:
                    raise ValueError(f"unknown init {init!r}")
                if heldout_proba is not None:
                    heldout_sum[init] = heldout_sum.get(init, 0.0) + heldout_proba
                    heldout_models[init] = heldout_models.get(init, 0) + 1
                predicted = proba.argmax(axis=1)
                fold_accuracy.append(float(np.mean(predicted == labels[test])))
                frame = pd.DataFrame(
                    {
                        "window_id": np.asarray(window_ids, dtype=np.int64)[test],
                        "fold": np.full(len(test), fold, dtype=np.int64),
                        "seed": np.full(len(test), seed, dtype=np.int64),
                        "init": init,
                        **{col: proba[:, i].astype(np.float64) for i, col in enumerate(PROBA_COLUMNS)},
                        "prediction": predicted.astype(np.int64),
                        "label": labels[test],
                    }
                )
                rows.append(frame)
            log(
                f"seed {seed} {init}: fold-averaged accuracy {np.mean(fold_accuracy):.3f} "
                f"(folds: {' '.join(f'{a:.3f}' for a in fold_accuracy)})"
            )
    predictions = pd.concat(rows, ignore_index=True)
    init_order = {init: i for i, init in enumerate(inits)}
    predictions = (
        predictions.assign(_order=predictions["init"].map(init_order))
        .sort_values(["_order", "seed", "window_id"], kind="stable")
        .drop(columns="_order")
        .reset_index(drop=True)
    )
    heldout = {init: heldout_sum[init] / heldout_models[init] for init in heldout_sum}
    return OofResult(predictions=predictions, curves=mean_curves(curves, cfg.epochs), heldout=heldout)


def mean_curves(runs: Mapping[str, Sequence[FoldRun]], epochs: int) -> pd.DataFrame:
    """Per epoch, the mean over seeds and folds of each network init's training and held-out loss."""
    table: dict[str, np.ndarray] = {"epoch": np.arange(1, epochs + 1, dtype=np.int64)}
    for init, fold_runs in runs.items():
        table[f"{init}_train_loss"] = np.mean([r.train_loss for r in fold_runs], axis=0)
        table[f"{init}_val_loss"] = np.mean([r.val_loss for r in fold_runs], axis=0)
    return pd.DataFrame(table)


# --- report ---------------------------------------------------------------------------------------------------


def metrics_per_seed(predictions: pd.DataFrame, init: str) -> list[dict[str, float]]:
    """Metrics of one init's out-of-fold predictions, one dict per seed (all windows of that seed at once)."""
    rows = predictions[predictions["init"] == init]
    out = []
    for _, per_seed in rows.groupby("seed", sort=True):
        proba = per_seed[list(PROBA_COLUMNS)].to_numpy()
        out.append(evaluation.classification_metrics(per_seed["label"].to_numpy(), proba))
    return out


def _predictions_matrix(predictions: pd.DataFrame, init: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n,), predictions (seeds, n)) with windows in the same order for every seed."""
    rows = predictions[predictions["init"] == init].sort_values(["seed", "window_id"], kind="stable")
    table = rows.pivot(index="window_id", columns="seed", values="prediction")
    labels = rows.drop_duplicates("window_id").set_index("window_id")["label"].loc[table.index]
    return labels.to_numpy(), table.to_numpy().T


def lift_report(predictions: pd.DataFrame, resamples: int, seed: int) -> dict:
    """Pretrained minus scratch, accuracy and balanced accuracy, with paired-bootstrap 95% intervals."""
    labels, pretrained = _predictions_matrix(predictions, "pretrained")
    labels_b, scratch = _predictions_matrix(predictions, "scratch")
    assert np.array_equal(labels, labels_b)
    report: dict = {}
    for metric in evaluation.OOF_LIFT_METRICS:
        report[metric] = evaluation.paired_bootstrap_lift(labels, pretrained, scratch, metric, resamples, seed)
    n = len(labels)
    noisy = [m for m in evaluation.OOF_LIFT_METRICS if report[m]["inside_noise"]]
    report["resamples"] = resamples
    report["verdict"] = (
        f"inside the noise ({', '.join(noisy)}: the 95% interval contains 0)" if noisy
        else "outside the noise (both 95% intervals exclude 0)"
    ) + f"; one window of {n} is {100 / n:.1f} points"
    return report


def summary_report(predictions: pd.DataFrame, inits: Sequence[str]) -> dict[str, dict]:
    return {init: evaluation.summarise(metrics_per_seed(predictions, init)) for init in inits}


def heldout_report(
    labels: np.ndarray, proba: Mapping[str, np.ndarray], resamples: int, seed: int, models: int
) -> dict:
    """Held-out metrics of every init's ensemble prediction, each with a 95% percentile-bootstrap interval over
    the held-out windows, and the paired lift pretrained - scratch (the same resamples score every init)."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = evaluation.resample_counts(len(labels), resamples, seed)
    predicted = {init: np.asarray(p).argmax(axis=1) for init, p in proba.items()}
    report: dict = {
        "windows": int(len(labels)),
        "class_counts": class_counts(labels),
        "prediction": f"mean of the probabilities of all {models} fold models (every fold of every seed)",
        "resamples": resamples,
    }
    for init, pred in predicted.items():
        report[init] = {
            metric: evaluation.bootstrap_interval(labels, pred, metric, counts)
            for metric in evaluation.BOOTSTRAP_METRICS
        }
    if "pretrained" in predicted and "scratch" in predicted:
        lift = {
            metric: evaluation.paired_bootstrap_lift(
                labels, predicted["pretrained"], predicted["scratch"], metric, resamples, seed, counts=counts
            )
            for metric in evaluation.HELDOUT_LIFT_METRICS
        }
        noisy = [m for m in evaluation.HELDOUT_LIFT_METRICS if lift[m]["inside_noise"]]
        outside = [m for m in evaluation.HELDOUT_LIFT_METRICS if not lift[m]["inside_noise"]]
        if not noisy:
            verdict = "outside the noise (every 95% interval excludes 0)"
        elif not outside:
            verdict = "inside the noise (every 95% interval contains 0)"
        else:
            verdict = f"mixed: outside the noise for {', '.join(outside)}; inside for {', '.join(noisy)}"
        lift["verdict"] = verdict + f"; one window of {len(labels)} is {100 / len(labels):.2f} points"
        report["lift"] = lift
    return report
