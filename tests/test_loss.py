import torch
import torch.nn.functional as F
from torch import nn

from kangaroo.modules import IGNORE_INDEX, labelled_token_loss
from kangaroo.modules.loss import shift_labels


def _case(seed=0, b=2, s=12, d=8, vocab=50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, d, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (b, s), generator=g)
    labels[:, :4] = IGNORE_INDEX
    head = nn.Linear(d, vocab, bias=False)
    return hidden, labels, head


def test_equals_cross_entropy_of_full_logits_and_gradients_match():
    hidden, labels, head = _case()
    loss_sum, count = labelled_token_loss(hidden, labels, head, chunk_size=3)
    (grad_chunked,) = torch.autograd.grad(loss_sum, hidden)

    logits = head(hidden)[:, :-1]
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")
    (grad_ref,) = torch.autograd.grad(reference, hidden)

    assert count == (labels[:, 1:] != IGNORE_INDEX).sum()
    torch.testing.assert_close(loss_sum, reference)
    torch.testing.assert_close(grad_chunked, grad_ref)


def test_sample_starts_in_a_packed_row_are_never_targets():
    labels = torch.tensor([[5, 6, 7, 8, 9]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1]])  # two samples: [5 6 7] [8 9]
    targets = shift_labels(labels, position_ids)
    assert targets.tolist() == [[6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]]


def test_no_labels_gives_zero_loss_that_still_backpropagates():
    hidden, labels, head = _case()
    labels[:] = IGNORE_INDEX
    loss_sum, count = labelled_token_loss(hidden, labels, head)
    assert count == 0 and loss_sum.item() == 0.0
    loss_sum.backward()
    assert hidden.grad is not None
