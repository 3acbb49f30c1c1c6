"""The lmms-eval model plugin through its Python interface (lmms-eval itself is not installed in
the tested set: its releases require av<16, see pyproject.toml's `eval` extra)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points

import pytest

from kangaroo.evaluation.benchmarks import extract_letter, read_benchmark


@dataclass
class Request:
    """What lmms-eval hands a simple model: an ``Instance`` with its ``args`` tuple."""

    args: tuple


def test_installing_the_project_registers_the_model_with_lmms_eval():
    (entry,) = [e for e in entry_points(group="lmms_eval.models") if e.name == "kangaroo"]
    assert entry.value == "kangaroo.evaluation.lmms_eval_model:manifest"
    module, _, name = entry.value.partition(":")
    assert callable(getattr(__import__(module, fromlist=[name]), name))


@pytest.fixture(scope="module")
def colour_videomme(trained_model, tmp_path_factory):
    """The trained model's held-out clips as a Video-MME file."""
    root = tmp_path_factory.mktemp("vmme")
    lines = [json.loads(line) for line in trained_model.val_manifest.read_text().splitlines()]
    records = [{"videoID": line["video"], "question_id": line["id"], "duration": "short", "domain": "colour",
                "sub_category": "-", "task_type": "Attribute Perception", "question": line["question"],
                "options": [f"{letter}. {option}" for letter, option in zip("ABCD", line["options"])],
                "answer": line["answer"]} for line in lines]
    path = root / "videomme.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def test_generate_until_scores_as_kangaroo_eval_does(trained_model, colour_videomme, tmp_path):
    from kangaroo.evaluation.lmms_eval_model import Kangaroo

    path, records = colour_videomme
    model = Kangaroo(pretrained=str(trained_model.folder))
    model.task_dict = {"videomme_local": {"test": records}}
    questions = read_benchmark("videomme", str(path))
    gen_kwargs = {"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False,
                  "until": ["\n\n"]}
    requests = [Request((q.prompt, dict(gen_kwargs), lambda doc: [doc["videoID"]], i, "videomme_local", "test"))
                for i, q in enumerate(questions)]
    replies = model.generate_until(requests)
    accuracy = sum(extract_letter(r, q.letters) == q.answer for r, q in zip(replies, questions)) / len(questions)

    out = subprocess.run([sys.executable, "-m", "kangaroo.cli", "eval", "--model", str(trained_model.folder),
                          "--benchmark", "videomme", "--data", str(path), "--videos", "/", "--output", str(tmp_path),
                          "--quiet"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert accuracy == results["accuracy"]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert replies == [s["response"] for s in samples], "the same reply to every question"


def test_loglikelihood_agrees_with_the_likelihood_mode(trained_model, colour_videomme):
    from kangaroo.evaluation.lmms_eval_model import Kangaroo

    path, records = colour_videomme
    model = Kangaroo(pretrained=str(trained_model.folder))
    model.task_dict = {"t": {"test": records}}
    question = read_benchmark("videomme", str(path))[0]
    requests = [Request((question.prompt, letter, lambda doc: [doc["videoID"]], 0, "t", "test"))
                for letter in question.letters]
    scores = model.loglikelihood(requests)
    prompt = model.generator.prompt([{"role": "user", "content": question.prompt}], records[0]["videoID"])
    expected = model.generator.option_scores(prompt, question.letters)
    assert [s for s, _ in scores] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    best = max(range(4), key=lambda i: scores[i][0])
    assert [greedy for _, greedy in scores] == [i == best for i in range(4)]
