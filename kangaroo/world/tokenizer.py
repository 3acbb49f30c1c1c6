"""A small byte-level BPE tokenizer for the tiny model, trained on the text it will see.

Built with the ``tokenizers`` library (training a BPE by hand would be reimplementing it). The
visual layout tokens take the ids of ``kangaroo_tiny_config().visual_tokens`` so that the tiny
model and this tokenizer agree by construction.
"""

from __future__ import annotations

import os
from typing import Iterable

from kangaroo.data.tokenization import LLAMA3_STYLE_TEMPLATE
from kangaroo.modules.layout import VisualTokens
from kangaroo.modules.sizes import TINY_VISUAL_TOKENS, TINY_VOCAB

TEXT_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>", "<|pad|>"]
VISUAL_TOKEN_NAMES = {"placeholder": "<|visual|>", "vi_start": "<vi_start>", "eof": "<eof>", "eov": "<eov>",
                      "vi_end": "<vi_end>"}


def build_tiny_tokenizer(corpus: Iterable[str], vocab_size: int = TINY_VOCAB,
                         visual_tokens: VisualTokens = TINY_VISUAL_TOKENS):
    """Trains on ``corpus`` and returns a ``PreTrainedTokenizerFast`` with a Llama-3 style chat
    template. The visual tokens must be the last ids of the vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    by_id = sorted((token_id, VISUAL_TOKEN_NAMES[name]) for name, token_id in vars(visual_tokens).items())
    first_visual = by_id[0][0]
    if [token_id for token_id, _ in by_id] != list(range(first_visual, vocab_size)):
        raise ValueError(f"visual token ids {by_id} must be the last ids below vocab_size={vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    # CJK characters stand alone before the byte-level split, so that BPE learns characters and
    # words, not whole unspaced sentences (which would make each Chinese caption one token).
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("[\u3400-\u9fff\uf900-\ufaff]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=first_visual, special_tokens=TEXT_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    # A small corpus may give fewer merges than asked: filler tokens keep the visual ids in place.
    fillers = [f"<|unused_{i}|>" for i in range(first_visual - tokenizer.get_vocab_size())]
    tokenizer.add_special_tokens(fillers + [name for _, name in by_id])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|pad|>",
    )
    fast.chat_template = LLAMA3_STYLE_TEMPLATE
    for token_id, name in by_id:
        if fast.convert_tokens_to_ids(name) != token_id:
            raise RuntimeError(f"tiny tokenizer put {name} at {fast.convert_tokens_to_ids(name)}, not {token_id}")
    return fast


def write_tokenizer(output: str, texts: list[str]):
    """Trains the tiny tokenizer on ``texts`` and saves it in ``output/tokenizer``."""
    tokenizer = build_tiny_tokenizer(texts)
    tokenizer.save_pretrained(os.path.join(output, "tokenizer"))
    return tokenizer
