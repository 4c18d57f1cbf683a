"""DPO losses, per preference pair.

All losses take the *implicit reward margin* of a pair,

    h = (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x)),

and return one loss per pair (no reduction), which DP-SGD needs for per-pair
gradients and which the trainer averages otherwise.

- ``sigmoid``: the DPO loss, -log sigmoid(beta h).
- ``robust``: the unbiased DPO loss for labels flipped with a known rate gamma
  (Chowdhury et al., 2024, "Provably Robust DPO"):
  [(1-gamma) l(h) - gamma l(-h)] / (1 - 2 gamma); its expectation over the
  flip equals the clean loss.
- ``soft``: per-pair label confidence c = P(chosen is truly preferred):
  -(c log sigmoid(beta h) + (1-c) log sigmoid(-beta h)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "robust", "soft")


def implicit_reward_margin(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                           ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> torch.Tensor:
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def sigmoid_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    return -F.logsigmoid(beta * margin)


def robust_loss(margin: torch.Tensor, beta: float, flip_rate: float) -> torch.Tensor:
    if not 0.0 <= flip_rate < 0.5:
        raise ValueError(f"robust loss needs a flip rate in [0, 0.5), got {flip_rate}")
    pos = -F.logsigmoid(beta * margin)
    neg = -F.logsigmoid(-beta * margin)
    return ((1.0 - flip_rate) * pos - flip_rate * neg) / (1.0 - 2.0 * flip_rate)


def soft_loss(margin: torch.Tensor, beta: float, confidence: torch.Tensor) -> torch.Tensor:
    confidence = confidence.to(margin.dtype)
    return -(confidence * F.logsigmoid(beta * margin) + (1.0 - confidence) * F.logsigmoid(-beta * margin))


def dpo_loss(name: str, margin: torch.Tensor, beta: float, *, flip_rate: float | None = None,
             confidence: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair loss by name; see the module docstring."""
    if name == "sigmoid":
        return sigmoid_loss(margin, beta)
    if name == "robust":
        if flip_rate is None:
            raise ValueError("the robust loss needs the RR flip rate (a private method with epsilon)")
        return robust_loss(margin, beta, flip_rate)
    if name == "soft":
        if confidence is None:
            raise ValueError("the soft loss needs per-pair label confidence")
        return soft_loss(margin, beta, confidence)
    raise ValueError(f"unknown DPO loss {name!r}; expected one of {LOSSES}")
