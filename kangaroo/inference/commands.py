"""Entries of the ``kangaroo`` command that use a model folder: ``export``, ``chat``, ``serve`` and
``demo``.

Typed functions that ``kangaroo.cli`` registers through jsonargparse (flags, ``--help``,
``--config`` and ``--print_config`` from the signature and docstring); each returns the exit code.
"""

from __future__ import annotations

import os
import sys

# The arguments chat, serve and demo share, documented once: each command's docstring (what
# jsonargparse shows as its --help) names them by a placeholder that _shared_args fills in.
_SHARED_ARGS = {
    "{served model}": """model: a model folder (kangaroo export, or a recipe's last stage)
        device: cpu, cuda, cuda:1, ...
        dtype: cast the weights, e.g. bfloat16 on a GPU (default: as stored)""",
    "{listening}": """host: 127.0.0.1 is this machine only
        port: the port to listen on""",
}


def _shared_args(function):
    for placeholder, text in _SHARED_ARGS.items() if function.__doc__ else ():  # no docstrings under -OO
        function.__doc__ = function.__doc__.replace(placeholder, text)
    return function


def load_generator(model: str, device: str = "cpu", dtype: str | None = None, cache_mb: float = 1024.0):
    """A ``Generator`` on the model folder ``model``, what was loaded said on stderr."""
    from kangaroo.inference import Generator, load_pretrained

    loaded = load_pretrained(model, device=device, dtype=dtype)
    print(loaded.describe(), file=sys.stderr, flush=True)
    return Generator(loaded, cache_mb=cache_mb)


def export(source: str, *, output: str, stage: str | None = None, overwrite: bool = False,
           keep_adapters: bool = False) -> int:
    """Write a self-contained model folder from a stage or checkpoint.

    Writes config, safetensors weights, tokenizer with chat template, preprocessing and generation
    defaults into --output.

    Args:
        source: a stage folder, a checkpoint file or a sharded checkpoint folder
        output: the model folder to write
        stage: the stage file that trained it (default: the stage folder's stage.yaml)
        overwrite: replace a non-empty output folder
        keep_adapters: for a stage that trained LoRA adapters, write its base weights and its
            adapters apart (adapters.safetensors, loaded by chat, serve and eval) instead of merged
    """
    from kangaroo.inference.folder import export_model

    print(f"model folder written to {export_model(source, output, stage, overwrite, keep_adapters)}")
    return 0


def import_model(source: str, *, layout: str, output: str | None = None, architecture: str | None = None,
                 tokenizer: str | None = None, stage: str | None = None, dry_run: bool = False,
                 overwrite: bool = False) -> int:
    """Convert a checkpoint of another layout into a model folder, through a key map.

    Prints which source keys no rule takes, which model keys no source key gives, shape
    mismatches and the assumptions of the map it used; exits 1 when any key does not fit.

    Args:
        source: the checkpoint: a folder of safetensors shards (with its tokenizer), a
            safetensors file, or one of this project's checkpoints
        layout: a shipped key map (kangaroo-released, kangaroo) or the path of one (YAML)
        output: the model folder to write
        architecture: the model size it holds (default: the layout's)
        tokenizer: where the tokenizer is (default: the stage file's, or the source folder's)
        stage: a stage file whose model.architecture and data.prepare describe the checkpoint
        dry_run: only print the report; write nothing
        overwrite: replace a non-empty output folder
    """
    from kangaroo.inference.importing import import_checkpoint

    plan = import_checkpoint(source, layout, output, architecture, tokenizer, stage, dry_run, overwrite)
    print(plan.report())
    if not dry_run:
        print(f"model folder written to {output}")
    return 0 if plan.ok else 1


@_shared_args
def chat(*, model: str, device: str = "cpu", dtype: str | None = None, video: str | None = None,
         image: str | None = None, query: str | None = None, cache_mb: float = 1024.0, history: str | None = None,
         max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
         top_k: int | None = None) -> int:
    """Talk to a model folder about a video, tokens streamed.

    Interactive unless --query is given. Inside a session: /video PATH, /image PATH, /reset, /quit.

    Args:
        {served model}
        video: the video to talk about
        image: an image instead
        query: ask this, print the answer and exit
        cache_mb: memory for the decoded frames and prompt KV caches of recent conversations, so that a
            next question about a video prefills only what is new (0: off)
        history: a JSON file that keeps the conversation; resumed when it exists
        max_new_tokens: default: the model folder's
        temperature: 0 decodes greedily (default: the model folder's)
        top_p: nucleus sampling (default: the model folder's)
        top_k: top-k sampling (default: the model folder's)
    """
    from kangaroo.inference.chat import run_chat

    if video and image:
        raise ValueError("give --video or --image, not both")
    generator = load_generator(model, device, dtype, cache_mb)
    return run_chat(generator, video or image, query, history, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, top_k=top_k)


@_shared_args
def serve(*, model: str, device: str = "cpu", dtype: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          served_model_name: str | None = None, allowed_media_root: list[str] | None = None,
          allow_remote_media: bool = False, allow_media_host: list[str] | None = None, max_media_mb: float = 64.0,
          max_frames: int | None = None, max_tokens: int | None = None, request_timeout: float = 300.0,
          cache_mb: float = 1024.0, max_batch: int = 8, max_batch_tokens: int = 65536, batch_wait_ms: float = 100.0,
          log_level: str = "info") -> int:
    """Serve a model folder over the OpenAI chat completions API.

    POST /v1/chat/completions (text, image_url and video_url parts, stream: true) and GET
    /v1/models, on FastAPI + uvicorn.

    Args:
        {served model}
        {listening}
        served_model_name: the model id clients name (default: the folder's name)
        allowed_media_root: folders whose files requests may name by path (repeatable; default: none)
        allow_remote_media: fetch http(s) media URLs
        allow_media_host: with --allow_remote_media: hosts, addresses or networks (10.0.0.0/8) media may
            come from although they are loopback, link-local or private (repeatable; default: none)
        max_media_mb: largest media file or data: URL
        max_frames: most frames a request may ask for (default: the folder's sampling maximum)
        max_tokens: most new tokens a request may ask for (default: the folder's max_new_tokens); more is a 400
        request_timeout: seconds a request may take from its arrival; then the model is freed and the
            client gets a 408
        cache_mb: memory for the decoded frames and prompt KV caches of recent conversations, so that a
            next question about a video prefills only what is new (0: off)
        max_batch: most requests decoded together
        max_batch_tokens: most tokens the running rows' KV caches may reach: rows x (cache length + most
            new tokens a row may still decode)
        batch_wait_ms: how long a batch with room waits for requests still being read or decoded (0:
            never; nothing waits when no request is on its way)
        log_level: uvicorn's log level
    """
    import uvicorn

    if batch_wait_ms < 0:
        raise ValueError(f"--batch_wait_ms must be 0 or more, got {batch_wait_ms:g}")

    from kangaroo.inference.server import ServeConfig, create_app

    generator = load_generator(model, device, dtype, cache_mb)
    name = served_model_name or os.path.basename(os.path.abspath(model).rstrip("/"))
    config = ServeConfig(name, [os.path.abspath(root) for root in allowed_media_root or []], allow_remote_media,
                         int(max_media_mb * 2**20), max_frames, max_tokens, request_timeout, max_batch,
                         max_batch_tokens, list(allow_media_host or []), batch_wait_ms / 1000)
    print(f"serving {model} as {name!r} on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(create_app(generator, config), host=host, port=port, log_level=log_level)
    return 0


@_shared_args
def demo(*, model: str, device: str = "cpu", dtype: str | None = None, host: str = "127.0.0.1", port: int = 8501,
         max_upload_mb: int = 200, examples: str | None = None, temperature: float | None = None) -> int:
    """A web chat page about a video (Streamlit).

    Upload or pick a video, watch it, ask over several rounds; regenerate and reset. Never fetches
    a URL and never runs a shell command.

    Args:
        {served model}
        {listening}
        max_upload_mb: largest upload
        examples: a folder of videos offered to pick from
        temperature: 0 decodes greedily (default: the model folder's)
    """
    from kangaroo.inference.demo import launch

    if not os.path.isdir(model):
        raise ValueError(f"no model folder at {model}")
    return launch(os.path.abspath(model), host, port, max_upload_mb, examples, temperature, device, dtype)
