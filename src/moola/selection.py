"""Which pretrained encoder fine-tuning starts from: the selection rules, as pure functions (stage `select` reads
the files and writes the result).

Among the experiments whose encoder converged stably and fits SimpleLSTM, the lowest validation loss wins:
by default (select.compare_on: common) the loss on one common masked validation set, the same windows and the same
masks for every encoder, so that the losses compare; with `own`, each experiment's best validation loss under its
own mask (losses under masks that are easier or harder to fill in, such as isolated steps against whole patches).
Stable means (thresholds in params.select, defaults from the reference document's red flags):
  - every loss finite;
  - learned: validation loss at select.check_epoch at most select.max_val_loss_at_check (a run shorter than
    check_epoch is not judged on this);
  - did not diverge: final validation loss at most select.max_final_over_best x its best;
  - does not overfit: final validation loss at most select.max_val_over_train x the final training loss.
Fits SimpleLSTM: the checkpoint loads and its forward hidden size equals finetune.hidden_size.
With compare_on common, an encoder that cannot be scored on the common set (no decoder in its checkpoint, a
non-finite loss) is rejected. Ties go to select.fallback (the reference document's choice when in doubt). No
candidate passing is an error, never a silent pick.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from moola.errors import DataError
from moola.params import PARAMS_FILE, SelectParams


@dataclass
class Candidate:
    name: str
    best_val_loss: float | None
    best_epoch: int | None = None
    final_val_loss: float | None = None
    final_train_loss: float | None = None
    epochs_run: int = 0
    hidden_size: int | None = None
    rejections: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    common_val_loss: float | None = None  # on select's common masked validation set
    own_masks_are_common: bool | None = None  # its own validation masks were the common set's

    @property
    def passed(self) -> bool:
        return not self.rejections

    def loss(self, compare_on: str) -> float | None:
        """The validation loss that ranks it: `common` or `own` (its best under its own mask)."""
        return self.common_val_loss if compare_on == "common" else self.best_val_loss


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _non_finite_loss(curve: pd.DataFrame, best) -> str:
    """The rejection of a curve with a non-finite loss: the first epoch that has one, else the bad best_val_loss."""
    bad = curve["epoch"][~np.isfinite(curve[["train_loss", "val_loss"]].to_numpy()).all(axis=1)].tolist()
    where = f" at epoch {bad[0]}" if bad else f" (best_val_loss {best!r})"
    return f"non-finite loss{where}"


def _check_learned(cand: Candidate, val: np.ndarray, sp: SelectParams) -> None:
    """Learned: the validation loss at select.check_epoch is at most select.max_val_loss_at_check."""
    if len(val) < sp.check_epoch:
        # The red flag is defined at check_epoch (25 in the reference): a shorter run (a tour) cannot be judged.
        cand.notes.append(
            f"ran {len(val)} epochs (< select.check_epoch {sp.check_epoch}): the did-not-learn check does not apply"
        )
        return
    check_row = sp.check_epoch - 1
    if val[check_row] > sp.max_val_loss_at_check:
        cand.rejections.append(
            f"did not learn: val loss {val[check_row]:.4g} at epoch {sp.check_epoch} > "
            f"select.max_val_loss_at_check {sp.max_val_loss_at_check:g}"
        )


def _check_diverged(cand: Candidate, val: np.ndarray, best_row: int, sp: SelectParams) -> None:
    """Did not diverge: the final validation loss is at most select.max_final_over_best x its best."""
    if val[-1] > sp.max_final_over_best * val[best_row]:
        cand.rejections.append(
            f"diverged: final val loss {val[-1]:.4g} is {val[-1] / val[best_row]:.2f}x its best "
            f"{val[best_row]:.4g} (epoch {cand.best_epoch}) > select.max_final_over_best {sp.max_final_over_best:g}"
        )


def _check_overfits(cand: Candidate, val: np.ndarray, train: np.ndarray, sp: SelectParams) -> None:
    """Does not overfit: the final validation loss is at most select.max_val_over_train x the final train loss."""
    if val[-1] > sp.max_val_over_train * train[-1]:
        cand.rejections.append(
            f"overfits: final val loss {val[-1]:.4g} is {val[-1] / train[-1]:.2f}x the final train loss "
            f"{train[-1]:.4g} > select.max_val_over_train {sp.max_val_over_train:g}"
        )


def _check_convergence(cand: Candidate, curve: pd.DataFrame, sp: SelectParams) -> None:
    """Record the best epoch and the final losses of a finite curve, then judge learned, diverged, overfits."""
    val, train = curve["val_loss"].to_numpy(), curve["train_loss"].to_numpy()
    best_row = int(val.argmin())
    cand.best_epoch = int(curve["epoch"].iloc[best_row])
    cand.final_val_loss, cand.final_train_loss = float(val[-1]), float(train[-1])
    _check_learned(cand, val, sp)
    _check_diverged(cand, val, best_row, sp)
    _check_overfits(cand, val, train, sp)


def _check_architecture(cand: Candidate, hidden_size: int | None, expect_hidden: int) -> None:
    """Fits SimpleLSTM: the encoder's forward hidden size is finetune.hidden_size."""
    if hidden_size != expect_hidden:
        cand.rejections.append(
            f"architecture: forward hidden size {hidden_size}, SimpleLSTM needs {expect_hidden} "
            "(finetune.hidden_size)"
        )


def _check_common_loss(
    cand: Candidate, common_val_loss: float | None, common_problem: str | None, compare_on: str
) -> None:
    """Scored on the common validation set with a finite loss: required when ranking on it, else only noted."""
    if common_problem is None and not _finite(common_val_loss):
        common_problem = f"non-finite loss {common_val_loss!r}"
    if common_problem is None:
        return
    cand.common_val_loss = None
    if compare_on == "common":
        cand.rejections.append(f"not scored on the common validation set (select.compare_on common): "
                               f"{common_problem}")
    else:
        cand.notes.append(f"no common validation loss: {common_problem}")


def assess(
    name: str, metrics: dict, curve: pd.DataFrame, hidden_size: int | None, checkpoint_problem: str | None,
    sp: SelectParams, expect_hidden: int, common_val_loss: float | None = None, common_problem: str | None = None,
) -> Candidate:
    """Judge one experiment from its metrics, its per-epoch curve, its checkpoint's architecture and its loss on
    the common validation set (`common_problem`: why it has none)."""
    best = metrics.get("best_val_loss")
    cand = Candidate(name=name, best_val_loss=float(best) if _finite(best) else None, hidden_size=hidden_size,
                     common_val_loss=common_val_loss)
    cand.epochs_run = len(curve)
    if curve.empty:
        cand.rejections.append("no epochs in its loss curve")
    elif cand.best_val_loss is None or not np.isfinite(curve[["train_loss", "val_loss"]].to_numpy()).all():
        cand.rejections.append(_non_finite_loss(curve, best))
    else:
        _check_convergence(cand, curve, sp)
    if checkpoint_problem is not None:
        cand.rejections.append(f"checkpoint unusable: {checkpoint_problem}")
    else:
        _check_architecture(cand, hidden_size, expect_hidden)
        _check_common_loss(cand, common_val_loss, common_problem, sp.compare_on)
    return cand


def choose(candidates: list[Candidate], fallback: str, compare_on: str) -> Candidate:
    """The lowest validation loss (`compare_on`: common or own) among those that passed; an exact tie goes to
    `fallback`, then to order."""
    passed = [c for c in candidates if c.passed]
    if not passed:
        why = "; ".join(f"{c.name}: {', '.join(c.rejections)}" for c in candidates)
        raise DataError(f"{PARAMS_FILE}: no encoder passed the select thresholds ({why})")
    order = {c.name: i for i, c in enumerate(candidates)}
    return min(passed, key=lambda c: (c.loss(compare_on), c.name != fallback, order[c.name]))


def _g(x: float | None) -> str:
    return "none" if x is None else f"{x:.4g}"


def reason(c: Candidate, chosen: Candidate, n_passed: int, compare_on: str) -> str:
    """Why `c` was chosen, passed over or rejected (with both losses when ranked on the common set), and its notes."""
    if compare_on == "common":
        basis, other = "common val loss", f" (own-mask best val loss {_g(c.best_val_loss)})"
    else:
        basis = "best val loss"
        other = "" if c.common_val_loss is None else f" (common val loss {_g(c.common_val_loss)})"
    if c is chosen:
        text = f"chosen: lowest {basis} {_g(c.loss(compare_on))} among {n_passed} stable encoder(s){other}"
    elif c.passed:
        text = (f"stable, but {basis} {_g(c.loss(compare_on))} >= {_g(chosen.loss(compare_on))} of {chosen.name}"
                f"{other}")
    else:
        text = "rejected: " + "; ".join(c.rejections)
    return text + "".join(f" [{note}]" for note in c.notes)


def selection_report(candidates: list[Candidate], chosen: Candidate, encoder: str, compare_on: str,
                     common_validation: dict) -> dict:
    """metrics/select.json: the choice (`encoder`: the chosen file), the basis and the common validation set it
    was scored on, and, for every candidate, its numbers (both losses) and why."""
    n_passed = sum(c.passed for c in candidates)
    return {
        "selected": chosen.name,
        "compare_on": compare_on,
        "best_val_loss": chosen.best_val_loss,
        "common_val_loss": chosen.common_val_loss,
        "encoder": encoder,
        "stable_candidates": n_passed,
        "common_validation": common_validation,
        "candidates": {
            c.name: {
                "chosen": c is chosen,
                "passed": c.passed,
                "best_val_loss": c.best_val_loss,
                "common_val_loss": c.common_val_loss,
                "own_masks_are_common": c.own_masks_are_common,
                "best_epoch": c.best_epoch,
                "final_val_loss": c.final_val_loss,
                "final_train_loss": c.final_train_loss,
                "epochs_run": c.epochs_run,
                "hidden_size": c.hidden_size,
                "reason": reason(c, chosen, n_passed, compare_on),
            }
            for c in candidates
        },
    }
