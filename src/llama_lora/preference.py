"""Preference tuning on chosen/rejected pairs: the objectives, their settings, and the metrics under TRL's names.

Each objective maps the summed log-probabilities of the chosen and rejected completions (the policy's, and for DPO
and IPO the reference model's) to a loss per pair:

- ``dpo`` (Rafailov et al. 2023, arXiv:2305.18290, eq. 7): -log sigmoid(beta h), h the difference of the policy's
  and the reference's log-ratios of chosen over rejected. With ``label_smoothing`` e, conservative DPO (Mitchell
  2023): -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h), the labels flipped with probability e.
- ``ipo`` (Azar et al. 2023, arXiv:2310.12036, eq. 17): (h - 1 / (2 beta))^2, with the log-probabilities averaged
  over each completion's tokens, as the authors' and TRL's implementations do.
- ``simpo`` (Meng et al. 2024, arXiv:2405.14734, eq. 6): -log sigmoid(beta (avg chosen - avg rejected) - gamma),
  the log-probabilities averaged over each completion's tokens, and no reference model at all. Chosen as the
  reference-free objective because it needs nothing beyond the two log-probabilities the policy pass already gives
  (ORPO adds an SFT term and odds over the same pass, and is tied to its SFT-from-scratch recipe), so its step is the
  cheapest of the three, and its length normalization makes long rejected answers no easier to push down.

The reference model of DPO and IPO is the model training started from (``model.init_adapter``, or the base with
the adapters off): ``lora.reference_model`` computes with it in place, no second copy of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .lora import reference_model
from .loss import sequence_logps

Objective = Literal["dpo", "ipo", "simpo"]
OBJECTIVES = ("dpo", "ipo", "simpo")
REFERENCE_FREE = ("simpo",)
LENGTH_NORMALIZED = ("ipo", "simpo")  # log-probabilities averaged over each completion's tokens


@dataclass
class PreferenceSettings:
    """``model.preference``: the objective of a preference-tuning run (``data.format: preference``).

    ``beta``: the strength of the KL constraint (DPO, IPO) or the reward scale (SimPO); TRL's defaults are 0.1 for
    DPO and IPO, and SimPO's paper uses 2 to 2.5. ``label_smoothing``: conservative DPO's label noise, in [0, 0.5).
    ``simpo_gamma``: SimPO's target reward margin gamma (the paper's gamma / beta is 0.5 to 1.6).
    ``precompute_reference``: compute the reference's log-probabilities of every pair in one pass before training
    (TRL's ``precompute_ref_log_probs``), so that a step runs the policy alone."""

    loss: Objective = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    precompute_reference: bool = False

    def __post_init__(self) -> None:
        if self.loss not in OBJECTIVES:
            raise ValueError(f"model.preference.loss must be one of {', '.join(OBJECTIVES)}, got {self.loss!r}")
        if not self.beta > 0:
            raise ValueError(f"model.preference.beta must be > 0 (DPO's usual 0.1), got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"model.preference.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.precompute_reference and not self.needs_reference:
            raise ValueError(f"model.preference.precompute_reference: loss {self.loss} has no reference model; set it "
                             "to false")
        if self.label_smoothing and self.loss != "dpo":
            raise ValueError(f"model.preference.label_smoothing is conservative DPO's; loss {self.loss} has none: "
                             "set it to 0")

    @property
    def needs_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE


@dataclass
class PairScores:
    """Per pair: the loss, the implicit rewards of chosen and rejected, and the policy's log-probabilities (summed
    over each completion, as TRL logs ``logps/chosen`` and ``logps/rejected``)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor


def preference_scores(settings: PreferenceSettings, chosen: torch.Tensor, rejected: torch.Tensor,
                      chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                      ref_chosen: torch.Tensor | None = None, ref_rejected: torch.Tensor | None = None) -> PairScores:
    """The objective of ``settings`` on (P,) summed log-probabilities of the policy (and the reference), with the
    completions' token counts. Rewards are what TRL logs: beta times the log-ratio to the reference (DPO, IPO), or
    beta times the average log-probability (SimPO)."""
    beta = settings.beta
    if settings.loss in LENGTH_NORMALIZED:
        n_c, n_r = chosen_tokens.clamp(min=1), rejected_tokens.clamp(min=1)
        pc, pr = chosen / n_c, rejected / n_r
        rc, rr = (ref_chosen / n_c, ref_rejected / n_r) if settings.needs_reference else (None, None)
    else:
        pc, pr, rc, rr = chosen, rejected, ref_chosen, ref_rejected
    if settings.needs_reference:
        if rc is None or rr is None:
            raise ValueError(f"model.preference.loss {settings.loss} needs the reference model's log-probabilities")
        chosen_ratio, rejected_ratio = pc - rc, pr - rr
        h = chosen_ratio - rejected_ratio
        if settings.loss == "dpo":
            e = settings.label_smoothing
            losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
        else:  # ipo
            losses = (h - 1 / (2 * beta)) ** 2
        chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    else:  # simpo
        losses = -F.logsigmoid(beta * (pc - pr) - settings.simpo_gamma)
        chosen_rewards, rejected_rewards = beta * pc.detach(), beta * pr.detach()
    return PairScores(losses, chosen_rewards, rejected_rewards, chosen.detach(), rejected.detach())


def score_pairs(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, settings: PreferenceSettings,
                chunk_size: int | None = None, reference: torch.Tensor | None = None) -> PairScores:
    """The objective on a batch of P pairs: 2P rows, the chosen completions first, the prompts masked. The reference
    pass (``reference`` None and an objective that has one) runs first, without autograd, with the adapters as
    training started (``lora.reference_model``); then the policy's forward over both completions in one batch, whose
    activations backward keeps. ``reference``: the (2P,) reference log-probabilities, precomputed."""
    pairs = input_ids.shape[0] // 2
    if reference is None and settings.needs_reference:
        with torch.no_grad(), reference_model(model):
            reference, _ = sequence_logps(model, input_ids, labels, chunk_size)
    logps, tokens = sequence_logps(model, input_ids, labels, chunk_size)
    refs = (reference[:pairs], reference[pairs:]) if settings.needs_reference else ()
    return preference_scores(settings, logps[:pairs], logps[pairs:], tokens[:pairs], tokens[pairs:], *refs)


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def pair_metrics(scores: PairScores) -> dict[str, torch.Tensor]:
    """TRL's DPOTrainer metrics, per pair (averaged over pairs by whoever logs them)."""
    return {"rewards/chosen": scores.chosen_rewards, "rewards/rejected": scores.rejected_rewards,
            "rewards/accuracies": (scores.chosen_rewards > scores.rejected_rewards).float(),
            "rewards/margins": scores.chosen_rewards - scores.rejected_rewards,
            "logps/chosen": scores.chosen_logps, "logps/rejected": scores.rejected_logps}
