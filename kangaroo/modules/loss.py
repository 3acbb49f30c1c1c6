"""Next-token cross-entropy on labelled positions only, without full-vocabulary logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kangaroo.modules.layout import IGNORE_INDEX


def shift_labels(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Targets for next-token prediction: ``targets[:, i] = labels[:, i + 1]``.

    ``labels``: ``(b, s)``. Returns ``(b, s)`` with the last column ignored. In a packed row
    (``position_ids`` restarting at 0 for every sample) the last token of one sample must not
    predict the first token of the next, so targets at sample starts are ignored too.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        starts_next = position_ids[:, 1:] == 0
        targets[:, :-1] = targets[:, :-1].masked_fill(starts_next, IGNORE_INDEX)
    return targets


def sample_index(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The sample each position of ``(b, s)`` rows belongs to, flattened row-major: a sample is a
    run of ``position_ids`` from 0 (the whole row without them), numbered across rows."""
    if position_ids is None:
        position_ids = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    return torch.cumsum((position_ids == 0).reshape(-1).long(), 0) - 1


def labelled_token_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module,
    position_ids: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over labelled tokens and their count.

    ``hidden``: ``(b, s, d)`` last hidden states; ``labels``: ``(b, s)`` with ``-100`` where no
    loss applies; ``head``: the output projection ``d -> vocab``. Only rows whose target is
    labelled reach the head, ``chunk_size`` rows at a time, each chunk under activation
    checkpointing: peak logits memory is ``chunk_size x vocab`` instead of ``b x s x vocab``.
    Returns ``(loss_sum, num_tokens)``; divide (after an all-reduce, if any) for the mean.
    """
    targets = shift_labels(labels, position_ids)
    selected = targets != IGNORE_INDEX
    rows = hidden[selected]
    wanted = targets[selected]
    count = selected.sum()
    if rows.shape[0] == 0:
        # Keeps the graph connected, through the head too, so that every rank runs the same
        # backward: DDP reduces every parameter's gradient, FSDP2 every unit's (an empty
        # micro-batch of kangaroo.data.even_epochs has no labelled token at all).
        return head(hidden[:, :1]).float().sum() * 0.0, count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        total = total + checkpoint(_chunk_loss_sum, head, rows[chunk], wanted[chunk], use_reentrant=False)
    return total, count


def labelled_sample_logprobs(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module,
    position_ids: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's summed log-probability of its labelled tokens, and their count: ``(m,)``
    each, for the ``m`` samples with a labelled token in row-major order (a sample is a run of
    ``position_ids`` from 0, the whole row without them). The head sees only labelled rows,
    ``chunk_size`` at a time under activation checkpointing, as in ``labelled_token_loss``."""
    targets = shift_labels(labels, position_ids)
    selected = targets != IGNORE_INDEX
    owners = sample_index(labels, position_ids).view_as(labels)[selected]
    rows, wanted = hidden[selected], targets[selected]
    if rows.shape[0] == 0:  # connected through the head, as in labelled_token_loss
        connected = head(hidden[:, :1]).float().sum() * 0.0
        return hidden.new_zeros(0, dtype=torch.float32) + connected, owners.new_zeros(0)
    pieces = [checkpoint(_chunk_logprobs, head, rows[start:start + chunk_size], wanted[start:start + chunk_size],
                         use_reentrant=False) for start in range(0, rows.shape[0], chunk_size)]
    _, sample = torch.unique_consecutive(owners, return_inverse=True)  # owners ascend: row-major order
    count = int(sample[-1]) + 1
    sums = torch.zeros(count, dtype=torch.float32, device=hidden.device).index_add(0, sample, torch.cat(pieces))
    return sums, torch.bincount(sample, minlength=count)


def _chunk_logprobs(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(rows).float(), targets, reduction="none")


def _chunk_loss_sum(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(rows).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def first_answer_tokens(
    hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy prediction of each sample's first answer token, and the token itself.

    A sample is a run of ``position_ids`` starting at 0 (the whole row without them). For
    every sample with a labelled token, the hidden state just before its first label goes
    through ``head`` and the arg-max is the token greedy decoding would produce first: for a
    multiple-choice answer (a letter) that is the answer. Samples come in row-major order,
    padding runs (no labels) are left out. Returns ``(predicted, target)``, each ``(n,)``.
    """
    targets = shift_labels(labels, position_ids)
    flat_targets = targets.reshape(-1)
    sample = sample_index(labels, position_ids)
    labelled = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    if labelled.numel() == 0:
        empty = labels.new_zeros(0)
        return empty, empty
    # The first labelled position of each sample: labelled positions whose sample differs from
    # the previous labelled position's.
    owners = sample[labelled]
    first = torch.ones_like(owners, dtype=torch.bool)
    first[1:] = owners[1:] != owners[:-1]
    positions = labelled[first]
    rows = hidden.reshape(-1, hidden.shape[-1])[positions]
    predicted = head(rows).argmax(-1)
    return predicted, flat_targets[positions]
