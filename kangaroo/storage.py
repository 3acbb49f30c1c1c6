"""Paths that are local folders or object-store URLs (``s3://bucket/prefix``), through fsspec.

Every place a path goes (prepared data, checkpoints, stage weights, the recipe workdir and its
state file) takes either. Remote access goes through fsspec (``s3fs`` for ``s3://``, installed
with the ``cloud`` extra), which reads credentials and the endpoint from the standard AWS
environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
``AWS_DEFAULT_REGION``), so S3-compatible stores work as they are.

Local writes go through a temporary name and a rename; an object-store upload appears whole or
not at all. Uploads that matter (checkpoints, stage weights, the state file) and the lookups
around checkpoints are retried with exponential backoff (``with_retries``), on top of the S3
client's own few quick retries: ``KANGAROO_UPLOAD_ATTEMPTS`` tries (default 6),
waiting ``KANGAROO_UPLOAD_BACKOFF`` seconds (default 1) doubled after each failure, so about
half a minute of outage passes unnoticed by default. Past that budget, ``UploadError`` says what
failed and where.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any

log = logging.getLogger(__name__)

ATTEMPTS_ENV = "KANGAROO_UPLOAD_ATTEMPTS"
BACKOFF_ENV = "KANGAROO_UPLOAD_BACKOFF"


class UploadError(OSError):
    """An upload failed on every attempt of its retry budget."""


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def filesystem(path: str):
    """``(fsspec filesystem, path as that filesystem names it)``."""
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(str(path))
    except ImportError as err:  # s3fs missing
        raise ImportError(f"{path}: object-store paths need the cloud extra (pip install 'kangaroo[cloud]'): {err}") from err


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def absolute(path: str) -> str:
    return path if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    fs, name = filesystem(path)
    return fs.exists(name)


def isdir(path: str) -> bool:
    if not is_remote(path):
        return os.path.isdir(path)
    fs, name = filesystem(path)
    return fs.isdir(name)


def remove(path: str) -> None:
    """Removes a file or a folder (recursively); a missing path is not an error."""
    if not is_remote(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        return
    fs, name = filesystem(path)
    if fs.exists(name):
        fs.rm(name, recursive=True)
    fs.invalidate_cache()


def listdir(path: str) -> list[str]:
    """Full paths of the entries of a folder ([] when it does not exist)."""
    if not is_remote(path):
        return [os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path) else []
    fs, name = filesystem(path)
    fs.invalidate_cache()
    if not fs.exists(name):
        return []
    protocol = path.split("://", 1)[0]
    return [f"{protocol}://{p}" for p in fs.ls(name, detail=False) if p.rstrip("/") != name.rstrip("/")]


def find(path: str, suffix: str) -> list[str]:
    """Every file or folder under ``path`` (recursively) whose name ends with ``suffix``."""
    if not is_remote(path):
        import glob

        return glob.glob(os.path.join(glob.escape(path), "**", f"*{suffix}"), recursive=True)
    fs, name = filesystem(path)
    fs.invalidate_cache()
    protocol = path.split("://", 1)[0]
    found = set()
    for entry in fs.find(name, withdirs=True):
        # a folder checkpoint appears through its files: keep the outermost name with the suffix
        parts = entry.split("/")
        for depth in range(len(name.rstrip("/").split("/")), len(parts)):
            if parts[depth].endswith(suffix):
                found.add("/".join(parts[: depth + 1]))
                break
    return [f"{protocol}://{p}" for p in sorted(found)]


def mtime(path: str) -> float:
    if not is_remote(path):
        return os.path.getmtime(path)
    fs, name = filesystem(path)
    if fs.isdir(name):  # a folder's time is its newest file's
        return max((mtime(p) for p in listdir(path)), default=0.0)
    modified = fs.info(name).get("LastModified") or fs.modified(name)
    return modified.timestamp()


@contextlib.contextmanager
def open_file(path: str, mode: str = "rb", **kwargs: Any) -> Iterator[IO]:
    """Opens a local or remote file for reading (writes go through ``write_bytes``/``write_text``
    or ``upload``)."""
    if not is_remote(path):
        with open(path, mode, **kwargs) as handle:
            yield handle
        return
    fs, name = filesystem(path)
    with fs.open(name, mode, **kwargs) as handle:
        yield handle


def read_text(path: str) -> str:
    with open_file(path, "r", encoding="utf-8") as handle:
        return handle.read()


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` whole: locally through a temporary name and a rename, remotely as one
    upload retried with backoff."""
    with local_output(path) as local:
        with open(local, "wb") as handle:
            handle.write(data)


@contextlib.contextmanager
def local_output(path: str, durable: bool = False) -> Iterator[str]:
    """A local file name to write ``path``'s content to. Locally: ``path.<random>.partial``, one per
    writer (processes on several machines may write one shared path at once), renamed to
    ``path`` on success (with ``durable``, synced to disk first). Remotely: a temporary file,
    uploaded with retries on success. A failure leaves ``path`` as it was."""
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="kangaroo-upload-") as scratch:
            local = os.path.join(scratch, posixpath.basename(path))
            yield local
            upload(local, path)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    partial = f"{path}.{uuid.uuid4().hex[:12]}.partial"
    try:
        yield partial
        if durable:
            with open(partial, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(partial, path)
        if durable:
            descriptor = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(descriptor)  # the rename itself reaches the disk
            finally:
                os.close(descriptor)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def upload(local: str, remote: str, attempts: int | None = None, backoff: float | None = None) -> None:
    """Copies a local file or folder to the object store at ``remote`` (retried, see
    ``with_retries``)."""
    if not is_remote(remote):
        raise ValueError(f"upload: {remote} is not an object-store URL")
    fs, name = filesystem(remote)

    def put() -> None:
        if os.path.isdir(local):  # the folder's content into ``remote``, not a folder inside it
            fs.put(local.rstrip("/") + "/", name.rstrip("/") + "/", recursive=True)
        else:
            fs.put(local, name)
        fs.invalidate_cache(name)

    with_retries(put, remote, attempts, backoff)


def download(remote: str, local: str) -> str:
    """Copies ``remote`` (a file or a folder) to ``local`` and returns ``local``."""
    fs, name = filesystem(remote)
    fs.get(name, local, recursive=fs.isdir(name))
    return local


def with_retries(action: Callable[[], Any], target: str, attempts: int | None = None, backoff: float | None = None,
                 what: str = "upload to", sleep: Callable[[float], None] = time.sleep) -> Any:
    """Runs ``action`` (``what`` ``target``) until it succeeds, at most ``attempts`` times,
    waiting ``backoff`` seconds after the first failure and twice as long after each next one.
    Raises ``UploadError`` naming ``target``, the tries, the time spent and the last error."""
    attempts = int(os.environ.get(ATTEMPTS_ENV, 6)) if attempts is None else attempts
    backoff = float(os.environ.get(BACKOFF_ENV, 1.0)) if backoff is None else backoff
    if attempts < 1:
        raise ValueError(f"{ATTEMPTS_ENV} must be at least 1, got {attempts}")
    started, delay = time.monotonic(), backoff
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as err:  # network errors come as many types (OSError, botocore, aiohttp)
            if attempt == attempts:
                raise UploadError(
                    f"{what} {target} failed {attempts} times over {time.monotonic() - started:.0f} s "
                    f"(retry budget: {ATTEMPTS_ENV}={attempts}, {BACKOFF_ENV}={backoff}); last error: "
                    f"{type(err).__name__}: {err}") from err
            log.warning("%s %s failed (attempt %d of %d: %s: %s); retrying in %.1f s",
                        what, target, attempt, attempts, type(err).__name__, err, delay)
            sleep(delay)
            delay *= 2


_CONNECTION_ERRORS = ("EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError",
                      "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError")


def unreachable_store(error: BaseException) -> str | None:
    """A one-line explanation when ``error`` (or an error it came from) means the object store
    could not be reached, else None. Uploads that matter are retried (``with_retries``);
    the client's own lookups around them (listing, existence checks) fail after the client's
    own retries, and both end the run with this line instead of a network traceback."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UploadError) or type(error).__name__ in _CONNECTION_ERRORS:
            endpoint = os.environ.get("AWS_ENDPOINT_URL", "the object store")
            return (f"{endpoint} could not be reached: {error}. Checkpoints written before are intact; "
                    "run the same command again (with --ckpt_path=auto) once the store is back")
        error = error.__cause__ or error.__context__
    return None


def allow_plain_http_endpoints() -> None:
    """Lets LitData's object-store client reach an ``http://`` endpoint (a local S3-compatible
    server, a store inside a private network).

    LitData hands its uploads and async chunk reads to obstore, whose client refuses any
    plain-http URL unless ``allow_http`` is among its client options ("HTTP error: builder
    error"); LitData builds those options from one module-level mapping that lacks it. Adding
    the key to that mapping is the smallest change that fixes this: it only permits what
    ``AWS_ENDPOINT_URL`` asks for, and https endpoints are unaffected. Runs when
    ``kangaroo.data`` is imported, so LitData's spawned workers get it too.
    """
    try:
        from litdata.streaming import downloader
    except ImportError:  # pragma: no cover - litdata is a dependency
        return
    options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
    if isinstance(options, dict):
        options.setdefault("allow_http", True)
