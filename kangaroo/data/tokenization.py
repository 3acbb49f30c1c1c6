"""Conversations to token ids through the tokenizer's chat template, labels on assistant turns."""

from __future__ import annotations

from dataclasses import dataclass

from kangaroo.data.manifest import MEDIA_MARKERS
from kangaroo.modules.layout import IGNORE_INDEX, VisualTokens

_MEDIA_SLOT = "\uFFFCmedia\uFFFC"  # stands for the media in rendered text until it becomes token ids

# A Llama-3 style template for tokenizers that ship none (the tiny tokenizer).
LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]
    """``-100`` everywhere but the assistant turns' content and end-of-turn tokens."""


class ChatEncoder:
    """Renders conversations with ``tokenizer.apply_chat_template`` and tokenizes them turn by
    turn, so that labels cover exactly the text each assistant turn adds to the rendering."""

    def __init__(self, tokenizer, visual_tokens: VisualTokens) -> None:
        self.tokenizer = tokenizer
        if tokenizer.chat_template is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template")
        self.visual_ids = set(vars(visual_tokens).values())
        if max(self.visual_ids) >= len(tokenizer):
            raise ValueError(
                f"visual token ids {sorted(self.visual_ids)} lie outside tokenizer {tokenizer.name_or_path!r} "
                f"({len(tokenizer)} tokens)"
            )

    def encode(self, conversations: list[dict[str, str]], media_ids: list[int] | None = None,
               generation_prompt: bool = False) -> EncodedConversation:
        """``media_ids``: the visual layout of the sample's media (``VisualLayout.placeholder_ids``),
        placed at the ``<video>``/``<image>`` marker or before the first user turn's text.
        ``generation_prompt``: end with the template's opening of an assistant turn (unlabelled),
        for a conversation whose last turn is the user's question to be answered."""
        messages = _place_media(conversations) if media_ids else _strip_markers(conversations)
        ids: list[int] = []
        labels: list[int] = []
        rendered = ""
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt = self._render(messages[:k], generation_prompt=True)
                self._extend(ids, labels, self._suffix(rendered, prompt), media_ids, labelled=False)
                rendered = prompt
            full = self._render(messages[: k + 1], generation_prompt=False)
            self._extend(ids, labels, self._suffix(rendered, full), media_ids, labelled=message["role"] == "assistant")
            rendered = full
        if generation_prompt:
            prompt = self._render(messages, generation_prompt=True)
            self._extend(ids, labels, self._suffix(rendered, prompt), media_ids, labelled=False)
        return EncodedConversation(ids, labels)

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    @staticmethod
    def _suffix(previous: str, current: str) -> str:
        if not current.startswith(previous):
            raise ValueError("the chat template does not render conversations prefix-stably; cannot place labels")
        return current[len(previous) :]

    def _extend(self, ids: list[int], labels: list[int], text: str, media_ids: list[int] | None, labelled: bool) -> None:
        pieces = text.split(_MEDIA_SLOT)
        for i, piece in enumerate(pieces):
            if i:
                ids.extend(media_ids)
                labels.extend([IGNORE_INDEX] * len(media_ids))
            tokens = self.tokenizer.encode(piece, add_special_tokens=False) if piece else []
            if self.visual_ids.intersection(tokens):
                raise ValueError("conversation text contains the visual layout's special tokens")
            ids.extend(tokens)
            labels.extend(tokens if labelled else [IGNORE_INDEX] * len(tokens))


def _place_media(conversations: list[dict[str, str]]) -> list[dict[str, str]]:
    messages = [dict(turn) for turn in conversations]
    for turn in messages:
        for marker in MEDIA_MARKERS:
            if marker in turn["content"]:
                turn["content"] = turn["content"].replace(marker, _MEDIA_SLOT, 1)
                return _strip_markers(messages)
    first_user = next(turn for turn in messages if turn["role"] == "user")
    first_user["content"] = _MEDIA_SLOT + "\n" + first_user["content"]
    return messages


def _strip_markers(conversations: list[dict[str, str]]) -> list[dict[str, str]]:
    messages = [dict(turn) for turn in conversations]
    for turn in messages:
        for marker in MEDIA_MARKERS:
            turn["content"] = turn["content"].replace(marker, "")
    return messages
