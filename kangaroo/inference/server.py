"""``kangaroo serve``: the OpenAI chat completions API over a model folder (FastAPI + uvicorn).

``GET /v1/models`` and ``POST /v1/chat/completions`` with ``text``, ``image_url`` and
``video_url`` content parts. A media URL is a ``data:`` URL (decoded into a private temporary
folder, deleted after the request), a local path (or ``file://`` URL) under an allowed media
root, or, only with ``allow_remote_media``, an ``http(s)`` URL whose host, and every host it
redirects to, resolves to public addresses (loopback, link-local and private ones only where
``allowed_media_hosts`` names them). ``stream: true`` answers with server-sent events in
OpenAI's chunk format. Requests are decoded together by continuous batching
(``kangaroo.inference.batching``: a request joins the rows being decoded at the next step and
leaves them when it stops, up to ``max_batch`` rows and ``max_batch_tokens``); a client that
goes away stops its own row at the next token. ``GET /health`` reports the queue, the rows
joined and the prefix cache. Each request is bounded: ``max_tokens`` by
the server's cap (a 400 past it) and its time by a deadline (a 408, or an error event when
streaming, and the model freed).

Every error is a 4xx or 5xx JSON body in OpenAI's shape, ``{"error": {"message", "type",
"param", "code"}}``, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from fastapi import Request  # at module level: FastAPI reads the handlers' annotations by name

from kangaroo.data.video import MediaError
from kangaroo.inference.batching import BatchScheduler, Job
from kangaroo.inference.generation import Generator, Reply

MEDIA_SUFFIXES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-matroska": ".mkv",
                  "video/avi": ".avi", "video/x-msvideo": ".avi", "image/png": ".png", "image/jpeg": ".jpg",
                  "image/webp": ".webp", "image/gif": ".gif", "image/bmp": ".bmp"}


class RequestError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ServeConfig:
    model_name: str
    allowed_media_roots: list[str] = field(default_factory=list)
    allow_remote_media: bool = False
    max_media_bytes: int = 64 * 2**20
    max_frames: int | None = None
    """The most frames a request may ask for (``video_url.num_frames``); default: the model
    folder's sampling maximum."""
    max_tokens: int | None = None
    """The most new tokens a request may ask for (``max_tokens``; more is a 400); default: the
    model folder's ``max_new_tokens``. Bounds each request's KV cache."""
    request_timeout_s: float = 300.0
    """A request's deadline from its arrival: waiting for the model and decoding stop there, the
    model is freed and the client gets a 408 (an error event when streaming)."""
    max_batch: int = 8
    """The most requests decoded together (``kangaroo.inference.batching``)."""
    max_batch_tokens: int = 65536
    """The most tokens the running rows' KV caches may reach: rows x (cache length + most new
    tokens a row may still decode)."""
    allowed_media_hosts: list[str] = field(default_factory=list)
    """Hosts (names, addresses or networks such as ``10.0.0.0/8``) that remote media may come from
    although they are loopback, link-local or private; others of those kinds are refused."""
    batch_wait_s: float = 0.1
    """How long a batch with room waits for requests still being read or decoded."""


class MediaStore:
    """Where a request's media become local files: a private folder per request."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.roots = [os.path.realpath(root) for root in config.allowed_media_roots]
        self.hosts, self.networks = set(), []
        for entry in config.allowed_media_hosts:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.lower())

    def resolve(self, url: str, scratch: str, kind: str) -> str:
        if not isinstance(url, str) or not url:
            raise RequestError(400, f"{kind}.url must be a non-empty string", f"{kind}.url")
        if url.startswith("data:"):
            return self._data_url(url, scratch, kind)
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme in ("http", "https"):
            if not self.config.allow_remote_media:
                raise RequestError(400, f"remote media URLs are not fetched by this server ({url}); send a data: URL, "
                                        "or start it with --allow-remote-media", f"{kind}.url", "remote_media_disabled")
            return self._fetch(url, scratch, kind)
        if parsed.scheme not in ("", "file"):
            raise RequestError(400, f"unsupported media URL scheme {parsed.scheme!r}", f"{kind}.url")
        path = urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else url
        if ".." in path.replace("\\", "/").split("/"):
            raise RequestError(400, f"media path {path!r} contains '..'", f"{kind}.url", "path_not_allowed")
        real = os.path.realpath(path)
        if not any(os.path.commonpath([real, root]) == root for root in self.roots):
            raise RequestError(403, f"media path {path!r} is outside the allowed media roots"
                                    + ("" if self.roots else " (the server allows none: --allowed-media-root)"),
                               f"{kind}.url", "path_not_allowed")
        if not os.path.isfile(real):
            raise RequestError(400, f"missing file: {path}", f"{kind}.url", "media_not_found")
        if os.path.getsize(real) > self.config.max_media_bytes:
            raise RequestError(413, f"media file {path!r} is larger than {self.config.max_media_bytes} bytes",
                               f"{kind}.url", "media_too_large")
        return real

    def _data_url(self, url: str, scratch: str, kind: str) -> str:
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise RequestError(400, "a data: URL must be base64 (data:<type>;base64,<data>)", f"{kind}.url")
        if len(payload) * 3 // 4 > self.config.max_media_bytes:
            raise RequestError(413, f"data: URL larger than {self.config.max_media_bytes} bytes", f"{kind}.url",
                               "media_too_large")
        mime = header[5:].split(";")[0].lower()
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "the data: URL is not valid base64", f"{kind}.url") from None
        suffix = MEDIA_SUFFIXES.get(mime, ".png" if kind == "image_url" else ".mp4")
        path = os.path.join(scratch, f"media{suffix}")
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    def check_host(self, url: str, kind: str) -> None:
        """Refuses (403) a remote media URL whose host resolves to a loopback, link-local, private
        or otherwise non-public address, unless ``allowed_media_hosts`` names the host or a network
        holding the address: the server must not become a way into the network it runs in."""
        parsed = urllib.parse.urlparse(url)
        host = (parsed.hostname or "").lower()
        if parsed.scheme not in ("http", "https") or not host:
            raise RequestError(400, f"media URL {url!r} is not an http(s) URL with a host", f"{kind}.url")
        if host in self.hosts:
            return
        try:
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            addresses = {ipaddress.ip_address(info[4][0].split("%")[0])
                         for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        except (OSError, ValueError) as err:
            raise RequestError(400, f"could not resolve the media host {host!r}: {err}", f"{kind}.url",
                               "media_not_found") from None
        for address in addresses:
            if address.is_global and not address.is_multicast:
                continue
            if any(address in network for network in self.networks):
                continue
            raise RequestError(403, f"media host {host!r} resolves to {address}, a non-public address; the server "
                                    "fetches from those only where --allow-media-host names them", f"{kind}.url",
                               "media_host_not_allowed")

    def _fetch(self, url: str, scratch: str, kind: str) -> str:
        suffix = os.path.splitext(urllib.parse.urlparse(url).path)[1] or (".png" if kind == "image_url" else ".mp4")
        path = os.path.join(scratch, f"media{suffix}")
        limit = self.config.max_media_bytes
        store = self

        class CheckedRedirects(urllib.request.HTTPRedirectHandler):
            # urllib follows redirects (at most 10); each new location is checked like the first
            def redirect_request(self, req, fp, code, msg, headers, newurl):
                store.check_host(urllib.parse.urljoin(req.full_url, newurl), kind)
                return super().redirect_request(req, fp, code, msg, headers, newurl)

        self.check_host(url, kind)
        opener = urllib.request.build_opener(CheckedRedirects)
        try:
            with opener.open(url, timeout=30) as response, open(path, "wb") as handle:
                received = 0
                while chunk := response.read(1 << 16):
                    received += len(chunk)
                    if received > limit:
                        raise RequestError(413, f"remote media larger than {limit} bytes", f"{kind}.url",
                                           "media_too_large")
                    handle.write(chunk)
        except OSError as err:
            raise RequestError(400, f"could not fetch {url}: {err}", f"{kind}.url", "media_not_found") from None
        return path


def parse_messages(body: dict[str, Any], media: MediaStore, scratch: str, max_frames: int) -> tuple[list[dict], str | None, int | None]:
    """``(messages, media path, frames asked for)`` of a request: text parts joined, the media
    item marked where it stood (``<video>``/``<image>``)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list", "messages")
    out, path, frames = [], None, None
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(400, f"{where}.role must be system, user or assistant", f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise RequestError(400, f"{where}.content must be a string or a list of parts", f"{where}.content")
        text = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text.append(str(part.get("text", "")))
            elif kind in ("image_url", "video_url"):
                if path is not None:
                    raise RequestError(400, "one image or video per conversation", f"{where}.content")
                if message["role"] != "user":
                    raise RequestError(400, "media belong in a user message", f"{where}.content")
                spec = part.get(kind)
                spec = {"url": spec} if isinstance(spec, str) else spec
                if not isinstance(spec, dict):
                    raise RequestError(400, f"{kind} must be an object with a url", f"{where}.content")
                asked = spec.get("num_frames")
                if asked is not None:
                    if not isinstance(asked, int) or asked < 1:
                        raise RequestError(400, "num_frames must be a positive integer", f"{kind}.num_frames")
                    if asked > max_frames:
                        raise RequestError(400, f"{asked} frames asked for; this model's budget is {max_frames}",
                                           f"{kind}.num_frames", "too_many_frames")
                    frames = asked
                path = media.resolve(spec.get("url"), scratch, kind)
                text.append("<image>" if kind == "image_url" else "<video>")
            else:
                raise RequestError(400, f"unknown content part type {kind!r} (text, image_url, video_url)",
                                   f"{where}.content")
        out.append({"role": message["role"], "content": "\n".join(text)})
    if out[-1]["role"] != "user":
        raise RequestError(400, "the last message must be the user's", "messages")
    return out, path, frames


def sampling_options(body: dict[str, Any], max_tokens: int | None = None) -> dict[str, Any]:
    """The generation options a request asks for; ``max_tokens`` is the server's cap (a request
    asking for more is refused; one that names none gets at most the cap)."""
    options: dict[str, Any] = {}
    for name, key, kind in (("temperature", "temperature", (int, float)), ("top_p", "top_p", (int, float)),
                            ("max_tokens", "max_new_tokens", int), ("max_completion_tokens", "max_new_tokens", int),
                            ("seed", "seed", int)):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise RequestError(400, f"{name} must be a number", name)
        options[key] = value
    if options.get("max_new_tokens", 1) < 1:
        raise RequestError(400, "max_tokens must be positive", "max_tokens")
    if max_tokens is not None:
        if options.get("max_new_tokens", 0) > max_tokens:
            raise RequestError(400, f"max_tokens {options['max_new_tokens']} is over this server's limit of {max_tokens} "
                                    "(kangaroo serve --max-tokens)", "max_tokens", "max_tokens_too_large")
        options.setdefault("max_new_tokens", max_tokens)
    if not 0 <= options.get("temperature", 0) <= 2 or not 0 < options.get("top_p", 1) <= 1:
        raise RequestError(400, "temperature must lie in [0, 2] and top_p in (0, 1]", "temperature")
    if body.get("n", 1) != 1:
        raise RequestError(400, "n must be 1", "n")
    return options


def stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise RequestError(400, "stop must be a string or a list of at most 4 strings", "stop")
    return stops


class StopFilter:
    """Text pieces as they come, cut at the first stop string (which is not returned): the tail
    that may begin a stop string is held back until it is known not to."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.buffer, self.stopped = stops, "", False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.buffer += piece
        hits = [self.buffer.find(s) for s in self.stops if s in self.buffer]
        if hits:
            self.stopped = True
            out, self.buffer = self.buffer[:min(hits)], ""
            return out
        cut = max(0, len(self.buffer) - self.hold) if self.stops else len(self.buffer)
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


def create_app(generator: Generator, config: ServeConfig):
    """The FastAPI application (``kangaroo serve`` runs it with uvicorn)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="kangaroo", docs_url=None, redoc_url=None)
    store = MediaStore(config)
    sampling = generator.encoder.prepare.sampling
    max_frames = config.max_frames or max(sampling.max_frames, sampling.num_frames)
    max_tokens = config.max_tokens or generator.defaults.max_new_tokens
    scheduler = BatchScheduler(generator, config.max_batch, config.max_batch_tokens, max_wait_s=config.batch_wait_s)
    started = int(time.time())

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError):  # noqa: ARG001 - FastAPI's signature
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(404)
    async def not_found(request: Request, err):  # noqa: ARG001
        return JSONResponse(RequestError(404, f"no route {request.url.path}").body(), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request: Request, err):  # noqa: ARG001
        return JSONResponse(RequestError(405, f"method {request.method} not allowed on {request.url.path}").body(),
                            status_code=405)

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception):  # noqa: ARG001
        return JSONResponse(RequestError(500, f"the server failed on this request: {type(err).__name__}: {err}",
                                         kind="server_error").body(), status_code=500)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": started,
                                            "owned_by": "kangaroo"}]}

    @app.get("/health")
    async def health():
        cache = generator.cache.stats() if generator.cache is not None else None
        return {"status": "ok", **scheduler.stats(), "prefix_cache": cache}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        # Arriving until it is queued: a batch being formed waits for it (see BatchScheduler.arriving).
        with scheduler.arriving():
            deadline = time.monotonic() + config.request_timeout_s
            limit = config.max_media_bytes * 4 // 3 + 2**20  # a data: URL of the largest media item, and text
            if int(request.headers.get("content-length") or 0) > limit:
                raise RequestError(413, f"request body larger than the media limit ({config.max_media_bytes} bytes)",
                                   code="request_too_large")
            raw = bytearray()
            async for piece in request.stream():  # a body without a length is bounded too
                raw += piece
                if len(raw) > limit:
                    raise RequestError(413, f"request body larger than the media limit ({config.max_media_bytes} bytes)",
                                       code="request_too_large")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise RequestError(400, f"the request body is not valid JSON: {err}") from None
            if not isinstance(body, dict):
                raise RequestError(400, "the request body must be a JSON object")
            if body.get("model") != config.model_name:
                raise RequestError(404, f"the model {body.get('model')!r} does not exist; this server has "
                                        f"{config.model_name!r}", "model", "model_not_found")
            options = sampling_options(body, max_tokens)
            options["deadline"] = deadline
            stops = stop_strings(body)
            stream_options = body.get("stream_options") or {}
            if not isinstance(stream_options, dict):
                raise RequestError(400, "stream_options must be an object", "stream_options")
            # media decoded, fetched and turned into frames away from the event loop
            prompt = await run_in_threadpool(_prompt, generator, store, body, max_frames)
            cancel = threading.Event()
            job = scheduler.submit(prompt, cancel=cancel, stream=bool(body.get("stream")) or bool(stops), **options)
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        if body.get("stream"):
            # the row is cancelled once the response ends, also when its body never started (a
            # client gone before the first event): after a whole reply this changes nothing
            return StreamingResponse(_events(job, prompt, stops, ident, config.model_name,
                                             bool(stream_options.get("include_usage")), request,
                                             config.request_timeout_s),
                                     media_type="text/event-stream", background=BackgroundTask(job.cancel.set))
        task = asyncio.ensure_future(run_in_threadpool(_complete, job, prompt, stops))
        while not task.done():
            if await request.is_disconnected():
                cancel.set()  # the client went away: free the model at the next token
                break
            await asyncio.wait({task}, timeout=0.1)
        reply, text, finish = await task
        if reply.finish_reason == "timeout":
            raise _timed_out(config.request_timeout_s, reply)
        return {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": config.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": _usage(reply)}

    return app


def _prompt(generator: Generator, store: MediaStore, body: dict[str, Any], max_frames: int):
    """The request's prompt: its media into a private folder (mode 0700), decoded, and the folder
    removed again."""
    from dataclasses import replace

    scratch = tempfile.mkdtemp(prefix="kangaroo-serve-")
    try:
        messages, media, frames = parse_messages(body, store, scratch, max_frames)
        sampling = None if frames is None else replace(generator.sampling, strategy="uniform", num_frames=frames)
        return generator.prompt(messages, media, sampling=sampling)
    except MediaError as err:
        raise RequestError(400, f"cannot read the media: {err}", code="invalid_media") from None
    except ValueError as err:
        raise RequestError(400, str(err), code="prompt_too_long" if "budget" in str(err) else None) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _complete(job: Job, prompt, stops: list[str]) -> tuple[Reply, str, str]:
    """``(reply, text, finish_reason)`` of a whole completion, cut at the first stop string."""
    if not stops:
        reply = job.result()
        return reply, reply.text, "length" if reply.finish_reason == "length" else "stop"
    cut = StopFilter(stops)
    pieces = []
    stream = job.pieces()
    for piece in stream:
        pieces.append(cut.feed(piece))
        if cut.stopped:
            stream.close()  # this row stops decoding at the next token
            break
    pieces.append(cut.flush())
    text = "".join(pieces).strip()
    reply = job.reply or Reply(text, [], "stop", len(prompt.input_ids))
    return reply, text, "stop" if cut.stopped or reply.finish_reason != "length" else "length"


def _timed_out(seconds: float, reply: Reply) -> RequestError:
    return RequestError(408, f"the request ran past this server's deadline of {seconds:g} s after "
                             f"{len(reply.token_ids)} new tokens; the model was freed (ask for fewer max_tokens, or "
                             "retry when the server is less busy)", code="request_timeout", kind="timeout_error")


def _usage(reply: Reply) -> dict[str, int]:
    completion = len(reply.token_ids)
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": completion,
            "total_tokens": reply.prompt_tokens + completion}


async def _events(job: Job, prompt, stops: list[str], ident: str, model: str,
                  include_usage: bool, request, timeout: float) -> Any:
    """Server-sent events in OpenAI's chunk format; decoding stops when the client goes away. A
    failure after the first event is sent as an event in OpenAI's error shape."""
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        data = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else []}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    cancel = job.cancel
    cut = StopFilter(stops)
    pieces = job.pieces()
    sent, finished = "", False
    try:
        yield chunk({"role": "assistant", "content": ""})  # inside: a client gone at once cancels the row
        async for piece in iterate_in_threadpool(_lead_trimmed(pieces)):
            if await request.is_disconnected():
                return
            text = cut.feed(piece)
            if text:
                sent += text
                yield chunk({"content": text})
            if cut.stopped:
                break
        finished = True
    except Exception as err:  # noqa: BLE001 - reported to the client in the stream itself
        error = RequestError(500, f"generation failed: {type(err).__name__}: {err}", kind="server_error")
        yield f"data: {json.dumps(error.body())}\n\n"
        return
    finally:
        if not finished or cut.stopped:  # the client went away, or a stop string came: stop decoding
            cancel.set()
        await run_in_threadpool(pieces.close)  # a cancelled row stops at the next token; its batch goes on
    tail = cut.flush().rstrip()
    if tail:
        sent += tail
        yield chunk({"content": tail})
    reply = job.reply or Reply(sent, [], "stop", len(prompt.input_ids))
    if reply.finish_reason == "timeout":
        yield f"data: {json.dumps(_timed_out(timeout, reply).body())}\n\n"
        return
    yield chunk({}, "length" if reply.finish_reason == "length" and not cut.stopped else "stop")
    if include_usage:
        yield chunk({}, usage=_usage(reply))
    yield "data: [DONE]\n\n"


def _lead_trimmed(pieces: Iterator[str]) -> Iterator[str]:
    """The pieces with the reply's leading whitespace dropped (as ``Reply.text`` strips it), so
    that the streamed text joins to the non-streamed one; trailing whitespace is held back."""
    started, held = False, ""
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            if not piece:
                continue
            started = True
        piece = held + piece
        stripped = piece.rstrip()
        held = piece[len(stripped):]
        if stripped:
            yield stripped
