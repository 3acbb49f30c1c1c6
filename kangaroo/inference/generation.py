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

import hashlib
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from kangaroo.data.encode import Media as DecodedMedia
from kangaroo.data.encode import SampleEncoder
from kangaroo.data.manifest import ManifestSample
from kangaroo.data.video import FrameSampling, MediaError
from kangaroo.inference.folder import LoadedModel
from kangaroo.inference.prefix_cache import PrefixCache, content_hash

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
    media_key: str | None = None
    """The media's content hash and how it was sampled and sized (``None``: no media, or no
    cache): prompts with the same key have the same visual features."""

    @property
    def frames(self) -> int:
        return 0 if self.pixels is None else int(self.pixels.shape[0])


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    finish_reason: str
    """``stop`` (a stop token came), ``length`` (``max_new_tokens`` ran out), ``cancelled`` or
    ``timeout`` (see ``Generator.generate``)."""
    prompt_tokens: int


class Generator:
    """Prompts and replies for one loaded model folder (``kangaroo.inference.load_pretrained``)."""

    def __init__(self, loaded: LoadedModel, cache_mb: float = 1024.0) -> None:
        """``cache_mb``: the memory the decoded frames and prompt KV caches of recent
        conversations may hold (``kangaroo.inference.prefix_cache``); 0 turns the cache off."""
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.defaults = loaded.generation
        self.layout = self.model.layout
        prepare = loaded.preprocessing.prepare_config(loaded.folder)
        # a minimum duration is a training-data filter (instruction data drops clips under 5 s): not for questions
        prepare.sampling = replace(prepare.sampling, min_duration=0.0)
        self.encoder = SampleEncoder(prepare, self.layout, rejects_dir=None, tokenizer=self.tokenizer)
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
        self.cache = PrefixCache(int(cache_mb * 2**20)) if cache_mb > 0 else None
        visual = self.model.visual_tokens
        self._visual_ids = {visual.placeholder, visual.vi_start, visual.eof, visual.eov, visual.vi_end}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def sampling(self) -> FrameSampling:
        """The frame sampling prompts get unless they name their own (``prompt(sampling=...)``)."""
        return self.encoder.prepare.sampling

    @sampling.setter
    def sampling(self, value: FrameSampling) -> None:
        self.encoder.prepare.sampling = value

    def _encoder(self, sampling: FrameSampling | None) -> SampleEncoder:
        if sampling is None:
            return self.encoder
        return SampleEncoder(replace(self.encoder.prepare, sampling=sampling), self.layout, None, self.tokenizer)

    # -- prompts ------------------------------------------------------------------------------

    def prompt(self, messages: list[dict[str, str]], media: Media = None, sampling: FrameSampling | None = None) -> Prompt:
        """``messages``: ``{"role", "content"}`` turns ending with the user's; the media goes where
        a ``<video>``/``<image>`` marker stands, or before the first user turn's text.
        ``sampling``: this prompt's frame sampling instead of ``self.sampling``. Raises
        ``MediaError`` for a missing, corrupt or frameless file, ``ValueError`` for a prompt over
        the sample budget (with its fewest frames)."""
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("a prompt's last message must be the user's")
        encoder = self._encoder(sampling)
        # An image's timestamp is drawn from the sample id in prepare; here every image gets the
        # same one, so that a reply does not depend on the file's name.
        sample = ManifestSample(id="inference", media_type=None, media_path=None, conversations=messages)
        key, decoded = None, None
        how = f"{encoder.prepare.sampling}|{self.layout.image_size}|{encoder.prepare.resize}"
        if isinstance(media, Frames):
            decoded = self._frames(media, encoder)
            if self.cache is not None:
                digest = hashlib.sha256(np.ascontiguousarray(decoded.frames).data)
                digest.update(np.ascontiguousarray(decoded.timestamps).data)
                key = f"frames:{digest.hexdigest()}|{how}"
        elif media is not None:
            if not os.path.exists(media):
                raise MediaError(f"missing file: {media}")
            sample.media_type = "image" if str(media).lower().endswith(IMAGE_SUFFIXES) else "video"
            sample.media_path = str(media)
            if self.cache is not None:  # a second question about the same file skips the decode
                key = f"{sample.media_type}:{content_hash(sample.media_path)}|{how}"
                decoded = self.cache.frames(key)
            if decoded is None:
                decoded = encoder._load(sample)
                if key is not None:
                    self.cache.put_frames(key, decoded)
        record = encoder.encode_media(sample, decoded, generation_prompt=True)
        pixels = record["pixels"]
        return Prompt(input_ids=[int(t) for t in record["input_ids"]],
                      pixels=pixels if len(pixels) else None,
                      timestamps=torch.from_numpy(record["timestamps"]) if len(pixels) else None,
                      media_key=key)

    @staticmethod
    def _frames(media: Frames, encoder: SampleEncoder) -> DecodedMedia:
        """Decoded frames, trimmed to a count the temporal kernel takes (one frame: an image)."""
        frames = np.asarray(media.frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
            raise ValueError(f"frames must be (n, H, W, 3) uint8 with n >= 1, got {frames.shape} {frames.dtype}")
        timestamps = np.asarray(media.timestamps, np.float32)
        if timestamps.shape != (len(frames),):
            raise ValueError(f"{len(frames)} frames need {len(frames)} timestamps, got shape {timestamps.shape}")
        multiple = encoder.prepare.sampling.multiple_of
        count = len(frames) - len(frames) % multiple if len(frames) > 1 else 1
        count = max(count, 1)
        return DecodedMedia(frames[:count], timestamps[:count])

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
        return GenerationConfig(**pick, eos_token_id=self.stop_ids, pad_token_id=self.pad_id, use_cache=True,
                                return_dict_in_generate=True)

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
        # One media item at a time through the vision tower: a batch of requests costs the tower
        # what their media cost one by one (8 long videos in one call would hold 8 times the
        # activations), every reply's features are exactly those it gets alone, and a video
        # asked about again reuses its features from the cache (vLLM keeps an encoder cache
        # for the same reason).
        features = [self.visual_features(p) for p in prompts if p.pixels is not None]
        embeds = self.model.embed_inputs(ids.to(device), visual_features=torch.cat(features) if features else None)
        return embeds, mask.to(device)

    @torch.no_grad()
    def visual_features(self, prompt: Prompt) -> torch.Tensor:
        """The projected visual tokens of ``prompt``'s media, from the cache when the same frames
        of the same media were seen before (same content, sampling and size, and the same frames
        kept: a long conversation may keep fewer of a video's frames within the prompt budget)."""
        key = None
        if self.cache is not None and prompt.media_key is not None:
            frames = hashlib.sha256(np.ascontiguousarray(prompt.timestamps.numpy()).data).hexdigest()[:16]
            key = f"{prompt.media_key}|{prompt.frames}|{frames}"
            kept = self.cache.features(key)
            if kept is not None:
                return kept
        device = self.device
        features = self.model.get_visual_features(prompt.pixels.to(device), prompt.timestamps.to(device),
                                                  torch.tensor([prompt.frames], device=device))
        if key is not None:
            self.cache.put_features(key, features)
        return features

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], streamer=None, seed: int | None = None,
                 cancel: threading.Event | None = None, deadline: float | None = None,
                 stopping: Sequence[Any] = (), **options: Any) -> list[Reply]:
        """Replies to ``prompts``, decoded together (left padding: each reply is the one it gets
        alone). ``options``: ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``,
        ``top_k`` over the folder's defaults (temperature 0 is greedy). ``streamer``: a
        transformers streamer (one prompt). ``cancel``: decoding stops at the next token once it
        is set (a server's client went away); the replies so far come back with
        ``finish_reason`` ``cancelled``. ``deadline`` (``time.monotonic()`` seconds): waiting for
        the model and decoding stop there; the replies so far come back with ``finish_reason``
        ``timeout``. ``stopping``: further transformers ``StoppingCriteria`` (per-row limits, see
        ``kangaroo.inference.batching``)."""
        if not prompts:
            return []
        from transformers import StoppingCriteria, StoppingCriteriaList

        def expired() -> bool:
            return deadline is not None and time.monotonic() >= deadline

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):  # noqa: ARG002 - transformers' signature
                stop = bool(cancel is not None and cancel.is_set()) or expired()
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        config = self._generation_config(**options)
        hit = self.cached_prefix(prompts[0], take=True) if len(prompts) == 1 else None
        wait = -1 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._lock.acquire(timeout=wait):  # one generation at a time per model (a server's threads share it)
            return [Reply("", [], "timeout", len(p.input_ids)) for p in prompts]
        try:
            if cancel is not None and cancel.is_set():  # given up while it waited for the model
                return [Reply("", [], "cancelled", len(p.input_ids)) for p in prompts]
            if seed is not None:
                torch.manual_seed(seed)
            criteria = StoppingCriteriaList([Cancelled(), *stopping])
            llm = self.model.language_model
            if hit is not None:  # the shared prefix is in the cache: only the rest is prefilled
                ids = torch.tensor([prompts[0].input_ids], dtype=torch.long, device=self.device)
                out = llm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=hit[0],
                                   generation_config=config, streamer=streamer, stopping_criteria=criteria)
                rows = out.sequences[:, ids.shape[1]:]
            else:
                embeds, mask = self.embed(prompts)
                out = llm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config,
                                   streamer=streamer, stopping_criteria=criteria)
                rows = out.sequences
            if self.cache is not None and out.cache is not None:
                self._keep_caches(prompts, rows.tolist(), out.cache)
        finally:
            self._lock.release()
        replies = []
        for prompt, row in zip(prompts, rows.tolist()):
            stop = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            tokens = row if stop is None else row[:stop]
            reason = ("stop" if stop is not None else "cancelled" if cancel is not None and cancel.is_set()
                      else "timeout" if expired() else "length")
            replies.append(Reply(self.tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens, reason,
                                 len(prompt.input_ids)))
        return replies

    def _visual_end(self, ids: list[int]) -> int:
        """The index after the prompt's last visual token (0 without media)."""
        return next((len(ids) - i for i, t in enumerate(reversed(ids)) if t in self._visual_ids), 0)

    def cached_prefix(self, prompt: Prompt, take: bool = False) -> tuple[Any, int] | int | None:
        """How many leading tokens of ``prompt`` a cached KV cache serves (``take``: that cache,
        cropped, and the count, out of the cache; ``None`` when none serves it)."""
        if self.cache is None:
            return None
        visual_end = self._visual_end(prompt.input_ids)
        if take:
            return self.cache.take(prompt.media_key, prompt.input_ids, visual_end)
        return self.cache.match(prompt.media_key, prompt.input_ids, visual_end) or None

    def _keep_caches(self, prompts: Sequence[Prompt], rows: list[list[int]], cache: Any) -> None:
        """Puts each row's KV cache (its prompt and reply, without the left padding of the batch
        and the padding after its stop) into the prefix cache."""
        from transformers import DynamicCache

        longest = max(len(p.input_ids) for p in prompts)
        held = cache.get_seq_length()
        for r, (prompt, row) in enumerate(zip(prompts, rows)):
            stop = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            own = row if stop is None else row[:stop + 1]  # the stop token is the turn's end in the next prompt
            covered = min(len(own), held - longest)
            tokens = prompt.input_ids + own[:covered]
            start = longest - len(prompt.input_ids)
            if len(prompts) == 1 and covered == held - longest:
                self.cache.put(prompt.media_key, tokens, cache)
                continue
            layers = [(layer.keys[r:r + 1, :, start:longest + covered].clone(),
                       layer.values[r:r + 1, :, start:longest + covered].clone()) for layer in cache.layers]
            self.cache.put(prompt.media_key, tokens, DynamicCache(layers))

    def stream(self, prompt: Prompt, result: list[Reply] | None = None, **options: Any) -> Iterator[str]:
        """The reply to ``prompt`` piece by piece as it is decoded; the pieces join to
        ``generate([prompt])[0].text`` (before its surrounding whitespace is stripped). The
        finished ``Reply`` is appended to ``result`` when one is given. Closing the iterator
        early stops the decoding."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
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
    def continuation_logprobs(self, prompt: Prompt, continuation: Sequence[int]) -> torch.Tensor:
        """``(len(continuation), vocab)`` log-probabilities of each next token as the reply
        continues with ``continuation`` (one forward pass, no cache)."""
        embeds, _ = self.embed([prompt])
        table = self.model.language_model.get_input_embeddings()
        tokens = torch.tensor([list(continuation)], dtype=torch.long, device=embeds.device)
        sequence = torch.cat([embeds, table(tokens)], dim=1)[:, :-1] if len(continuation) else embeds
        hidden = self.model.language_model.base_model(inputs_embeds=sequence, use_cache=False).last_hidden_state
        return self.model.output_head(hidden[0, embeds.shape[1] - 1:]).float().log_softmax(-1)

    def option_scores(self, prompt: Prompt, letters: Sequence[str]) -> list[float]:
        """Log-probabilities of each option letter as the reply's first token (``--mode
        likelihood``)."""
        ids = []
        for letter in letters:
            tokens = self.tokenizer.encode(letter, add_special_tokens=False)
            if len(tokens) != 1:
                raise ValueError(f"option letter {letter!r} is not one token of this tokenizer ({tokens})")
            ids.append(tokens[0])
        first = self.continuation_logprobs(prompt, [])[0]
        return [float(first[i]) for i in ids]


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first of ``stops`` (which is not kept)."""
    hits = [text.index(stop) for stop in stops if stop and stop in text]
    return text[:min(hits)] if hits else text
