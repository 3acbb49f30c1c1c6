"""``kangaroo chat``: a multi-round conversation about one video (or image) in the terminal.

Each round re-encodes the whole conversation (the media in its first user turn), prefills it
once and streams the reply. Commands inside a session: ``/video PATH`` (or ``/image PATH``)
starts a new conversation about another file (one media item per conversation, as in
training), ``/reset`` clears the conversation, ``/quit`` ends the session. A missing, corrupt
or audio-only file is a one-line error and the session goes on. ``--history FILE`` keeps the
conversation in a JSON file after every round and resumes it on the next start.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from kangaroo.data.video import MediaError
from kangaroo.inference.generation import Generator

COMMANDS = "/video PATH, /image PATH, /reset, /quit"


@dataclass
class Conversation:
    media: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def load(cls, path: str) -> "Conversation":
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read the chat history {path}: {err}") from err
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ValueError(f"{path} is not a chat history (a JSON object with 'media' and 'messages')")
        return cls(data.get("media"), data["messages"])

    def save(self, path: str) -> None:
        temporary = path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump({"media": self.media, "messages": self.messages}, handle, ensure_ascii=False, indent=1)
        os.replace(temporary, path)


def check_media(path: str) -> str:
    """The path, after checking that it can be read as a video or image (the same decode path a
    prompt takes); raises ``MediaError`` with a one-line reason."""
    from kangaroo.data.encode import read_image
    from kangaroo.data.video import index_video
    from kangaroo.inference.generation import IMAGE_SUFFIXES

    if not os.path.isfile(path):
        raise MediaError(f"missing file: {path}")
    if path.lower().endswith(IMAGE_SUFFIXES):
        read_image(path)
    else:
        index_video(path)  # a corrupt file, or one with no video stream (audio only), fails here
    return path


def answer(generator: Generator, conversation: Conversation, query: str, write: Callable[[str], Any],
           **options: Any) -> str:
    """Asks ``query`` in ``conversation``, streams the reply through ``write`` and records both
    turns. The conversation is unchanged when the prompt cannot be built."""
    messages = conversation.messages + [{"role": "user", "content": query}]
    prompt = generator.prompt(messages, conversation.media)
    pieces = []
    for piece in generator.stream(prompt, **options):
        pieces.append(piece)
        write(piece)
    reply = "".join(pieces).strip()
    conversation.messages = messages + [{"role": "assistant", "content": reply}]
    return reply


def run_chat(generator: Generator, media: str | None, query: str | None = None, history: str | None = None,
             stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr,
             **options: Any) -> int:
    """The ``kangaroo chat`` session; returns its exit code."""
    conversation = Conversation.load(history) if history and os.path.exists(history) else Conversation()
    if media is not None:
        try:
            check_media(media)
        except MediaError as err:
            print(f"kangaroo: error: {err}", file=stderr)
            if query is not None:
                return 1
            media = None
        if media is not None and media != conversation.media:
            conversation = Conversation(media)

    def write(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    def ask(text: str) -> bool:
        try:
            answer(generator, conversation, text, write, **options)
        except (MediaError, ValueError) as err:
            print(f"kangaroo: error: {err}", file=stderr)
            return False
        write("\n")
        if history:
            conversation.save(history)
        return True

    if query is not None:
        return 0 if ask(query) else 1
    interactive = stdin.isatty()
    if interactive:
        print(f"chatting about {conversation.media or 'no video'} ({COMMANDS})", file=stderr)
    while True:
        if interactive:
            stdout.write(">>> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            conversation = Conversation(conversation.media)
            print("(conversation cleared)", file=stderr)
            continue
        command, _, argument = text.partition(" ")
        if command in ("/video", "/image"):
            try:
                conversation = Conversation(check_media(os.path.expanduser(argument.strip())))
                print(f"(new conversation about {conversation.media})", file=stderr)
            except MediaError as err:
                print(f"kangaroo: error: {err}", file=stderr)
            continue
        if command.startswith("/") and " " not in command and len(command) > 1 and command[1:].isalpha():
            print(f"kangaroo: error: unknown command {command}; commands: {COMMANDS}", file=stderr)
            continue
        ask(text)
