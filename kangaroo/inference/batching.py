"""Concurrent requests decoded together: ``kangaroo serve``'s scheduler.

Requests wait in one queue. A worker thread takes the oldest, adds the waiting requests that
decode with the same sampling settings (greedy ones together; a request with a ``seed`` alone, so
that its sample is the one it gets alone; one with ``alone_prefix_tokens`` of its prompt in the
prefix cache alone too, as it then prefills only its new tokens), up to ``max_batch`` rows and ``max_batch_tokens``
(rows x (longest prompt + most new tokens): the batch's KV cache), and runs them as one
left-padded ``generate``: one prefill, one decoding step per token for all rows. Each row stops on
its own (a stop token, its own ``max_tokens``, its deadline, or its client going away: a
cancelled row stops decoding, the others go on) and streams its own text. Under greedy decoding a
row's reply is the one it gets alone (``Generator.generate``'s left padding).

transformers' ``generate`` batches prompts but has no queue, per-row limits or per-row
streaming; vLLM-style continuous batching (rows joining a running batch) is not done here: a
batch runs until its last row finishes, and requests that arrive meanwhile form the next one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from kangaroo.inference.generation import Generator, Prompt, Reply

SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "seed")


@dataclass
class Job:
    """One request in the scheduler: its prompt, limits, and the queue its text arrives on."""

    prompt: Prompt
    options: dict[str, Any]
    max_new_tokens: int
    deadline: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    events: queue.Queue = field(default_factory=queue.Queue)
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    stream: bool = True
    """Hand text over as it is decoded (``pieces``); otherwise only the whole reply (``result``)."""
    sent: str = ""
    prefix: int = 0
    read: int = 0
    """Incremental detokenization: ``tokens[prefix:read]`` decoded is the tail of ``sent``."""
    reply: Reply | None = None
    done: bool = False
    """The reply was handed over (a row's reply goes as soon as the row stops, not with its batch)."""

    @property
    def cost(self) -> int:
        return len(self.prompt.input_ids) + self.max_new_tokens

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def pieces(self) -> Iterator[str]:
        """The reply's text as it is decoded; ``self.reply`` is set when it ends. Closing the
        iterator early cancels the row (the rest of its batch decodes on)."""
        finished = False
        try:
            while True:
                kind, value = self.events.get()
                if kind == "piece":
                    yield value
                elif kind == "done":
                    self.reply = value
                    finished = True
                    return
                else:
                    finished = True
                    raise value
        finally:
            if not finished:
                self.cancel.set()

    def result(self) -> Reply:
        """Waits for the whole reply."""
        for _ in self.pieces():
            pass
        assert self.reply is not None
        return self.reply


class BatchScheduler:
    """Batches the requests of a shared ``Generator`` (see the module docstring)."""

    def __init__(self, generator: Generator, max_batch: int = 8, max_batch_tokens: int = 65536,
                 alone_prefix_tokens: int = 2048) -> None:
        if max_batch < 1 or max_batch_tokens < 1:
            raise ValueError(f"max_batch and max_batch_tokens must be positive, got {max_batch}, {max_batch_tokens}")
        self.generator, self.max_batch, self.max_batch_tokens = generator, max_batch, max_batch_tokens
        self.alone_prefix_tokens = alone_prefix_tokens
        self._waiting: deque[Job] = deque()
        self._ready = threading.Condition()
        self.batches = self.rows = self.largest_batch = 0
        self._worker = threading.Thread(target=self._run, name="kangaroo-batches", daemon=True)
        self._worker.start()

    def submit(self, prompt: Prompt, deadline: float | None = None, cancel: threading.Event | None = None,
               stream: bool = True, **options: Any) -> Job:
        """Queues ``prompt``; ``options`` as ``Generator.generate`` takes them. ``cancel``: the row
        stops once it is set; ``deadline`` (``time.monotonic()``): it stops there (``timeout``).
        ``stream``: text pieces as they are decoded (``Job.pieces``); ``False``: only the reply."""
        config = self.generator._generation_config(**options)  # checks them now, in the request's thread
        job = Job(prompt, {k: options.get(k) for k in SAMPLING_KEYS}, config.max_new_tokens, deadline,
                  cancel or threading.Event(), stream=stream)
        with self._ready:
            self._waiting.append(job)
            self._ready.notify()
        return job

    def stats(self) -> dict[str, int]:
        with self._ready:
            return {"waiting": len(self._waiting), "batches": self.batches, "rows": self.rows,
                    "largest_batch": self.largest_batch}

    # -- the worker ---------------------------------------------------------------------------

    def _take(self) -> list[Job]:
        """The oldest waiting job and the compatible ones behind it, within the limits."""
        with self._ready:
            while not self._waiting:
                self._ready.wait()
            first = self._waiting.popleft()
            batch = [first]
            if first.options.get("seed") is None and not self._long_cached_prefix(first):
                key = tuple(first.options.get(k) for k in SAMPLING_KEYS)
                for job in list(self._waiting):
                    if len(batch) >= self.max_batch:
                        break
                    if tuple(job.options.get(k) for k in SAMPLING_KEYS) != key or self._long_cached_prefix(job):
                        continue
                    rows = batch + [job]
                    longest = max(len(j.prompt.input_ids) for j in rows)
                    if len(rows) * (longest + max(j.max_new_tokens for j in rows)) > self.max_batch_tokens:
                        continue
                    self._waiting.remove(job)
                    batch.append(job)
            return batch

    def _long_cached_prefix(self, job: Job) -> bool:
        """Whether the prefix cache holds ``alone_prefix_tokens`` or more of ``job``'s prompt: it then
        runs alone and prefills only its new tokens (a long video's next question). Shorter hits
        are batched instead (a batch of several rows prefills every row); a batch of one always
        uses its hit."""
        return (self.generator.cached_prefix(job.prompt) or 0) >= self.alone_prefix_tokens

    def _run(self) -> None:
        while True:
            batch = self._take()
            live = []
            for job in batch:  # given up, or out of time, while it waited
                if job.cancel.is_set() or job.expired():
                    self._finish(job, "cancelled" if job.cancel.is_set() else "timeout")
                else:
                    live.append(job)
            if not live:
                continue
            with self._ready:
                self.batches += 1
                self.rows += len(live)
                self.largest_batch = max(self.largest_batch, len(live))
            try:
                self._decode(live)
            except Exception as err:  # noqa: BLE001 - every unfinished row of the batch is told, the worker goes on
                for job in live:
                    if not job.done:
                        job.done = True
                        job.events.put(("error", err))
                continue
            for job in live:
                self._finish(job, "length")

    def _decode(self, batch: list[Job]) -> None:
        from transformers import StoppingCriteria

        generator, scheduler = self.generator, self
        stop_ids = set(generator.stop_ids)

        class RowStreamer:
            """transformers calls ``put`` with each step's tokens, one per row."""

            def put(self, value: torch.Tensor) -> None:
                if value.dim() > 1:  # the prompt's ids, (rows, 0): the prompt goes in as embeddings
                    return
                for job, token in zip(batch, value.view(-1).tolist()):
                    if job.finish is not None:
                        continue
                    if token in stop_ids:
                        scheduler._finish(job, "stop")
                        continue
                    job.tokens.append(token)
                    if job.stream:
                        scheduler._stream(job)

            def end(self) -> None:
                pass

        class RowLimits(StoppingCriteria):
            """Per row: its own max_tokens, its deadline, its client going away."""

            def __call__(self, input_ids, scores, **kwargs):  # noqa: ARG002 - transformers' signature
                done = []
                for job in batch:
                    if job.finish is None:
                        if job.cancel.is_set():
                            scheduler._finish(job, "cancelled")
                        elif job.expired():
                            scheduler._finish(job, "timeout")
                        elif len(job.tokens) >= job.max_new_tokens:
                            scheduler._finish(job, "length")
                    done.append(job.finish is not None)
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        options = dict(batch[0].options)
        seed = options.pop("seed", None)
        generator.generate([job.prompt for job in batch], streamer=RowStreamer(), seed=seed,
                           stopping=[RowLimits()], max_new_tokens=max(job.max_new_tokens for job in batch),
                           **options)

    def _stream(self, job: Job) -> None:
        """Hands over the text of the tokens decoded since the last piece. Each step decodes only
        a short window (the tokens since the last piece, after the few before them for context),
        not the whole reply: incremental detokenization as TGI and vLLM do it (transformers'
        streamers decode their whole cache at every token)."""
        decode = self.generator.tokenizer.decode
        before = decode(job.tokens[job.prefix:job.read], skip_special_tokens=True)
        now = decode(job.tokens[job.prefix:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):  # \ufffd: a character not complete yet
            piece = now[len(before):]
            job.sent += piece
            job.prefix, job.read = job.read, len(job.tokens)
            job.events.put(("piece", piece))

    def _finish(self, job: Job, reason: str) -> None:
        """Hands the row's reply over (once)."""
        if job.done:
            return
        job.done = True
        job.finish = job.finish or reason
        text = self.generator.tokenizer.decode(job.tokens, skip_special_tokens=True)
        if len(text) > len(job.sent):
            job.events.put(("piece", text[len(job.sent):]))
            job.sent = text
        job.events.put(("done", Reply(text.strip(), list(job.tokens), job.finish, len(job.prompt.input_ids))))
