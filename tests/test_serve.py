"""``kangaroo serve`` as a real process on 127.0.0.1, talked to with the official ``openai`` client."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from ports import free_port, wait_until_up

openai = pytest.importorskip("openai")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@contextmanager
def serving(folder: Path, *extra: str, settings: Path | None = None):
    """``kangaroo serve`` started as a process; yields ``(base_url, process)``. With ``settings``,
    the flags are first written there by ``--print_config`` and the server starts from
    ``--config settings`` alone."""
    port = free_port()
    flags = ["--model", str(folder), "--port", str(port), "--served-model-name", "kangaroo-test",
             "--log-level", "warning", *extra]
    command = [sys.executable, "-m", "kangaroo.cli", "serve"]
    if settings is not None:
        printed = subprocess.run([*command, *flags, "--print_config"], capture_output=True, text=True, timeout=120)
        assert printed.returncode == 0, printed.stderr[-2000:]
        settings.write_text(printed.stdout)
        flags = ["--config", str(settings)]
    process = subprocess.Popen([*command, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base}/v1/models", process)
        yield base, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def data_url(path: Path, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


QUESTION = ("What colour is the screen?\nA. red\nB. green\nC. blue\nD. yellow\n"
            "Answer with the option's letter from the given choices directly.")


@pytest.fixture(scope="module")
def trained_server(trained_model, tmp_path_factory):
    # started from the YAML that `kangaroo serve ... --print_config` wrote: the same server (its
    # name, media root and size limit are what the tests below rely on)
    settings = tmp_path_factory.mktemp("serve") / "serve.yaml"
    with serving(trained_model.folder, "--allowed-media-root", str(trained_model.val_manifest.parent),
                 "--max-media-mb", "1", settings=settings) as (base, process):
        assert yaml.safe_load(settings.read_text())["allowed_media_root"] == [str(trained_model.val_manifest.parent)]
        yield base, process, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def video_message(url: str, text: str = QUESTION, **video) -> dict:
    return {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url, **video}},
                                        {"type": "text", "text": text}]}


def test_a_video_question_is_answered_right_through_the_openai_client(trained_server, trained_model):
    from trained import COLOURS

    _, _, client = trained_server
    assert [m.id for m in client.models.list().data] == ["kangaroo-test"]
    for colour, clip in trained_model.clips.items():
        expected = "ABCD"[list(COLOURS).index(colour)]
        for url in (data_url(clip), str(clip), f"file://{clip}"):
            reply = client.chat.completions.create(model="kangaroo-test", messages=[video_message(url)],
                                                   temperature=0)
            assert reply.choices[0].message.content == expected, (colour, url[:40])
            assert reply.choices[0].finish_reason == "stop"


def test_two_rounds_streaming_and_usage_match_the_model_run_in_process(trained_server, trained_model):
    from kangaroo.inference import Generator, load_pretrained

    _, _, client = trained_server
    clip = trained_model.clips["blue"]
    messages = [video_message(data_url(clip)), {"role": "assistant", "content": "C"},
                {"role": "user", "content": "Describe the video."}]
    reply = client.chat.completions.create(model="kangaroo-test", messages=messages, temperature=0, max_tokens=24)
    local = Generator(load_pretrained(str(trained_model.folder)))
    prompt = local.prompt([{"role": "user", "content": "<video>\n" + QUESTION}, {"role": "assistant", "content": "C"},
                           {"role": "user", "content": "Describe the video."}], str(clip))
    expected = local.generate([prompt], temperature=0, max_new_tokens=24)[0]
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == len(prompt.input_ids)
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == len(prompt.input_ids) + len(expected.token_ids)

    chunks = list(client.chat.completions.create(model="kangaroo-test", messages=messages, temperature=0,
                                                 max_tokens=24, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    # the same conversation again (OpenAI clients resend it): its prefix came from the cache, the
    # clip was not decoded again, and the reply is the one prefilling everything gives
    health = httpx.get(f"{trained_server[0]}/health", timeout=10).json()["prefix_cache"]
    assert health["hits"] >= 1 and health["frames"] >= 1, health


BAD = [
    ("malformed JSON", b"{not json", 400, None),
    ("unknown model", {"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    ("empty messages", {"model": "kangaroo-test", "messages": []}, 400, None),
    ("outside the root", "/etc/hostname", 403, "path_not_allowed"),
    ("dot dot", "{root}/../../etc/hostname", 400, "path_not_allowed"),
    ("remote URL", "http://127.0.0.1:9/clip.mp4", 400, "remote_media_disabled"),
    ("corrupt video", "data:video/mp4;base64," + base64.b64encode(b"\x00not a video" * 64).decode(), 400,
     "invalid_media"),
    ("oversized data URL", "data:video/mp4;base64," + "A" * (2 * 2**20), 413, "media_too_large"),
    ("too many frames", {"num_frames": 1000}, 400, "too_many_frames"),
]


@pytest.mark.parametrize("what, request_, status, code", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(trained_server, trained_model, what, request_,
                                                                      status, code):
    base, process, client = trained_server
    clip = trained_model.clips["red"]
    if isinstance(request_, bytes):
        response = httpx.post(f"{base}/v1/chat/completions", content=request_,
                              headers={"content-type": "application/json"}, timeout=60)
    else:
        if isinstance(request_, str):
            request_ = {"model": "kangaroo-test", "messages": [video_message(
                request_.format(root=trained_model.val_manifest.parent))]}
        elif "num_frames" in request_:
            request_ = {"model": "kangaroo-test", "messages": [video_message(str(clip), num_frames=1000)]}
        response = httpx.post(f"{base}/v1/chat/completions", json=request_, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code
    assert process.poll() is None
    good = client.chat.completions.create(model="kangaroo-test", messages=[video_message(str(clip))], temperature=0)
    assert good.choices[0].message.content == "A"


def test_a_client_that_goes_away_frees_the_model(random_model_folder, tmp_path):
    """A random model replies at length: a stream closed after two chunks must not keep the model
    decoding its 2,000 tokens; the next request is answered at once."""
    folder, _ = random_model_folder
    with serving(folder, "--max-tokens", "2000") as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError) as refused:  # the cap: a request's KV cache is bounded
            client.chat.completions.create(model="kangaroo-test", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=2001)
        assert refused.value.body["code"] == "max_tokens_too_large" and "2000" in refused.value.body["message"]
        short = client.chat.completions.create(model="kangaroo-test", messages=[{"role": "user", "content": "Hi"}],
                                               temperature=0, max_tokens=20)
        assert short.usage.completion_tokens == 20 and short.choices[0].finish_reason == "length"
        started = time.perf_counter()
        long = client.chat.completions.create(model="kangaroo-test", messages=[{"role": "user", "content": "Hi"}],
                                              temperature=0, max_tokens=400)
        per_token = (time.perf_counter() - started) / 400
        assert long.usage.completion_tokens == 400, "this model decodes long replies: a stream left open would run on"
        stream = client.chat.completions.create(model="kangaroo-test", messages=[{"role": "user", "content": "Hi"}],
                                                temperature=0, max_tokens=2000, stream=True)
        for count, _ in enumerate(stream):
            if count == 2:
                break
        stream.close()
        started = time.perf_counter()
        again = client.chat.completions.create(model="kangaroo-test", messages=[{"role": "user", "content": "Hi"}],
                                               temperature=0, max_tokens=20)
        waited = time.perf_counter() - started
        assert again.choices[0].message.content == short.choices[0].message.content
        # had the closed stream kept the model, this request would wait for ~2,000 tokens first
        assert waited < 500 * per_token, (waited, per_token)

        text = long.choices[0].message.content  # 400 tokens: enough text to stop inside
        assert len(text) >= 8, text
        stopped = client.chat.completions.create(model="kangaroo-test", messages=[{"role": "user", "content": "Hi"}],
                                                 temperature=0, max_tokens=400, stop=[text[5:8]])
        assert stopped.choices[0].message.content == text[:text.find(text[5:8])].strip()
        assert stopped.choices[0].finish_reason == "stop"


def test_a_request_past_its_deadline_is_answered_408_and_frees_the_model(random_model_folder):
    """One client asking for a long reply must not hold the model: at the deadline the decoding
    stops, the client gets OpenAI's error shape (an error event when streaming) and the next
    request is served. The cap defaults to the folder's max_new_tokens."""
    folder, _ = random_model_folder
    hi = [{"role": "user", "content": "Hi"}]
    with serving(folder) as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError, match="limit of 512"):
            client.chat.completions.create(model="kangaroo-test", messages=hi, max_tokens=513)
        capped = client.chat.completions.create(model="kangaroo-test", messages=hi, temperature=0)
        assert capped.usage.completion_tokens <= 512
    with serving(folder, "--max-tokens", "1000000", "--request-timeout", "2") as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        started = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as late:
            client.chat.completions.create(model="kangaroo-test", messages=hi, temperature=0, max_tokens=1000000)
        assert late.value.status_code == 408 and late.value.body["code"] == "request_timeout"
        assert time.perf_counter() - started < 60, "stopped at the deadline, not at a million tokens"
        response = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": "kangaroo-test", "messages": hi, "temperature": 0, "max_tokens": 1000000, "stream": True})
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[-1])["error"]["code"] == "request_timeout", events[-2:]
        assert "[DONE]" not in events
        after = client.chat.completions.create(model="kangaroo-test", messages=hi, temperature=0, max_tokens=3)
        assert after.usage.completion_tokens == 3, "the model was freed"


def test_sixteen_clients_times_four_requests_are_all_answered_and_memory_stays_flat(random_model_folder, tmp_path):
    from conftest import random_video

    folder, _ = random_model_folder
    clip = Path(random_video(tmp_path / "clip.mp4", frames=8))
    with serving(folder, "--allowed-media-root", str(tmp_path)) as (base, process):
        def load() -> list[str]:
            answers: list[str] = []
            errors: list[BaseException] = []

            def client_loop() -> None:
                client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
                for _ in range(4):
                    try:
                        reply = client.chat.completions.create(
                            model="kangaroo-test", messages=[video_message(data_url(clip), "What?")],
                            temperature=0, max_tokens=4)
                        answers.append(reply.choices[0].message.content)
                    except BaseException as err:  # collected and reported below
                        errors.append(err)

            threads = [threading.Thread(target=client_loop) for _ in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=600)
            assert not errors, errors[:3]
            return answers

        first = load()
        after_first = rss_bytes(process.pid)
        second = load()
        after_second = rss_bytes(process.pid)
    assert len(first) == len(second) == 64, "every request answered, none lost"
    assert len(set(first + second)) == 1, "the same greedy answer every time"
    # a request's decoded frames and temporary file kept would add up over 64 requests
    assert after_second < after_first * 1.05, (after_first, after_second)


def test_concurrent_requests_are_batched_and_each_gets_its_one_at_a_time_answer(random_model_folder, tmp_path):
    """Requests that arrive together are decoded together: under greedy decoding each reply equals
    the one it gets alone; a broken video fails its own request; a stream closed mid-batch stops
    its own row while the others finish; the server is free right after."""
    from conftest import random_video

    folder, _ = random_model_folder
    clips = [Path(random_video(tmp_path / f"clip{n}.mp4", frames=n, seed=n)) for n in (4, 8)]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00not a video" * 64)
    questions = [[{"role": "user", "content": "Hi"}],
                 [{"role": "user", "content": "Describe a long afternoon by the river, in detail."}],
                 [video_message(data_url(clips[0]), "What?")],
                 [video_message(data_url(clips[1]), "What colour is the screen?")],
                 [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                  {"role": "user", "content": "C?"}]]
    with serving(folder, "--max-tokens", "2000", "--max-batch", "8") as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(messages, tokens: int = 24):
            return client.chat.completions.create(model="kangaroo-test", messages=messages, temperature=0,
                                                  max_tokens=tokens)

        alone = [ask(q) for q in questions]
        timed = time.perf_counter()
        assert ask(questions[0], tokens=200).usage.completion_tokens == 200, "this model decodes long replies"
        per_token = (time.perf_counter() - timed) / 200
        assert len({a.choices[0].message.content for a in alone}) > 1, "the prompts get different replies"
        before = httpx.get(f"{base}/health", timeout=10).json()
        assert before["largest_batch"] == 1, "one at a time"

        results: dict[str, object] = {}
        start = threading.Barrier(len(questions) + 2)

        def run(name: str, call) -> None:
            start.wait(timeout=60)
            try:
                results[name] = call()
            except BaseException as err:  # compared below
                results[name] = err

        def closed_stream() -> int:
            stream = client.chat.completions.create(model="kangaroo-test", messages=questions[0], temperature=0,
                                                    max_tokens=2000, stream=True)
            for count, _ in enumerate(stream):
                if count == 3:
                    break
            stream.close()
            return count

        calls = {f"q{i}": (lambda q=q: ask(q)) for i, q in enumerate(questions)}
        calls["broken"] = lambda: ask([video_message(data_url(broken), "What?")])
        calls["stream"] = closed_stream
        threads = [threading.Thread(target=run, args=item) for item in calls.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not any(thread.is_alive() for thread in threads), "every request answered in time"
        for i, single in enumerate(alone):
            together = results[f"q{i}"]
            assert not isinstance(together, BaseException), together
            assert together.choices[0].message.content == single.choices[0].message.content, i
            assert together.usage.completion_tokens == single.usage.completion_tokens
        assert isinstance(results["broken"], openai.BadRequestError), results["broken"]
        assert results["stream"] == 3
        stats = httpx.get(f"{base}/health", timeout=10).json()
        assert stats["largest_batch"] >= 2 and stats["waiting"] == 0, stats
        started = time.perf_counter()
        after = ask(questions[0], tokens=4)
        assert after.usage.completion_tokens == 4
        # had the closed stream's row decoded on, this request would wait for ~2,000 tokens first
        assert time.perf_counter() - started < 500 * per_token, (time.perf_counter() - started, per_token)


def test_remote_media_from_loopback_or_private_hosts_is_refused_after_every_redirect(tmp_path):
    """With --allow-remote-media, a URL that resolves to a loopback, link-local or private address,
    first or after a redirect, is refused unless --allow-media-host names it: real HTTP servers
    on 127.0.0.1 and 127.0.0.2, one redirecting to the other."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kangaroo.inference.server import MediaStore, RequestError, ServeConfig

    clip = b"\x00\x00\x00\x18ftypmp42 not really a video"

    def start(host: str, location: str | None = None) -> ThreadingHTTPServer:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path == "/redirect" and location:
                    self.send_response(302)
                    self.send_header("Location", location)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(clip)))
                self.end_headers()
                self.wfile.write(clip)

            def log_message(self, *args):  # quiet
                pass

        server = ThreadingHTTPServer((host, 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    inner = start("127.0.0.2")
    inner_url = f"http://127.0.0.2:{inner.server_port}/clip.mp4"
    outer = start("127.0.0.1", inner_url)
    port = outer.server_port
    try:
        def fetch(url: str, *hosts: str) -> bytes:
            store = MediaStore(ServeConfig("m", allow_remote_media=True, allowed_media_hosts=list(hosts)))
            scratch = tmp_path / f"scratch-{len(list(tmp_path.iterdir()))}"
            scratch.mkdir()
            return Path(store.resolve(url, str(scratch), "video_url")).read_bytes()

        for url in (f"http://127.0.0.1:{port}/clip.mp4", f"http://localhost:{port}/clip.mp4",
                    "http://10.1.2.3/clip.mp4", "http://169.254.169.254/latest/meta-data"):
            with pytest.raises(RequestError) as refused:
                fetch(url)
            assert refused.value.status == 403 and refused.value.code == "media_host_not_allowed", url
        assert fetch(f"http://127.0.0.1:{port}/clip.mp4", "127.0.0.1") == clip
        with pytest.raises(RequestError, match="127.0.0.2") as redirected:  # the first hop allowed, the second not
            fetch(f"http://127.0.0.1:{port}/redirect", "127.0.0.1")
        assert redirected.value.status == 403
        assert fetch(f"http://127.0.0.1:{port}/redirect", "127.0.0.0/8") == clip
        assert fetch(f"http://localhost:{port}/redirect", "localhost", "127.0.0.2") == clip
    finally:
        outer.shutdown()
        inner.shutdown()
