"""The preference objective of a stage (``model.preference``): DPO on pairs of replies.

A pair is the same media and prompt with a chosen and a rejected reply (the manifest's
``chosen``/``rejected``; ``kangaroo data prepare`` keeps both, and a batch holds them side by
side, chosen first). For each pair the policy's and the reference's summed log-probabilities of
each reply give the DPO loss ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))`` (Rafailov et al.,
2023; the sigmoid loss). The reference is the stage's starting model: with LoRA adapters, the
same model with its adapters switched off (as peft-based trainers do); without, a frozen copy
built from ``init_from``.

The loss is written here rather than taken from a library: TRL's ``DPOTrainer.dpo_loss`` is a
method of its trainer (it reads the trainer's settings and state), and this stage keeps its own
Lightning loop, accumulation and sharding; the sigmoid loss itself is one line.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

METRICS = ("loss", "reward_margin", "reward_accuracy", "preference_accuracy", "logps_chosen", "logps_rejected")
"""What a preference stage logs per pair (``train/...`` per optimizer step, ``val/...``):
the DPO loss; the implicit reward margin ``beta * ((pc - rc) - (pr - rr))`` and how often it is
positive; how often the policy gives the chosen reply the higher log-probability (what a
stage that has not trained on pairs is measured by too); the two replies' log-probabilities."""


@dataclass
class PreferenceConfig:
    """DPO on preference pairs."""

    beta: float = 0.1
    """How far from the reference the policy may go: larger keeps it closer."""
    chosen_nll: float = 0.0
    """Weight of the chosen reply's mean token cross-entropy added to each pair's loss (0: plain
    DPO), which keeps the chosen replies likely while the margin grows."""

    def __post_init__(self) -> None:
        if self.beta <= 0 or self.chosen_nll < 0:
            raise ValueError(f"preference: need beta > 0 and chosen_nll >= 0 (got beta={self.beta}, "
                             f"chosen_nll={self.chosen_nll})")


def pair_terms(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor,
               config: PreferenceConfig) -> dict[str, torch.Tensor]:
    """Per-pair values of ``METRICS`` from per-sample summed log-probabilities in pair order
    (chosen, rejected, chosen, ...) and the samples' label counts; ``loss`` carries the gradient."""
    if policy.shape[0] % 2:
        raise ValueError(f"{policy.shape[0]} labelled samples do not make pairs: a preference stage trains on "
                         "data whose every record has chosen and rejected replies")
    chosen, rejected = policy[0::2], policy[1::2]
    margin = config.beta * ((chosen - reference[0::2]) - (rejected - reference[1::2]))
    loss = -F.logsigmoid(margin)
    if config.chosen_nll:
        loss = loss - config.chosen_nll * chosen / counts[0::2].clamp(min=1)
    detached = margin.detach()
    return {"loss": loss, "reward_margin": detached, "reward_accuracy": (detached > 0).float(),
            "preference_accuracy": (chosen.detach() > rejected.detach()).float(),
            "logps_chosen": chosen.detach(), "logps_rejected": rejected.detach()}


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The model without its LoRA adapters (peft's own switch on each adapted layer), for the
    reference's forward pass; switched back on after."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    trains = {parameter: parameter.requires_grad for layer in layers for parameter in layer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for parameter, flag in trains.items():  # peft's switch also sets requires_grad: as it was
            parameter.requires_grad_(flag)
