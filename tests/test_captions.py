"""``kangaroo curate caption`` against real servers on 127.0.0.1: ``kangaroo serve`` running the
shared trained model as the frame captioner and ``transformers serve`` (transformers' own
OpenAI-compatible server) running a tiny summariser LLM, talked to with the ``openai`` client.
The fault and shard tests use a small HTTP server that answers from the frames' pixels and can be
told to answer 429, 500, 400 or nothing."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openai")

from ports import free_port, wait_until_up  # noqa: E402
from trained import COLOURS, colour_image  # noqa: E402

TIMEOUT = 240


def kangaroo(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kangaroo.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@contextmanager
def started(command: list[str], health: str, log: Path):
    """A server process (its output in ``log``, no pipe to fill), stopped at the end."""
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        try:
            try:
                wait_until_up(health, process, seconds=180)
            except BaseException:
                process.kill()
                raise AssertionError(f"{command[:4]} did not come up: {log.read_text()[-3000:]}") from None
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGCONT)
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()


@contextmanager
def captioner_server(folder: Path, log: Path):
    port = free_port()
    command = [sys.executable, "-m", "kangaroo.cli", "serve", "--model", str(folder), "--port", str(port),
               "--served-model-name", "tiny-captioner", "--log-level", "warning"]
    with started(command, f"http://127.0.0.1:{port}/v1/models", log) as process:
        yield f"http://127.0.0.1:{port}/v1", process


@pytest.fixture(scope="module")
def servers(trained_model, summariser_folder, tmp_path_factory):
    logs = tmp_path_factory.mktemp("caption-servers")
    port = free_port()
    # the `transformers` command beside this interpreter (transformers[serving])
    summariser = [os.path.join(os.path.dirname(sys.executable), "transformers"), "serve", str(summariser_folder),
                  "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]
    with captioner_server(trained_model.folder, logs / "kangaroo-serve.log") as (captioner, process), \
            started(summariser, f"http://127.0.0.1:{port}/health", logs / "transformers-serve.log"):
        yield {"captioner": captioner, "captioner_process": process, "summariser": f"http://127.0.0.1:{port}/v1",
               "summariser_model": str(summariser_folder)}


def write_config(path: Path, captioner: str, summariser: dict, **settings) -> Path:
    config = {"captioners": [{"name": "kangaroo", "base_url": captioner, "model": "tiny-captioner", "max_tokens": 12}],
              "summarisers": [summariser], **settings}
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def served_summariser(servers) -> dict:
    return {"name": "transformers-serve", "base_url": servers["summariser"], "model": servers["summariser_model"],
            "max_tokens": 12}


def colour_manifest(path: Path, val_manifest: Path, count: int, extra: list[dict] = ()) -> list[dict]:
    """``count`` held-out colour clips, their paths relative to the manifest's folder."""
    records = [json.loads(line) for line in val_manifest.read_text().splitlines()][:count]
    for record in records:
        record["video"] = os.path.relpath(record["video"], path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in [*records, *extra]))
    return records


def colour_of(record: dict) -> str:
    return list(COLOURS)[("ABCD").index(record["answer"])]


def read_output(output: Path) -> tuple[list[dict], dict, list[dict]]:
    stem = str(output)[: -len(".jsonl")]
    lines = [json.loads(line) for line in output.read_text().splitlines()] if output.exists() else []
    reasons = [json.loads(line) for line in Path(stem + ".reasons.jsonl").read_text().splitlines()]
    return lines, json.loads(Path(stem + ".report.json").read_text()), reasons


def test_real_servers_caption_held_out_clips_naming_their_colour_with_provenance(servers, trained_model, tmp_path):
    image = tmp_path / "data" / "blue.png"
    image.parent.mkdir(parents=True)
    colour_image(image, "blue", 7)
    manifest = tmp_path / "data" / "clips.jsonl"
    records = colour_manifest(manifest, trained_model.val_manifest, 12, [
        {"id": "web-image", "image": "blue.png", "caption": "IMG_0042.jpg"},
        {"id": "no-media", "caption": "a line without media"}])
    with open(manifest, "a") as handle:
        handle.write("{not json\n")
    config = write_config(tmp_path / "captions.yaml", servers["captioner"], served_summariser(servers), concurrency=4)
    output = tmp_path / "out" / "captioned.jsonl"
    run = kangaroo("curate", "caption", "--manifest", str(manifest), "--output", str(output), "--captions", str(config))
    assert run.returncode == 0, run.stderr[-3000:]
    lines, report, reasons = read_output(output)
    assert report["captioned"] == 13 and report["skipped"] == 1 and report["failed"] == 1, report
    assert report["skips"] == {"no media": 1} and report["failures"] == {"bad line": 1}, report
    assert report["requests"] == 12 * 6 + 1 and report["retries"] == 0, report  # 5 frames + 1 summary per video
    assert report["prompt_tokens"] > 0 and report["completion_tokens"] > 0
    assert {r["id"] for r in reasons} == {"no-media", "line 15"}

    videos = {line["id"]: line for line in lines if "video" in line}
    assert list(videos) == [r["id"] for r in records], "manifest order"
    named = [colour_of(r) in videos[r["id"]]["caption"] for r in records]
    assert sum(named) >= 10, [(colour_of(r), videos[r["id"]]["caption"]) for r in records]  # measured: 12 of 12
    for line in videos.values():
        assert (output.parent / line["video"]).resolve().exists(), "media paths follow the output"
        made = line["meta"]["captioning"]
        assert made["captioner"] == "kangaroo" and made["summariser"] == "transformers-serve"
        assert len(made["prompt_sha256"]) == 16
        times = [frame["time"] for frame in made["frames"]]
        assert len(times) == 5 and all(frame["caption"] for frame in made["frames"])
        # 8 frames at 4 fps: 2 s in five segments of 0.4 s, one frame drawn inside each
        assert all(k * 0.4 <= t < (k + 1) * 0.4 for k, t in enumerate(times)), times
    picture = next(line for line in lines if line["id"] == "web-image")
    assert "blue" in picture["caption"] and picture["meta"]["captioning"]["replaced_caption"] == "IMG_0042.jpg"
    assert not any(line["caption"].strip() == "" for line in lines)

    again = kangaroo("curate", "caption", "--manifest", str(manifest), "--output", str(output), "--captions", str(config))
    assert again.returncode == 0, again.stderr[-3000:]
    _, report, _ = read_output(output)
    assert report["resumed"] == 15 and report["requests"] == 0, "a rerun asks nothing already answered"


def journal_lines(output: Path) -> int:
    path = Path(str(output)[: -len(".jsonl")] + ".progress.jsonl")
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def wait_for_journal(output: Path, lines: int, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while journal_lines(output) < lines:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"fewer than {lines} lines captioned in {seconds} s"
        time.sleep(0.1)


def test_a_paused_captioner_is_waited_out_and_a_lost_one_stops_the_run_which_a_rerun_continues(
        servers, trained_model, tmp_path):
    manifest = tmp_path / "clips.jsonl"
    colour_manifest(manifest, trained_model.val_manifest, 24)
    faults = {"timeout_s": 2, "retries": 6, "backoff_s": 0.5, "max_backoff_s": 2, "concurrency": 2}
    config = write_config(tmp_path / "paused.yaml", servers["captioner"], served_summariser(servers), **faults)
    output = tmp_path / "paused" / "captioned.jsonl"
    command = [sys.executable, "-m", "kangaroo.cli", "curate", "caption", "--manifest", str(manifest), "--output",
               str(output), "--captions", str(config)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_journal(output, 3, process)
        os.kill(servers["captioner_process"].pid, signal.SIGSTOP)  # the captioner stops answering for 4 s
        time.sleep(4)
        os.kill(servers["captioner_process"].pid, signal.SIGCONT)
        _, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        os.kill(servers["captioner_process"].pid, signal.SIGCONT)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    _, report, _ = read_output(output)
    assert report["captioned"] == 24 and report["retries"] >= 1, report

    # A captioner lost for good: the run stops with a clear error, every finished line kept
    lost = tmp_path / "lost" / "captioned.jsonl"
    with captioner_server(trained_model.folder, tmp_path / "lost-serve.log") as (url, server):
        config = write_config(tmp_path / "lost.yaml", url, served_summariser(servers),
                              **{**faults, "retries": 2})
        command[command.index(str(output))] = str(lost)
        command[command.index(str(config.parent / "paused.yaml"))] = str(config)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_journal(lost, 3, process)
            os.killpg(server.pid, signal.SIGKILL)
            _, stderr = process.communicate(timeout=TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 1, stderr[-3000:]
    assert "did not answer after 3 attempts" in stderr and "run the same command again" in stderr, stderr[-2000:]
    finished = journal_lines(lost)
    assert 3 <= finished < 24
    _, report, _ = read_output(lost)
    assert report["stopped"] and report["captioned"] == finished

    # The same output, the captioner back (at another address): only the rest is asked
    config = write_config(tmp_path / "lost.yaml", servers["captioner"], served_summariser(servers),
                          **{**faults, "timeout_s": 60})
    rerun = kangaroo("curate", "caption", "--manifest", str(manifest), "--output", str(lost), "--captions", str(config))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    lines, report, _ = read_output(lost)
    assert report["resumed"] == finished, report
    assert report["requests"] - report["retries"] == (24 - finished) * 6, report  # only the rest asked
    assert len(lines) == 24 and report["captioned"] == 24


class ScriptedServer:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that captions a frame with the colour
    nearest its mean pixel and summarises with the colour most frame captions name; ``script``
    lists what the next summary requests get: an HTTP status, ``""`` (an empty reply) or
    ``None`` (the answer)."""

    def __init__(self) -> None:
        self.script: list[int | str | None] = []
        self.prompts: list[str] = []
        self.repeat: str | None = None
        """A colour whose video summaries repeat one sentence (for the repetition filter)."""
        self.requests = 0
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][-1]["content"]
                with lock:
                    server.requests += 1
                    server.prompts.append(content if isinstance(content, str) else
                                          next(p["text"] for p in content if p["type"] == "text"))
                    scripted = server.script.pop(0) if isinstance(content, str) and server.script else None
                if isinstance(scripted, int):
                    return self.reply(scripted, {"error": {"message": f"scripted {scripted}", "type": "test"}})
                text = "" if scripted == "" else server.answer(content)
                if server.repeat and isinstance(content, str) and server.repeat in text:
                    text = " ".join([f"A {server.repeat} screen."] * 3)
                self.reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}],
                                 "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})

            def reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def answer(content) -> str:
        from PIL import Image

        if isinstance(content, str):  # a summary: the colour most frame captions name
            counts = {colour: content.count(f"A {colour} screen") for colour in COLOURS}
            return f"The video shows a {max(counts, key=counts.get)} screen."
        url = next(part["image_url"]["url"] for part in content if part["type"] == "image_url")
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"), float)
        mean = pixels.reshape(-1, 3).mean(0)
        colour = min(COLOURS, key=lambda c: float(((np.asarray(COLOURS[c]) - mean) ** 2).sum()))
        return f"A {colour} screen."

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    server = ScriptedServer()
    yield server
    server.close()


def test_rate_limits_and_server_errors_are_retried_and_empty_or_refused_replies_are_counted_failures(
        scripted, trained_model, tmp_path):
    from kangaroo.curate.captions import caption_config, caption_manifest

    manifest = tmp_path / "clips.jsonl"
    records = colour_manifest(manifest, trained_model.val_manifest, 5)
    backend = {"base_url": scripted.url, "model": "scripted"}
    config = caption_config({"captioners": [{"name": "frames", **backend}], "summarisers": [{"name": "words", **backend}],
                             "concurrency": 1, "retries": 3, "backoff_s": 0.05})
    # summaries of lines 1-5: 429 then an answer, 500 then an answer, empty, 400, an answer
    scripted.script = [429, None, 500, None, "", 400]  # None: an answer
    report = caption_manifest(str(manifest), str(tmp_path / "out.jsonl"), config, progress=False).data
    lines, _, reasons = read_output(tmp_path / "out.jsonl")
    assert report["retries"] == 2 and report["captioned"] == 3 and report["failed"] == 2, report
    assert report["failures"] == {"empty reply": 1, "refused (HTTP 400)": 1}, report
    assert [line["id"] for line in lines] == [records[i]["id"] for i in (0, 1, 4)]
    assert [r["id"] for r in reasons] == [records[2]["id"], records[3]["id"]]
    assert all(colour_of(line) in line["caption"] for line in lines)
    assert report["requests"] == 5 * 6 + 2 and report["backends"]["words"]["failures"] == 2, report


def test_two_shards_captioned_apart_and_merged_equal_one_pass(scripted, summariser_folder, trained_model, tmp_path):
    from kangaroo.curate.captions import caption_manifest, load_caption_config

    manifest = tmp_path / "clips.jsonl"
    colour_manifest(manifest, trained_model.val_manifest, 7, [{"id": "no-media"}])
    config = tmp_path / "captions.yaml"
    config.write_text(json.dumps({  # a local transformers summariser, drawn against the server by weight
        "captioners": [{"name": "frames", "base_url": scripted.url, "model": "scripted"}],
        "summarisers": [{"name": "local", "kind": "transformers", "model": str(summariser_folder), "max_tokens": 12,
                         "weight": 3},
                        {"name": "server", "base_url": scripted.url, "model": "scripted"}]}))
    whole = tmp_path / "whole" / "captioned.jsonl"
    caption_manifest(str(manifest), str(whole), load_caption_config(str(config)), progress=False)
    parts = []
    for shard in (0, 1):  # as two machines would: each reads the whole manifest, captions its slice
        parts.append(tmp_path / f"part{shard}" / "captioned.jsonl")
        caption_manifest(str(manifest), str(parts[-1]), load_caption_config(str(config)), shard=(shard, 2),
                         progress=False)
    merged = tmp_path / "merged" / "deeper" / "captioned.jsonl"  # media paths must follow it
    run = kangaroo("curate", "merge", *map(str, parts), "--output", str(merged))
    assert run.returncode == 0, run.stderr[-3000:]
    one, one_report, one_reasons = read_output(whole)
    two, two_report, two_reasons = read_output(merged)
    for lines, output in ((one, whole), (two, merged)):
        for line in lines:
            line["video"] = str((output.parent / line["video"]).resolve())
    assert two == one and two_reasons == one_reasons
    assert {line["meta"]["captioning"]["summariser"] for line in one} == {"local", "server"}
    for key in ("lines", "captioned", "skipped", "failed", "requests", "failures", "skips"):
        assert two_report[key] == one_report[key], key
    assert kangaroo("curate", "merge", str(parts[0]), "--output", str(tmp_path / "x.jsonl")).returncode == 2


@pytest.mark.parametrize("change, message", [
    ({"captioners": [{"name": "a", "model": "m"}]}, "needs `base_url`"),
    ({"captioners": [{"name": "a", "base_url": "http://127.0.0.1:1/v1"}]}, "no `model`"),
    ({"captioners": [{"name": "a", "kind": "vllm", "base_url": "http://x/v1", "model": "m"}]}, "unknown kind 'vllm'"),
    ({"prompts": {"summary": {"en": "Summarise these frames."}}}, "lacks the placeholder {captions}"),
    ({"prompts": {"frame": {"en": "Describe {thing}."}}}, "unknown placeholders ['thing']"),
    ({"summarisers": []}, "must list at least one backend"),
    ({"captioners": [{"name": "a", "base_url": "http://x/v1", "model": "m", "temprature": 0}]}, "unknown keys ['temprature']"),
])
def test_bad_configs_are_refused_naming_the_problem(tmp_path, change, message):
    import re

    from kangaroo.curate.captions import caption_config

    config = {"captioners": [{"name": "a", "base_url": "http://127.0.0.1:1/v1", "model": "m"}],
              "summarisers": [{"name": "b", "base_url": "http://127.0.0.1:1/v1", "model": "m"}], **change}
    with pytest.raises(ValueError, match=re.escape(message)):
        caption_config(config)
    if "vllm" in json.dumps(change):  # and on the command line: exit code 2, the message, no traceback
        path = tmp_path / "captions.yaml"
        path.write_text(json.dumps(config))
        (tmp_path / "m.jsonl").write_text('{"id": "a", "video": "a.mp4"}\n')
        run = kangaroo("curate", "caption", "--manifest", str(tmp_path / "m.jsonl"), "--output",
                       str(tmp_path / "out.jsonl"), "--captions", str(path), timeout=60)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]


def test_an_unset_api_key_variable_is_named(tmp_path, monkeypatch):
    from kangaroo.curate.captions import caption_config, caption_manifest

    monkeypatch.delenv("KANGAROO_TEST_MISSING_KEY", raising=False)
    backend = {"base_url": "http://127.0.0.1:1/v1", "model": "m", "api_key_env": "KANGAROO_TEST_MISSING_KEY"}
    config = caption_config({"captioners": [{"name": "a", **backend}], "summarisers": [{"name": "b", **backend}]})
    (tmp_path / "m.jsonl").write_text('{"id": "a", "video": "a.mp4"}\n')
    with pytest.raises(ValueError, match="KANGAROO_TEST_MISSING_KEY"):
        caption_manifest(str(tmp_path / "m.jsonl"), str(tmp_path / "out.jsonl"), config, progress=False)


def test_curate_chains_captioning_before_the_repetition_filter_and_two_shards_merged_equal_one_pass(
        scripted, trained_model, tmp_path):
    from kangaroo.curate.pipeline import curate, load_filters

    manifest = tmp_path / "clips.jsonl"
    records = colour_manifest(manifest, trained_model.val_manifest, 9)
    for i, record in enumerate(records):  # 6 of 9 in one category: CategoryBalance resamples it
        record["meta"]["category"] = "many" if i < 6 else "few"
    # the first line again at the end, in the other shard: one pass refuses it, so must the merge
    manifest.write_text("".join(json.dumps(r) + "\n" for r in [*records, records[0]]))
    backend = {"base_url": scripted.url, "model": "scripted"}
    (tmp_path / "captions.yaml").write_text(json.dumps({"captioners": [{"name": "frames", **backend}],
                                                        "summarisers": [{"name": "words", **backend}]}))
    (tmp_path / "curate.yaml").write_text(json.dumps({"filters": [
        {"class_path": "kangaroo.curate.Captioning", "init_args": {"config": str(tmp_path / "captions.yaml")}},
        {"class_path": "kangaroo.curate.CaptionRepetitionFilter", "init_args": {"max_iou": 0.6}},
        {"class_path": "kangaroo.curate.CategoryBalance", "init_args": {"max_share": 0.6, "seed": 0}}]}))
    scripted.repeat = "yellow"  # its summaries repeat one sentence: removed after captioning

    def run(output: Path, shard=None, workers=1):
        return curate(str(manifest), str(output), load_filters(str(tmp_path / "curate.yaml")), shard=shard,
                      progress=False, workers=workers)

    whole = run(tmp_path / "whole" / "kept.jsonl", workers=2).data  # the Captioning step in spawned workers
    parts = [tmp_path / f"part{k}" / "kept.jsonl" for k in (0, 1)]
    for k, part in enumerate(parts):
        assert run(part, (k, 2)).data["deferred"] == ["category_balance"]
    merge = kangaroo("curate", "merge", *map(str, parts), "--output", str(tmp_path / "merged" / "kept.jsonl"))
    assert merge.returncode == 0, merge.stderr[-3000:]
    merged = json.loads((tmp_path / "merged" / "kept.report.json").read_text())

    def lines(path: str) -> list[dict]:
        out = [json.loads(line) for line in Path(path).read_text().splitlines()]
        for line in out:
            line["video"] = str((Path(path).parent / line["video"]).resolve())
        return out

    one = lines(whole["output"])
    assert lines(merged["output"]) == one and len(one) >= 3
    assert all(line["meta"]["captioning"]["frames"] and colour_of(line) in line["caption"] for line in one)
    listed = [json.loads(line) for line in Path(whole["reasons"]).read_text().splitlines()]
    reasons = {r["id"]: r for r in reversed(listed)}  # by id, the first line holding it
    yellow = [r["id"] for r in records if colour_of(r) == "yellow"]
    assert {reasons[i]["filter"] for i in yellow} == {"caption_repetition"}, "captioned, then found repetitive"
    assert reasons[records[0]["id"]]["status"] != "error" and "duplicate id" in listed[-1]["reason"]
    assert any(r.get("filter") == "category_balance" for r in reasons.values())
    assert [r["status"] for r in map(json.loads, Path(merged["reasons"]).read_text().splitlines())] == \
        [r["status"] for r in listed]
    assert {f["name"]: f["removed"] for f in merged["filters"]} == {f["name"]: f["removed"] for f in whole["filters"]}
    step = next(f for f in whole["filters"] if f["name"] == "captioning")
    assert step["examined"] == 9 and step["requests"] == 9 * 6 and step["prompt_tokens"] == 9 * 6 * 10, step


def test_the_shipped_configs_chain_filters_captioning_repetition_and_balance(tmp_path, monkeypatch):
    import re

    from kangaroo.curate.captions import DEFAULT_PROMPTS, load_caption_config
    from kangaroo.curate.pipeline import load_filters

    root = Path(__file__).resolve().parents[1]
    config = load_caption_config(str(root / "configs" / "captions.yaml"))
    assert config.prompts == DEFAULT_PROMPTS and len(config.summarisers) == 2
    text = (root / "configs" / "curate.yaml").read_text()
    chained = re.sub(r"  # (- class_path: kangaroo.curate.Captioning)\n  #   init_args:\n  #     config: (\S+)",
                     r"  \1\n    init_args:\n      config: \2", text)
    assert chained != text, "configs/curate.yaml keeps the Captioning step, commented"
    (tmp_path / "chain.yaml").write_text(chained)
    monkeypatch.chdir(root)
    names = [f.name for f in load_filters(str(tmp_path / "chain.yaml"))]
    assert names[-3:] == ["captioning", "caption_repetition", "category_balance"], names


def tiny_vlm_folder(root: Path) -> Path:
    """A tiny random-weight LLaVA (CLIP tower, Llama) and its processor, saved as a local folder.
    Its tokenizer's BPE fills the vocabulary, so that random weights emit words (with a small
    corpus most ids are filler special tokens, which decoding drops)."""
    import random

    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from kangaroo.world.tokenizer import build_tiny_tokenizer

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(4000)]
    tokenizer = build_tiny_tokenizer([" ".join(words[i:i + 40]) for i in range(0, len(words), 40)])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{% if m['content'] is string %}"
        "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               chat_template=tokenizer.chat_template, num_additional_image_tokens=1)
    folder = root / "tiny-vlm"
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_a_local_transformers_model_captions_frames_in_process(scripted, summariser_folder, trained_model, tmp_path):
    from kangaroo.curate.captions import caption_config, caption_manifest

    manifest = tmp_path / "clips.jsonl"
    colour_manifest(manifest, trained_model.val_manifest, 3)
    local = {"name": "local-vlm", "kind": "transformers", "model": str(tiny_vlm_folder(tmp_path)), "max_tokens": 6}
    config = caption_config({"captioners": [local],
                             "summarisers": [{"name": "words", "base_url": scripted.url, "model": "scripted"}]})
    report = caption_manifest(str(manifest), str(tmp_path / "out.jsonl"), config, progress=False).data
    lines, _, _ = read_output(tmp_path / "out.jsonl")
    assert report["captioned"] == 3 and report["backends"]["local-vlm"]["requests"] == 15, report
    assert report["backends"]["local-vlm"]["prompt_tokens"] > 15 * 16, "the image's tokens are in every prompt"
    assert all(frame["caption"] for line in lines for frame in line["meta"]["captioning"]["frames"])
    # a text-only folder named as a captioner: refused with what it could not load
    text_only = caption_config({"captioners": [{**local, "model": str(summariser_folder)}],
                                "summarisers": [{"name": "words", "base_url": scripted.url, "model": "scripted"}]})
    with pytest.raises(ValueError, match="as a multimodal"):
        caption_manifest(str(manifest), str(tmp_path / "other.jsonl"), text_only, progress=False)


def test_prompts_follow_each_lines_language_with_their_length_bound(scripted, tmp_path):
    from kangaroo.curate.captions import DEFAULT_PROMPTS, caption_config, caption_manifest

    for name, colour in (("en.png", "red"), ("zh.png", "green")):
        colour_image(tmp_path / name, colour, 1)
    (tmp_path / "images.jsonl").write_text(
        json.dumps({"id": "en", "image": "en.png"}) + "\n"
        + json.dumps({"id": "zh", "image": "zh.png", "meta": {"language": "zh"}}) + "\n")
    backend = {"base_url": scripted.url, "model": "scripted"}
    config = caption_config({"captioners": [{"name": "frames", **backend}], "summarisers": [{"name": "words", **backend}],
                             "max_words": {"image": 33}, "concurrency": 1})
    report = caption_manifest(str(tmp_path / "images.jsonl"), str(tmp_path / "out.jsonl"), config, progress=False).data
    assert report["captioned"] == 2
    assert scripted.prompts == [DEFAULT_PROMPTS["image"]["en"].format(max_words=33),
                                DEFAULT_PROMPTS["image"]["zh"].format(max_words=33)]
    assert "不超过33个字" in scripted.prompts[1]
    lines, _, _ = read_output(tmp_path / "out.jsonl")
    assert [line["caption"] for line in lines] == ["A red screen.", "A green screen."]
    assert [line["meta"]["captioning"]["language"] for line in lines] == ["en", "zh"]
