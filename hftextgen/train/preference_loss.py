"""The preference objectives as the stock Trainer's compute_loss_func, and their metrics under TRL's names.

`PreferenceLoss(objective, beta, gamma)` takes the model's logits of a batch that
data.pairs.PairCollator packed, and its labels (PairTargets): each answer's summed
log-probability (evaluate.sequence_logps), the reference's from the batch, and then, per pair,
exactly what TRL computes for the same objective (tests/test_preference.py checks each against
TRL on the same batch):

  dpo    -log sigmoid(beta ((c - c_ref) - (r - r_ref)))                 TRL DPOTrainer, sigmoid
  ipo    ((c - c_ref) / |c| - (r - r_ref) / |r| - 1 / (2 beta))^2       TRL DPOTrainer, ipo
  simpo  -log sigmoid(beta (c / |c| - r / |r|) - gamma)                 TRL CPOTrainer, simpo (cpo_alpha 0)
  orpo   NLL(chosen sequence) - beta log sigmoid(log odds(c / |c|) - log odds(r / |r|))   TRL ORPOTrainer

with c, r the chosen and rejected answers' summed log-probabilities, |c| their scored tokens,
odds(x) = e^x / (1 - e^x), and ORPO's NLL the language-model loss of the chosen sequences,
prompt and answer, averaged over their tokens (as TRL's ORPOTrainer, and the ORPO authors' code).
The loss is the mean over the batch's pairs; a batch holds per_device_train_batch_size pairs,
so with gradient accumulation the Trainer divides it by the accumulation steps, as for TRL.

The metrics (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected; for orpo nll_loss, log_odds_ratio, log_odds_chosen) are averaged over the steps
since the last log, across processes, and added to the Trainer's logs by `PreferenceMetrics`
(eval_ in front during evaluation), as TRL's trainers log them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from .. import evaluate


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable (TRL's ORPOTrainer's)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def objective_loss(objective: str, beta: float, gamma: float, logps: dict) -> tuple[torch.Tensor, dict]:
    """(per-pair loss, metrics) of an objective from `logps`: chosen, rejected (summed answer
    log-probabilities), chosen_tokens, rejected_tokens, and for dpo and ipo ref_chosen,
    ref_rejected; for orpo nll (the chosen sequences' language-model loss)."""
    c, r = logps["chosen"], logps["rejected"]
    if objective in ("dpo", "ipo"):
        dc, dr = c - logps["ref_chosen"], r - logps["ref_rejected"]
        if objective == "dpo":
            loss = -F.logsigmoid(beta * (dc - dr))
        else:
            loss = (dc / logps["chosen_tokens"] - dr / logps["rejected_tokens"] - 1 / (2 * beta)) ** 2
        return loss, {
            "rewards_chosen": beta * dc,
            "rewards_rejected": beta * dr,
            "logps_chosen": c,
            "logps_rejected": r,
        }
    ac, ar = c / logps["chosen_tokens"], r / logps["rejected_tokens"]
    shown = {"rewards_chosen": beta * ac, "rewards_rejected": beta * ar, "logps_chosen": ac, "logps_rejected": ar}
    if objective == "simpo":
        return -F.logsigmoid(beta * (ac - ar) - gamma), shown
    if objective != "orpo":
        raise ValueError(f"unknown preference objective {objective!r}")
    log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
    ratio = F.logsigmoid(log_odds)
    shown.update(nll_loss=logps["nll"], log_odds_ratio=ratio.mean(), log_odds_chosen=log_odds.mean())
    return logps["nll"] - beta * ratio, shown


# What is logged, TRL's names for `objective_loss`'s metrics.
LOGGED = {
    "rewards_chosen": "rewards/chosen",
    "rewards_rejected": "rewards/rejected",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
    "nll_loss": "nll_loss",
    "log_odds_ratio": "log_odds_ratio",
    "log_odds_chosen": "log_odds_chosen",
}


class PreferenceLoss:
    """The Trainer's compute_loss_func for preference batches (see the module docstring)."""

    def __init__(self, objective: str, beta: float, gamma: float = 0.0):
        self.objective, self.beta, self.gamma = objective, beta, gamma
        self.sums: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        self.calls = {"train": 0, "eval": 0}

    def __call__(self, outputs, labels, num_items_in_batch=None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        labels = labels.to(logits.device)
        n = labels.pairs
        sums, counts, logp = evaluate.sequence_logps(logits, labels, 2 * n)
        counts = counts.to(sums.dtype)
        logps = {"chosen": sums[:n], "rejected": sums[n:], "chosen_tokens": counts[:n], "rejected_tokens": counts[n:]}
        if self.objective in ("dpo", "ipo"):
            if labels.reference is None:
                raise ValueError("a dpo or ipo batch without the reference's log-probabilities")
            reference = labels.reference.to(sums.dtype)
            logps.update(ref_chosen=reference[:, 0], ref_rejected=reference[:, 1])
        if self.objective == "orpo":
            logps["nll"] = -logp[labels.sequence < n].mean()  # the chosen sequences' every kept token
        loss, shown = objective_loss(self.objective, self.beta, self.gamma, logps)
        self._record(shown)
        return loss.mean()

    def _record(self, shown: dict) -> None:
        """Each metric's batch mean, summed until PreferenceMetrics takes them."""
        mode = "train" if torch.is_grad_enabled() else "eval"
        c, r = shown["rewards_chosen"].detach(), shown["rewards_rejected"].detach()
        values = {
            **{k: v.detach().float().mean() for k, v in shown.items()},
            "rewards_accuracies": (c > r).float().mean(),
            "rewards_margins": (c - r).float().mean(),
        }
        sums = self.sums[mode]
        for key, value in values.items():
            sums[key] = sums.get(key, 0) + value
        self.calls[mode] += 1

    def take(self, mode: str) -> dict[str, float]:
        """The metrics since the last take, averaged over the batches and across processes."""
        sums, calls = self.sums[mode], self.calls[mode]
        self.sums[mode], self.calls[mode] = {}, 0
        if not sums:
            return {}
        keys = sorted(sums)
        stacked = torch.stack(
            [sums[k].float() for k in keys] + [torch.tensor(float(calls), device=sums[keys[0]].device)]
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stacked)
        values = (stacked[:-1] / stacked[-1]).tolist()
        names = {**LOGGED, "rewards_accuracies": "rewards/accuracies", "rewards_margins": "rewards/margins"}
        return {names[k]: round(v, 6) for k, v in zip(keys, values, strict=True)}


class PreferenceMetrics(TrainerCallback):
    """Puts PreferenceLoss's metrics into the Trainer's training and evaluation logs; first in
    line, so that every reporter and the progress display see them."""

    def __init__(self, loss: PreferenceLoss):
        self.loss = loss

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        added = {}
        if "loss" in logs:
            added.update(self.loss.take("train"))
        if "eval_loss" in logs:
            added.update({f"eval_{k}": v for k, v in self.loss.take("eval").items()})
        logs.update(added)
        if added and state.log_history:  # the Trainer recorded these logs just before: they belong there too
            state.log_history[-1].update(added)
