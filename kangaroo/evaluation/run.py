"""``kangaroo eval``: score a model folder on a benchmark, resumable and split over processes.

Every answered question is appended to a journal (``samples.jsonl``, or
``samples.shard-K-of-N.jsonl`` for one of N processes) and flushed to disk at once, so a killed
run asked again skips what it answered. When every shard is done, ``results.json`` is computed
from the journals: overall accuracy, per category, the replies with no letter (wrong, listed)
and the missing or undecodable videos (listed, counted, left out of the accuracy).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import replace
from typing import Any, Literal

from kangaroo import storage
from kangaroo.data.video import FrameSampling, MediaError
from kangaroo.evaluation.benchmarks import READERS, Question, extract_letter, read_benchmark
from kangaroo.inference.generation import Generator

RESULTS_NAME = "results.json"
SAMPLES_NAME = "samples.jsonl"
MAX_NEW_TOKENS = 16
BenchmarkName = Literal[tuple(sorted(READERS))]  # type: ignore[valid-type]


def journal_name(shard: tuple[int, int]) -> str:
    index, count = shard
    return SAMPLES_NAME if count == 1 else f"samples.shard-{index}-of-{count}.jsonl"


def read_journal(path: str) -> dict[str, dict[str, Any]]:
    """Finished questions by id. A line cut off by a kill (the last one) is dropped: that
    question is asked again."""
    done: dict[str, dict[str, Any]] = {}
    if not os.path.exists(path):
        return done
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[entry["id"]] = entry
    return done


def frame_sampling(base: FrameSampling, frames: int | None, fps: float | None) -> FrameSampling:
    """The model folder's sampling, or ``--frames`` (uniform) / ``--fps`` in its place."""
    if frames is not None and fps is not None:
        raise ValueError("give --frames or --fps, not both")
    if frames is not None:
        if frames < 1:
            raise ValueError(f"--frames must be positive, got {frames}")
        return replace(base, strategy="uniform", num_frames=frames, min_duration=0.0)
    if fps is not None:
        if fps <= 0:
            raise ValueError(f"--fps must be positive, got {fps}")
        return replace(base, strategy="fps", fps=fps, min_duration=0.0)
    return replace(base, min_duration=0.0)


def answer_question(generator: Generator, question: Question, videos: str, mode: str) -> dict[str, Any]:
    """One journal entry: the reply and its letter, or the media error."""
    path = question.video if os.path.isabs(question.video) else os.path.join(videos, question.video)
    entry: dict[str, Any] = {"id": question.id, "answer": question.answer, "categories": question.categories}
    try:
        prompt = generator.prompt([{"role": "user", "content": question.prompt}], path)
    except MediaError as err:
        return {**entry, "error": str(err)}
    if mode == "likelihood":
        scores = generator.option_scores(prompt, question.letters)
        letter = question.letters[max(range(len(scores)), key=scores.__getitem__)]
        response = letter
        entry["scores"] = dict(zip(question.letters, scores))
    else:
        response = generator.generate([prompt], max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0].text
        letter = extract_letter(response, question.letters)
    return {**entry, "prompt": question.prompt, "response": response, "letter": letter,
            "correct": letter == question.answer}


RUN_NAME = "eval.json"


def claim_output(output: str, identity: dict[str, Any]) -> None:
    """Records what ``output`` evaluates (``OUT/eval.json``: model, benchmark, data, mode, frame
    sampling) and refuses an output folder holding answers of another evaluation, whose journal
    would otherwise be resumed as if it were this one's."""
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, RUN_NAME)
    identity = json.loads(json.dumps(identity))
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            previous = json.load(handle)
        if previous != identity:
            changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise ValueError(f"{output} holds the answers of another evaluation (it differs in {changed}); "
                             "use another --output, or remove the folder to start over")
        return
    # renamed into place: the shards of one evaluation claim the folder at the same time, and
    # one must never read another's half-written file
    storage.write_text(path, json.dumps(identity, indent=1))


def evaluate_shard(generator: Generator, questions: list[Question], videos: str, output: str, mode: str = "generate",
                   shard: tuple[int, int] = (0, 1), progress: bool = True, benchmark: str = "") -> int:
    """Answers this shard's questions (every ``count``-th from ``index``) not yet in its journal;
    returns how many it asked now."""
    from dataclasses import asdict

    from tqdm.auto import tqdm

    if mode not in ("generate", "likelihood"):
        raise ValueError(f"--mode must be generate or likelihood, got {mode!r}")
    index, count = shard
    claim_output(output, {"model": os.path.abspath(generator.loaded.folder), "benchmark": benchmark, "mode": mode,
                          "questions": [q.id for q in questions], "sampling": asdict(generator.sampling)})
    path = os.path.join(output, journal_name(shard))
    done = read_journal(path)
    mine = [q for q in questions[index::count] if q.id not in done]
    _rewrite_whole_lines(path, done)
    asked = 0
    with open(path, "a", encoding="utf-8") as journal:
        for question in tqdm(mine, desc=f"eval shard {index + 1}/{count}" if count > 1 else "eval",
                             unit="question", disable=not progress, initial=len(questions[index::count]) - len(mine),
                             total=len(questions[index::count])):
            journal.write(json.dumps(answer_question(generator, question, videos, mode), ensure_ascii=False) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
            asked += 1
    return asked


def _rewrite_whole_lines(path: str, done: dict[str, dict[str, Any]]) -> None:
    """Drops a line cut off by a kill, so that appending starts on a fresh line."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as handle:
        data = handle.read()
    if data and not data.endswith(b"\n"):
        temporary = path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(entry, ensure_ascii=False) + "\n" for entry in done.values())
        os.replace(temporary, path)


def summarize(questions: list[Question], output: str, shards: int, benchmark: str, mode: str) -> dict[str, Any]:
    """``results.json`` from the journals of ``shards`` processes; raises when a question is
    unanswered (a shard still running or killed: run the same command again)."""
    entries: dict[str, dict[str, Any]] = {}
    for index in range(shards):
        entries.update(read_journal(os.path.join(output, journal_name((index, shards)))))
    unanswered = [q.id for q in questions if q.id not in entries]
    if unanswered:
        raise RuntimeError(f"{len(unanswered)} question(s) have no answer yet (e.g. {unanswered[:3]}); "
                           "run the same command again to finish them")
    ordered = [entries[q.id] for q in questions]
    scored = [e for e in ordered if "error" not in e]
    missing = [{"id": e["id"], "error": e["error"]} for e in ordered if "error" in e]
    by_category: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for entry in scored:
        for name, value in entry["categories"].items():
            by_category[name][value].append(entry["correct"])
    results = {
        "benchmark": benchmark, "mode": mode,
        "accuracy": _accuracy([e["correct"] for e in scored]),
        "correct": sum(e["correct"] for e in scored), "scored": len(scored), "questions": len(questions),
        "categories": {name: {value: {"accuracy": _accuracy(marks), "correct": sum(marks), "scored": len(marks)}
                              for value, marks in sorted(values.items())}
                       for name, values in sorted(by_category.items())},
        "no_letter": [e["id"] for e in scored if not e["letter"]],
        "missing_media": len(missing), "missing": missing,
    }
    with open(os.path.join(output, RESULTS_NAME), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1, ensure_ascii=False)
    if shards > 1:  # one journal in question order, as one process writes it
        with open(os.path.join(output, SAMPLES_NAME), "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in ordered)
    return results


def _accuracy(marks: list[bool]) -> float | None:
    return round(sum(marks) / len(marks), 6) if marks else None


def format_results(results: dict[str, Any]) -> str:
    lines = [f"{results['benchmark']} ({results['mode']}): accuracy "
             f"{_shown(results['accuracy'])} ({results['correct']}/{results['scored']})"]
    for name, values in results["categories"].items():
        for value, row in values.items():
            lines.append(f"  {name:<18}{value:<28}{_shown(row['accuracy']):>8}  ({row['correct']}/{row['scored']})")
    if results["no_letter"]:
        lines.append(f"replies with no option letter (counted wrong): {len(results['no_letter'])}")
    if results["missing_media"]:
        lines.append(f"missing or undecodable media (left out of the accuracy): {results['missing_media']}")
    return "\n".join(lines)


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_benchmark(generator: Generator, sampling: FrameSampling, benchmark: str, data: str, output: str,
                  videos: str | None = None, mode: str = "generate", frames: int | None = None,
                  fps: float | None = None, shard: tuple[int, int] = (0, 1), progress: bool = True) -> list[Question]:
    """Answers one shard of a benchmark file's questions with ``generator`` (frames sampled as
    ``sampling`` says, or ``frames``/``fps`` in its place) into ``output``'s journal; returns the
    questions, for ``summarize``. ``kangaroo eval`` and the recipe runner both score through it."""
    generator.sampling = frame_sampling(sampling, frames, fps)
    questions = read_benchmark(benchmark, data)
    evaluate_shard(generator, questions, videos or os.path.dirname(os.path.abspath(data)), output, mode, shard,
                   progress=progress, benchmark=benchmark)
    return questions


def evaluate(*, model: str, benchmark: BenchmarkName, data: str, output: str, videos: str | None = None,
             mode: Literal["generate", "likelihood"] = "generate", frames: int | None = None, fps: float | None = None,
             devices: int = 1, device: str = "cpu", dtype: str | None = None, quiet: bool = False) -> int:
    """Score a model folder on a video benchmark.

    Greedy decoding, at most 16 new tokens, the option letter read from the reply (none: wrong,
    listed). Writes OUT/results.json and OUT/samples.jsonl; a rerun resumes.

    Args:
        model: a model folder (kangaroo export, or a recipe's last stage)
        benchmark: the data file's layout (manifest: the project's task: mcq lines)
        data: the questions: a JSON list or JSON lines
        output: folder for results.json and samples.jsonl
        videos: the folder video paths are relative to (default: the data file's)
        mode: generate a reply, or score each option letter (likelihood)
        frames: sample this many frames uniformly (default: the model folder's)
        fps: sample at this rate instead
        devices: processes splitting the questions, each on its own GPU when --device is cuda
        device: cpu, cuda, cuda:1, ...
        dtype: cast the weights, e.g. bfloat16 on a GPU (default: as stored)
        quiet: no progress bar
    """
    if devices < 1:
        raise ValueError(f"--devices must be 1 or more, got {devices}")
    questions = read_benchmark(benchmark, data)  # a bad file fails here, before any process starts
    frame_sampling(FrameSampling(), frames, fps)  # and so do bad --frames/--fps
    shard_options = dict(model=model, benchmark=benchmark, data=data, output=output, videos=videos, mode=mode,
                         frames=frames, fps=fps, device=device, dtype=dtype, progress=not quiet)
    if devices == 1:
        _answer_shard(shard_options, (0, 1))
    else:
        _run_shards(shard_options, devices)
    print(format_results(summarize(questions, output, devices, benchmark, mode)))
    return 0


def _answer_shard(options: dict[str, Any], shard: tuple[int, int]) -> None:
    from kangaroo.inference.commands import load_generator

    options = dict(options)
    generator = load_generator(options.pop("model"), options.pop("device"), options.pop("dtype"))
    run_benchmark(generator, generator.sampling, options.pop("benchmark"), options.pop("data"), options.pop("output"),
                  shard=shard, **options)


def _run_shards(options: dict[str, Any], count: int) -> None:
    """Answers the shards in ``count`` processes at once, each on its own GPU when the device is
    ``cuda`` (``CUDA_VISIBLE_DEVICES``, so each sees its GPU as ``cuda``); raises when one fails
    (its journal keeps what it answered)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # a fresh interpreter each: no CUDA state forked
    on_gpu = options["device"].startswith("cuda")
    processes = []
    for index in range(count):
        shard_options = {**options, "device": "cuda"} if on_gpu else options
        previous = os.environ.get("CUDA_VISIBLE_DEVICES")
        if on_gpu:  # a spawned process starts with the environment of the moment
            os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
        try:
            process = context.Process(target=_answer_shard, args=(shard_options, (index, count)),
                                      name=f"eval-shard-{index}")
            process.start()
        finally:
            if on_gpu:
                if previous is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = previous
        processes.append(process)
    for process in processes:
        process.join()
    codes = [process.exitcode for process in processes]
    failed = [i for i, code in enumerate(codes) if code != 0]
    if failed:
        raise RuntimeError(f"eval shard(s) {failed} of {count} failed (exit codes {[codes[i] for i in failed]}); "
                           "run the same command again to finish")
