"""Peak memory of the language-model loss at 22K tokens and a 128,256-token vocabulary.

Compares ``labelled_token_loss`` (labelled rows only, chunks of ``--chunk`` rows under
activation checkpointing) against materialising the full ``(tokens, vocab)`` logits, forward
and backward. Memory is counted by a dispatch mode that adds every tensor storage created
inside the measured region while it is alive (exact and deterministic, unlike process RSS; torch's
own MemTracker refuses a module called several times, as the chunk loop does).

The full-logits path needs ~23 GB at 22,528 tokens, more than this machine has; it is measured
at 1/8 and 1/4 of the length, checked linear, and scaled. Run: python benchmarks/loss_memory.py
"""

from __future__ import annotations

import argparse
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kangaroo.modules.loss import IGNORE_INDEX, labelled_token_loss


class PeakMemory(TorchDispatchMode):
    """Live bytes of the storages created inside the mode, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        if key not in self.live:
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.refs[key] = self.refs.get(key, 0) + 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.current -= self.live.pop(key)
            del self.refs[key]


def measure(fn) -> int:
    tracker = PeakMemory()
    with tracker:
        fn()
    return tracker.peak


def full_logits_loss(hidden, labels, head):
    logits = head(hidden).float()
    targets = labels[:, 1:].reshape(-1)
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets, reduction="sum").backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=22528)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=64, help="model width (the logits do not depend on it)")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--labelled", type=float, default=1.0,
                        help="fraction of positions with a label (1.0: every token, the worst case)")
    args = parser.parse_args()
    torch.manual_seed(0)
    head = nn.Linear(args.hidden, args.vocab, bias=False)

    def inputs(tokens: int):
        hidden = torch.randn(1, tokens, args.hidden, requires_grad=True)
        labels = torch.randint(0, args.vocab, (1, tokens))
        labels[torch.rand(1, tokens) >= args.labelled] = IGNORE_INDEX
        return hidden, labels

    hidden, labels = inputs(args.tokens)

    def chunked():
        loss_sum, _ = labelled_token_loss(hidden, labels, head, None, args.chunk)
        loss_sum.backward()

    ours = measure(chunked)
    head.weight.grad = None
    small = {}
    for fraction in (8, 4):
        h, lab = inputs(args.tokens // fraction)
        small[fraction] = measure(lambda: full_logits_loss(h, lab, head))
        head.weight.grad = None
    linearity = small[4] / small[8]
    full = small[8] * 8
    gib = 2**30
    print(f"tokens {args.tokens}, vocab {args.vocab}, labelled fraction {args.labelled}, chunk {args.chunk}")
    print(f"full logits at {args.tokens // 8} / {args.tokens // 4} tokens: {small[8] / gib:.2f} / {small[4] / gib:.2f} GiB "
          f"(ratio {linearity:.3f}; linear in tokens)")
    print(f"full logits, scaled to {args.tokens} tokens: {full / gib:.2f} GiB")
    print(f"labelled_token_loss, measured at {args.tokens} tokens: {ours / gib:.3f} GiB")
    print(f"ratio: {ours / full:.2%} of the full logits")


if __name__ == "__main__":
    main()
