"""Answering questions about videos with a loaded model folder.

A video or image goes through ``prepare``'s own path (``SampleEncoder``: PyAV decode, frame
sampling, resize, timestamps, frames dropped evenly past the sample budget); the conversation
through the tokenizer's chat template with the assistant turn opened. The prompt's embeddings
(visual features scattered into the placeholders) are prefilled once and decoded with the
language model's KV cache by transformers' own ``generate`` (greedy or sampling, stop tokens,
left-padded batches, streaming). What is written here is what ``generate`` cannot do: turn
pixels into the embeddings it starts from.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from kangaroo.data.encode import SampleEncoder
from kangaroo.data.manifest import ManifestSample
from kangaroo.data.transforms import fit_frames, normalize
from kangaroo.data.video import MediaError
from kangaroo.inference.folder import LoadedModel

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class Frames:
    """Decoded frames given directly: ``(n, H, W, 3)`` uint8 and their times in seconds."""

    frames: np.ndarray
    timestamps: np.ndarray


Media = str | Frames | None
"""A video or image path, decoded frames, or nothing (a text-only prompt)."""


@dataclass
class Prompt:
    """A tokenized prompt and its frames, ready for ``Generator.generate``."""

    input_ids: list[int]
    pixels: torch.Tensor | None
    """``(n, 3, s, s)`` uint8 at the model's resolution, or ``None``."""
    timestamps: torch.Tensor | None

    @property
    def frames(self) -> int:
        return 0 if self.pixels is None else int(self.pixels.shape[0])


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    finish_reason: str
    """``stop`` (a stop token came) or ``length`` (``max_new_tokens`` ran out)."""
    prompt_tokens: int


class Generator:
    """Prompts and replies for one loaded model folder (``kangaroo.inference.load_pretrained``)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.defaults = loaded.generation
        layout = self.model.layout
        self.encoder = SampleEncoder(loaded.preprocessing.prepare_config(loaded.folder), layout, rejects_dir=None,
                                     tokenizer=self.tokenizer)
        stops = [self.tokenizer.convert_tokens_to_ids(t) for t in self.defaults.stop_tokens
                 if t in self.tokenizer.get_vocab()]
        if self.tokenizer.eos_token_id is not None:
            stops.append(self.tokenizer.eos_token_id)
        self.stop_ids = sorted(set(stops))
        if not self.stop_ids:
            raise ValueError(f"model folder {loaded.folder}: no stop token in the tokenizer (EOS or {self.defaults.stop_tokens})")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.stop_ids[0]
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- prompts ------------------------------------------------------------------------------

    def prompt(self, messages: list[dict[str, str]], media: Media = None) -> Prompt:
        """``messages``: ``{"role", "content"}`` turns ending with the user's; the media goes where
        a ``<video>``/``<image>`` marker stands, or before the first user turn's text. Raises
        ``MediaError`` for a missing, corrupt or frameless file, ``ValueError`` for a prompt over
        the sample budget with its fewest frames."""
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("a prompt's last message must be the user's")
        if isinstance(media, Frames):
            return self._prompt_with_frames(messages, media)
        kind = None if media is None else ("image" if str(media).lower().endswith(IMAGE_SUFFIXES) else "video")
        if media is not None and not os.path.exists(media):
            raise MediaError(f"missing file: {media}")
        sample = ManifestSample(id=str(media or "text"), media_type=kind, media_path=media, conversations=messages)
        record = self.encoder.encode(sample, generation_prompt=True)
        pixels = record["pixels"]
        return Prompt(input_ids=[int(t) for t in record["input_ids"]],
                      pixels=pixels if len(pixels) else None,
                      timestamps=torch.from_numpy(record["timestamps"]) if len(pixels) else None)

    def _prompt_with_frames(self, messages: list[dict[str, str]], media: Frames) -> Prompt:
        frames = np.asarray(media.frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be (n, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
        count = len(frames)
        multiple = self.encoder.prepare.sampling.multiple_of
        if count > 1 and count % multiple:
            count -= count % multiple
        chat = self.encoder._chat_encoder()
        encoded = chat.encode(messages, self.model.layout.placeholder_ids(count), generation_prompt=True)
        pixels = fit_frames(frames[:count], self.model.layout.image_size, self.encoder.prepare.resize)
        return Prompt(encoded.input_ids, pixels, torch.as_tensor(np.asarray(media.timestamps[:count], np.float32)))

    # -- decoding -----------------------------------------------------------------------------

    def _generation_config(self, **options: Any):
        from transformers import GenerationConfig

        d = self.defaults
        pick = {k: (options[k] if options.get(k) is not None else getattr(d, k))
                for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k")}
        if options.get("temperature") is not None and options.get("do_sample") is None:
            pick["do_sample"] = options["temperature"] > 0
        if pick["temperature"] is not None and pick["temperature"] <= 0:
            pick["do_sample"] = False
        if not pick["do_sample"]:
            pick.update(temperature=None, top_p=None, top_k=None)
        if pick["max_new_tokens"] < 1:
            raise ValueError(f"max_new_tokens must be positive, got {pick['max_new_tokens']}")
        return GenerationConfig(**pick, eos_token_id=self.stop_ids, pad_token_id=self.pad_id, use_cache=True)

    @torch.no_grad()
    def embed(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds, attention_mask)`` of the prompts, left-padded to one length: the visual
        features scattered into each prompt's placeholders, media in prompt order."""
        device = self.device
        longest = max(len(p.input_ids) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt.input_ids):] = torch.tensor(prompt.input_ids)
            mask[row, longest - len(prompt.input_ids):] = 1
        with_media = [p for p in prompts if p.pixels is not None]
        visual: dict[str, Any] = {}
        if with_media:
            dtype = next(self.model.vision_tower.parameters()).dtype
            visual = dict(pixel_values=normalize(torch.cat([p.pixels for p in with_media]).to(device)).to(dtype),
                          timestamps=torch.cat([p.timestamps for p in with_media]).to(device),
                          frame_counts=torch.tensor([p.frames for p in with_media], device=device))
        embeds = self.model.embed_inputs(ids.to(device), **visual)
        return embeds, mask.to(device)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], streamer=None, seed: int | None = None,
                 cancel: threading.Event | None = None, **options: Any) -> list[Reply]:
        """Replies to ``prompts``, decoded together (left padding: each reply is the one it gets
        alone). ``options``: ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``,
        ``top_k`` over the folder's defaults (temperature 0 is greedy). ``streamer``: a
        transformers streamer (one prompt). ``cancel``: decoding stops at the next token once it
        is set (a server's client went away); the replies so far come back with
        ``finish_reason`` ``cancelled``."""
        if not prompts:
            return []
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):  # noqa: ARG002 - transformers' signature
                return torch.full((input_ids.shape[0],), bool(cancel is not None and cancel.is_set()),
                                  dtype=torch.bool, device=input_ids.device)

        config = self._generation_config(**options)
        with self._lock:  # one generation at a time per model (a server's threads share it)
            if seed is not None:
                torch.manual_seed(seed)
            embeds, mask = self.embed(prompts)
            out = self.model.language_model.generate(inputs_embeds=embeds, attention_mask=mask,
                                                     generation_config=config, streamer=streamer,
                                                     stopping_criteria=StoppingCriteriaList([Cancelled()]))
        replies = []
        for prompt, row in zip(prompts, out.tolist()):
            stop = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            tokens = row if stop is None else row[:stop]
            reason = "stop" if stop is not None else "cancelled" if cancel is not None and cancel.is_set() else "length"
            replies.append(Reply(self.tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens, reason,
                                 len(prompt.input_ids)))
        return replies

    def stream(self, prompt: Prompt, result: list[Reply] | None = None, **options: Any) -> Iterator[str]:
        """The reply to ``prompt`` piece by piece as it is decoded; the pieces join to
        ``generate([prompt])[0].text`` (before its surrounding whitespace is stripped). The
        finished ``Reply`` is appended to ``result`` when one is given. Closing the iterator
        early stops the decoding."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        failure: list[BaseException] = []
        cancel = options.pop("cancel", None) or threading.Event()

        def run() -> None:
            try:
                replies = self.generate([prompt], streamer=streamer, cancel=cancel, **options)
                if result is not None:
                    result.extend(replies)
            except BaseException as err:  # handed to the caller below
                failure.append(err)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        finished = False
        try:
            yield from streamer
            finished = True
        finally:
            if not finished:  # the consumer stopped reading: stop decoding, let the thread end
                cancel.set()
                for _ in streamer:
                    pass
            thread.join()
        if failure:
            raise failure[0]

    @torch.no_grad()
    def option_scores(self, prompt: Prompt, letters: Sequence[str]) -> list[float]:
        """Log-probabilities of each option letter as the reply's first token (``--mode
        likelihood``)."""
        ids = []
        for letter in letters:
            tokens = self.tokenizer.encode(letter, add_special_tokens=False)
            if len(tokens) != 1:
                raise ValueError(f"option letter {letter!r} is not one token of this tokenizer ({tokens})")
            ids.append(tokens[0])
        embeds, mask = self.embed([prompt])
        hidden = self.model.language_model.base_model(inputs_embeds=embeds, attention_mask=mask,
                                                      use_cache=False).last_hidden_state
        logits = self.model.output_head(hidden[:, -1]).float().log_softmax(-1)[0]
        return [float(logits[i]) for i in ids]
