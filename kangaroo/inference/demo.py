"""``kangaroo demo``: a web chat page about a video (Streamlit, as the released demo used).

Upload a video (or pick one of ``--examples``), watch it, ask in English or Chinese over several
rounds, regenerate the last answer or reset. It calls the same ``Generator`` as ``kangaroo chat``
and ``kangaroo serve``. It never runs a shell command and never fetches a URL a user typed (the
released demo ran ``wget`` on user input): a video comes only as an upload, limited in size by
Streamlit's ``server.maxUploadSize``, written into a private temporary folder (mode 0700) per
browser session, emptied when the video is replaced and removed when the server stops.

``kangaroo demo`` starts ``streamlit run`` on this file; Streamlit runs the file top to bottom on
every interaction, so the page state lives in ``st.session_state`` and the model is loaded once
per server (``st.cache_resource``).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import subprocess
import sys
import tempfile

VIDEO_TYPES = ["mp4", "webm", "mov", "mkv", "avi"]
IMAGE_TYPES = ["png", "jpg", "jpeg", "webp"]


def launch(model: str, host: str, port: int, max_upload_mb: int, examples: str | None,
           temperature: float | None = None, device: str = "cpu", dtype: str | None = None, headless: bool = True) -> int:
    """Runs the page with Streamlit's own server (its CLI, as Streamlit documents)."""
    command = [sys.executable, "-m", "streamlit", "run", os.path.abspath(__file__),
               "--server.address", host, "--server.port", str(port), "--server.maxUploadSize", str(max_upload_mb),
               "--server.headless", str(headless).lower(), "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none", "--global.developmentMode", "false",
               "--client.toolbarMode", "minimal",
               "--", "--model", model]
    if examples:
        command += ["--examples", examples]
    if temperature is not None:
        command += ["--temperature", str(temperature)]
    command += ["--device", device] + (["--dtype", dtype] if dtype else [])
    return subprocess.call(command)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--examples")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype")
    return parser.parse_args(sys.argv[1:])


def page() -> None:
    import streamlit as st

    from kangaroo.data.video import MediaError
    from kangaroo.inference import Generator, load_pretrained

    args = _arguments()

    @st.cache_resource
    def generator(folder: str, device: str, dtype: str | None) -> Generator:
        return Generator(load_pretrained(folder, device=device, dtype=dtype))

    st.set_page_config(page_title="Kangaroo", layout="wide")
    st.title("Kangaroo")
    model = generator(args.model, args.device, args.dtype)
    state = st.session_state
    state.setdefault("messages", [])
    state.setdefault("media", None)
    state.setdefault("media_key", None)
    if "scratch" not in state:
        state.scratch = tempfile.mkdtemp(prefix="kangaroo-demo-")  # private to this user, mode 0700
        atexit.register(shutil.rmtree, state.scratch, True)

    left, right = st.columns([2, 3])
    with left:
        upload = st.file_uploader("Upload a video or image", type=VIDEO_TYPES + IMAGE_TYPES)
        examples = sorted(f for f in os.listdir(args.examples) if f.rsplit(".", 1)[-1].lower() in VIDEO_TYPES) \
            if args.examples and os.path.isdir(args.examples) else []
        picked = st.selectbox("or pick an example", ["-"] + examples) if examples else "-"
        key = (upload.file_id if upload is not None else None) or (picked if picked != "-" else None)
        if key != state.media_key:  # a new video: a new conversation about it
            state.messages, state.media_key = [], key
            for name in os.listdir(state.scratch):
                os.remove(os.path.join(state.scratch, name))
            if upload is not None:
                suffix = os.path.splitext(upload.name)[1].lower()
                path = os.path.join(state.scratch, f"upload{suffix}")
                with open(path, "wb") as handle:
                    handle.write(upload.getbuffer())
                state.media = path
            elif picked != "-":
                state.media = os.path.join(args.examples, picked)
            else:
                state.media = None
        if state.media is not None:
            if state.media.rsplit(".", 1)[-1].lower() in IMAGE_TYPES:
                st.image(state.media)
            else:
                st.video(state.media)
        regenerate = st.button("Regenerate", disabled=not state.messages)
        if st.button("Reset"):
            state.messages = []
            st.rerun()

    question = st.chat_input("Ask about the video (English or 中文)")  # pinned to the page's foot
    with right:
        # the last round leaves the history before it is drawn: drawn first, it showed twice (old and new)
        if regenerate and state.messages and state.messages[-1]["role"] == "assistant":
            state.messages.pop()
            question = state.messages.pop()["content"]
        for message in state.messages:
            with st.chat_message(message["role"]):
                st.markdown(message["content"])
        if question:
            state.messages.append({"role": "user", "content": question})
            with st.chat_message("user"):
                st.markdown(question)
            with st.chat_message("assistant"):
                try:
                    prompt = model.prompt(state.messages, state.media)
                    options = {"temperature": args.temperature}
                    if regenerate:  # a fresh draw (the same answer when decoding greedily)
                        options["seed"] = int.from_bytes(os.urandom(4), "little")
                    answer = st.write_stream(model.stream(prompt, **options))
                except (MediaError, ValueError) as err:
                    state.messages.pop()
                    st.error(f"{err}")
                else:
                    state.messages.append({"role": "assistant", "content": (answer or "").strip()})


if __name__ == "__main__":
    page()
