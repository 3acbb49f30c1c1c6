"""Concurrent requests decoded together: ``kangaroo serve``'s scheduler (continuous batching).

Requests wait in one queue. A worker thread keeps a set of *running rows* that decode one token
per step together. Between two steps, waiting requests join: they are prefilled together (their prompts left-padded to one length), and their
KV caches are merged into the running rows' (left-padded to one length; each row keeps its own
positions and attention mask). A row leaves as soon as it stops (a stop token, its own
``max_tokens``, its deadline, or its client going away) and its reply is handed over at once; the
others decode on. This is how vLLM and TGI batch (rows joining and leaving a running batch):
transformers' ``generate`` batches prompts, but a batch there runs until its last row ends and
takes no new rows, so requests arriving meanwhile would wait for the longest reply. Under greedy
decoding a row's reply is the one it gets alone (in fp32 exactly; in 16 bits up to the rounding
of kernels that sum in another order for another batch shape, which may flip a near tie).

A request whose prompt starts with a prefix in the prefix cache (a conversation's next turn, a
new question about a video: ``kangaroo.inference.prefix_cache``) prefills only what follows it,
then joins like any other. Each row samples with its own settings (greedy, temperature, top-k,
top-p: transformers' own warpers) and its own random generator when it names a ``seed``, so that
rows of any settings share steps and a seeded reply is the same whichever rows it ran beside.

Limits: up to ``max_batch`` rows, and ``max_batch_tokens`` for the rows' KV caches (rows x
(cache length + most new tokens still allowed)); requests join in their order of arrival (none
overtakes one that does not fit yet).

A request the server has accepted but not yet queued (its body read, its video decoding) is
*arriving* (``BatchScheduler.arriving``). When no rows are running, the first rows wait for
arriving requests up to ``max_wait_s``, so that clients sending at once start together. Nothing
waits when no request is on its way, and running rows never wait.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from kangaroo.inference.generation import Generator, Prompt, Reply



@dataclass
class Job:
    """One request in the scheduler: its prompt, limits, and the queue its text arrives on."""

    prompt: Prompt
    seed: int | None
    max_new_tokens: int
    config: Any = None
    """The ``GenerationConfig`` the request decodes with."""
    rng: torch.Generator | None = None
    """The row's own random generator when it names a seed."""
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


def _new_cache(layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
    """A ``DynamicCache`` holding ``layers``' keys and values as they are (``DynamicCache(layers)``
    would copy each into a new tensor: a second copy of a batch's whole KV cache at a merge)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    for keys, values in layers or []:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


@dataclass
class Rows:
    """The rows decoding together: their KV cache and attention mask, left-padded to one length;
    each row's next position and newest token (fed at the next step)."""

    jobs: list[Job]
    cache: Any
    mask: torch.Tensor
    """``(rows, length)``: 1 where a row holds a token, 0 for its left padding."""
    positions: torch.Tensor
    last: torch.Tensor

    def merged_into(self, rows: Rows | None) -> Rows:
        """``rows`` followed by these rows, both left-padded to the longer cache."""
        if rows is None:
            return self
        length = max(rows.mask.shape[1], self.mask.shape[1])

        def pad(tensor: torch.Tensor, dim: int) -> torch.Tensor:
            missing = length - tensor.shape[dim]
            if not missing:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        layers = []
        for a, b in zip(rows.cache.layers, self.cache.layers):  # each source layer freed once merged
            layers.append((torch.cat([pad(a.keys, 2), pad(b.keys, 2)]), torch.cat([pad(a.values, 2), pad(b.values, 2)])))
            a.keys = a.values = b.keys = b.values = None
        return Rows(rows.jobs + self.jobs, _new_cache(layers), torch.cat([pad(rows.mask, 1), pad(self.mask, 1)]),
                    torch.cat([rows.positions, self.positions]), torch.cat([rows.last, self.last]))

    def without(self, ended: list[int]) -> Rows | None:
        """The rows but ``ended``, with the padding no remaining row needs cut off."""
        keep = [r for r in range(len(self.jobs)) if r not in set(ended)]
        if not keep:
            return None
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[index]
        start = int(mask.any(0).nonzero()[0])
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
        return Rows([self.jobs[r] for r in keep], self.cache, mask[:, start:], self.positions[index],
                    self.last[index])


class BatchScheduler:
    """Batches the requests of a shared ``Generator`` (see the module docstring)."""

    def __init__(self, generator: Generator, max_batch: int = 8, max_batch_tokens: int = 65536,
                 max_wait_s: float = 0.1) -> None:
        if max_batch < 1 or max_batch_tokens < 1:
            raise ValueError(f"max_batch and max_batch_tokens must be positive, got {max_batch}, {max_batch_tokens}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be 0 or more, got {max_wait_s}")
        self.generator, self.max_batch, self.max_batch_tokens = generator, max_batch, max_batch_tokens
        self.max_wait_s = max_wait_s
        self._arriving = 0
        self._taken: list[Job] = []
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
        job = Job(prompt, options.get("seed"), config.max_new_tokens, config=config,
                  deadline=deadline, cancel=cancel or threading.Event(), stream=stream)
        with self._ready:
            self._waiting.append(job)
            self._ready.notify()
        return job

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Marks a request on its way to ``submit`` (call ``submit`` inside the block): a batch
        being formed waits for it, up to ``max_wait_s``."""
        with self._ready:
            self._arriving += 1
        try:
            yield
        finally:
            with self._ready:
                self._arriving -= 1
                self._ready.notify_all()

    def stats(self) -> dict[str, int]:
        with self._ready:
            return {"waiting": len(self._waiting), "arriving": self._arriving, "batches": self.batches,
                    "rows": self.rows, "largest_batch": self.largest_batch}

    # -- the worker ---------------------------------------------------------------------------

    def _admit(self, rows: Rows | None) -> list[Job]:
        """The waiting jobs that join ``rows``, in their order of arrival. Blocks while nothing
        runs and nothing waits; while nothing runs, waits up to ``max_wait_s`` for arriving
        requests."""
        with self._ready:
            if rows is None:
                while not self._waiting:
                    self._ready.wait()
            running = rows.jobs if rows is not None else []
            length = rows.mask.shape[1] if rows is not None else 0
            taken = self._taken = []  # reachable from _run should this fail half-way
            until = time.monotonic() + self.max_wait_s
            while True:
                for job in [j for j in self._waiting if j.cancel.is_set() or j.expired()]:
                    self._waiting.remove(job)  # given up, or out of time, while it waited: answered now
                    self._finish(job, "cancelled" if job.cancel.is_set() else "timeout")
                while self._waiting and len(running) + len(taken) < self.max_batch:
                    job = self._waiting[0]
                    group = running + taken + [job]
                    longest = max([length] + [len(j.prompt.input_ids) for j in taken + [job]])
                    fits = len(group) * (longest + max(j.max_new_tokens - len(j.tokens) for j in group)) \
                        <= self.max_batch_tokens
                    if not fits and len(group) > 1:  # a request larger than the limit runs alone
                        break
                    taken.append(self._waiting.popleft())
                left = until - time.monotonic()
                if (rows is not None or len(running) + len(taken) >= self.max_batch or not self._arriving
                        or left <= 0):
                    return taken
                self._ready.wait(left)

    def _run(self) -> None:
        rows: Rows | None = None
        while True:
            try:
                joining = self._admit(rows)
            except Exception as err:  # noqa: BLE001 - a failure here must not leave requests waiting forever
                with self._ready:
                    stranded = list(self._waiting) + self._taken + (rows.jobs if rows is not None else [])
                    self._waiting.clear()
                self._fail(stranded, err)
                rows = None
                continue
            if joining:
                with self._ready:
                    self.batches += 1
                    self.rows += len(joining)
                try:
                    rows = self._join(rows, joining)
                except Exception:  # noqa: BLE001 - one by one: only the request that fails is told
                    for job in joining:
                        try:
                            rows = self._join(rows, [job])
                        except Exception as err:  # noqa: BLE001 - this request's own failure; the others go on
                            self._fail([job], err)
            if rows is not None:
                with self._ready:
                    self.largest_batch = max(self.largest_batch, len(rows.jobs))
                try:
                    rows = self._step(rows)
                except Exception as err:  # noqa: BLE001 - every running row is told, the worker goes on
                    self._fail(rows.jobs, err)
                    rows = None

    def _fail(self, jobs: list[Job], err: Exception) -> None:
        for job in jobs:
            if not job.done:
                job.done = True
                job.events.put(("error", err))

    # -- continuous batching ------------------------------------------------------------------

    @staticmethod
    def _pick(logits: torch.Tensor, jobs: list[Job]) -> torch.Tensor:
        """Each row's next token under its own settings: greedy, or sampled after transformers'
        own warpers in the order ``generate`` applies them, from the row's own random generator
        when it names a seed."""
        tokens = logits.argmax(-1)
        sampled = [r for r, job in enumerate(jobs) if job.config.do_sample]
        if not sampled:
            return tokens
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        none = torch.empty((1, 0), dtype=torch.long, device=logits.device)
        for r in sampled:
            config, scores = jobs[r].config, logits[r:r + 1].float()
            if config.temperature is not None and config.temperature != 1.0:
                scores = TemperatureLogitsWarper(config.temperature)(none, scores)
            if config.top_k is not None and config.top_k != 0:
                scores = TopKLogitsWarper(config.top_k)(none, scores)
            if config.top_p is not None and config.top_p < 1.0:
                scores = TopPLogitsWarper(config.top_p)(none, scores)
            tokens[r] = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=jobs[r].rng)[0, 0]
        return tokens

    def _join(self, rows: Rows | None, jobs: list[Job]) -> Rows | None:
        """Prefills ``jobs``, takes each one's first token and merges them into ``rows``. A job
        whose prompt starts with a cached prefix (a conversation's next turn, a new question
        about a video) prefills only what follows it; the others are prefilled together."""
        generator = self.generator
        llm = generator.model.language_model
        groups: list[Rows] = []
        fresh = []
        with generator._lock, torch.no_grad():
            for job in jobs:
                if job.seed is not None:
                    job.rng = torch.Generator(device=generator.device).manual_seed(job.seed)
                hit = generator.cached_prefix(job.prompt, take=True)
                if hit is None:
                    fresh.append(job)
                    continue
                cache, shared = hit
                ids = job.prompt.input_ids
                positions = torch.arange(shared, len(ids), device=generator.device)[None]
                out = llm(input_ids=torch.tensor([ids[shared:]], device=generator.device),
                          attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=generator.device),
                          position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
                groups.append(Rows([job], out.cache, torch.ones((1, len(ids)), dtype=torch.long,
                                                                          device=generator.device),
                                   positions[:, -1] + 1, self._pick(out.logits[:, -1], [job])))
            if fresh:
                embeds, mask = generator.embed([job.prompt for job in fresh])
                out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                          cache=_new_cache(), use_cache=True, logits_to_keep=1)
                groups.append(Rows(fresh, out.cache, mask, mask.sum(-1), self._pick(out.logits[:, -1], fresh)))
        first = len(rows.jobs) if rows is not None else 0
        for group in groups:
            rows = group.merged_into(rows)
        return self._keep(rows, torch.cat([group.last for group in groups]), first=first)

    def _step(self, rows: Rows) -> Rows | None:
        """One token for every running row."""
        generator = self.generator
        llm = generator.model.language_model
        mask = torch.cat([rows.mask, rows.mask.new_ones((len(rows.jobs), 1))], dim=1)
        with generator._lock, torch.no_grad():
            out = llm(input_ids=rows.last[:, None], attention_mask=mask, position_ids=rows.positions[:, None],
                      cache=rows.cache, use_cache=True)
            tokens = self._pick(out.logits[:, -1], rows.jobs)
        rows.mask, rows.positions, rows.last = mask, rows.positions + 1, tokens
        return self._keep(rows, tokens)

    def _keep(self, rows: Rows, tokens: torch.Tensor, first: int = 0) -> Rows | None:
        """Hands each row from ``first`` on its new token (``tokens``: theirs), finishes the rows that stop, puts
        their KV caches into the prefix cache and returns the rows that decode on (``None``: none)."""
        stop_ids = set(self.generator.stop_ids)
        for job, token in zip(rows.jobs[first:], tokens.tolist(), strict=True):
            if job.finish is not None:
                continue
            if token in stop_ids:
                job.finish = "stop"
                continue
            job.tokens.append(token)
            if job.stream:
                self._stream(job)
            if len(job.tokens) >= job.max_new_tokens:
                job.finish = "length"
        for job in rows.jobs:  # every row, those that got no token at this join too
            if job.finish is None and (job.cancel.is_set() or job.expired()):
                job.finish = "cancelled" if job.cancel.is_set() else "timeout"
        ended = [r for r, job in enumerate(rows.jobs) if job.finish is not None]
        if not ended:
            return rows
        if self.generator.cache is not None:
            for r in ended:
                self._keep_cache(rows, r)
        for job in (rows.jobs[r] for r in ended):  # the cache first: the next turn may come at once
            self._finish(job, job.finish)
        return rows.without(ended)

    def _keep_cache(self, rows: Rows, r: int) -> None:
        """Puts row ``r``'s KV cache (its prompt and the reply tokens fed so far) into the prefix cache."""
        job = rows.jobs[r]
        held = int(rows.mask[r].sum())
        layer = rows.cache.layers[0]
        size = 2 * held * len(rows.cache.layers) * layer.keys[0, :, 0].numel() * layer.keys.element_size()
        if size > self.generator.cache.budget:  # it would not be kept: no copy made
            return
        prompt = job.prompt.input_ids
        tokens = prompt + job.tokens[:max(0, held - len(prompt))]
        length = rows.mask.shape[1]
        layers = [(layer.keys[r:r + 1, :, length - held:].clone(), layer.values[r:r + 1, :, length - held:].clone())
                  for layer in rows.cache.layers]
        self.generator.cache.put(job.prompt.media_key, tokens, _new_cache(layers))

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
        job.finish = job.finish or reason
        text = self.generator.tokenizer.decode(job.tokens, skip_special_tokens=True)
        if len(text) > len(job.sent):
            job.events.put(("piece", text[len(job.sent):]))
            job.sent = text
        job.events.put(("done", Reply(text.strip(), list(job.tokens), job.finish, len(job.prompt.input_ids))))
        job.done = True  # only now: a failure above leaves the job to _fail
