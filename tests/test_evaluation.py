"""Benchmark readers, prompt templates, letter extraction and ``kangaroo eval`` runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import random_video
from kangaroo.evaluation.benchmarks import BenchmarkError, extract_letter, read_benchmark

SUFFIX = "Answer with the option's letter from the given choices directly."


def write(path: Path, records, jsonl: bool = True) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records))
    return str(path)


@pytest.mark.parametrize("reply, letter", [
    ("The best answer is (C).", "C"), ("C. a cube", "C"), ("C", "C"), ("(B)", "B"), ("Answer: D", "D"),
    ("I think the answer is B because it moves left.", "B"), ("答案是A", "A"), ("a cube", ""), ("", ""),
])
def test_the_letter_is_read_from_a_reply_the_way_lmms_eval_reads_it(reply, letter):
    assert extract_letter(reply, "ABCD") == letter


def test_each_reader_parses_its_published_layout_with_its_template(tmp_path):
    mme = read_benchmark("videomme", write(tmp_path / "mme.json", [{
        "videoID": "fFjv93ACGo8", "question_id": "001-1", "duration": "short", "domain": "Knowledge",
        "sub_category": "Humanity & History", "task_type": "Counting Problem", "question": "How many shapes?",
        "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "answer": "C"}], jsonl=False))[0]
    assert mme.video == "fFjv93ACGo8.mp4" and mme.answer == "C" and mme.id == "001-1"
    assert mme.prompt == ("Select the best answer to the following multiple-choice question based on the video. "
                          "Respond with only the letter (A, B, C, or D) of the correct option.\nHow many shapes?\n"
                          f"A. 1.\nB. 2.\nC. 3.\nD. 4.\n\n{SUFFIX}")
    assert mme.categories == {"duration": "short", "task_type": "Counting Problem", "domain": "Knowledge"}

    mv = read_benchmark("mvbench", write(tmp_path / "mv.jsonl", [{
        "video": "166583.webm", "question": "What is the action performed by the person in the video?",
        "candidates": ["Not sure", "Scattering something down", "Piling something up"],
        "answer": "Piling something up", "sub_task": "action_antonym"}]))[0]
    assert mv.answer == "C" and mv.letters == "ABC" and mv.categories == {"subtask": "action_antonym"}
    assert mv.prompt == ("Question:What is the action performed by the person in the video?\nOption:\n(A) Not sure\n"
                         "(B) Scattering something down\n(C) Piling something up\nOnly give the best option.\n")

    ml = read_benchmark("mlvu", write(tmp_path / "mlvu.jsonl", [{
        "video_name": "needle_32.mp4", "question": "What does the hand coil?\n(A) Blue yarn\n(B) Red yarn\n"
        "(C) Green rope\n(D) Shoelace", "answer": "B", "task_type": "needle", "question_id": "needle_32"}]))[0]
    assert ml.answer == "B" and ml.letters == "ABCD" and ml.prompt.endswith("\nOnly give the best option.\nBest option: (")

    lvb = read_benchmark("longvideobench", write(tmp_path / "lvb.jsonl", [{
        "video_path": "86CxyhFV9MI.mp4", "id": "86CxyhFV9MI_0", "question": "What is the colour of the cup?",
        "option0": "red", "option1": "blue", "option2": "green", "option3": "N/A", "option4": "N/A",
        "correct_choice": 1, "duration_group": 600, "question_category": "S2E"}]))[0]
    assert lvb.answer == "B" and lvb.letters == "ABC"
    assert lvb.prompt == f"What is the colour of the cup?\nA. red\nB. blue\nC. green\n{SUFFIX}\n"
    assert lvb.categories == {"duration_group": "600", "question_category": "S2E"}

    ego = read_benchmark("egoschema", write(tmp_path / "ego.jsonl", [{
        "question_idx": "0", "video_idx": "001934bb", "question": "What is C doing?",
        "option": ["A. cooking", "B. cleaning", "C. reading", "D. writing", "E. sleeping"], "answer": "3"}]))[0]
    assert ego.answer == "D" and ego.video == "001934bb.mp4" and ego.letters == "ABCDE"
    assert ego.prompt == f"What is C doing?\nA. cooking\nB. cleaning\nC. reading\nD. writing\nE. sleeping\n{SUFFIX}"

    own = read_benchmark("manifest", write(tmp_path / "own.jsonl", [{
        "id": "q1", "video": "c.mp4", "task": "mcq", "question": "What colour?", "options": ["red", "blue"],
        "answer": "B", "meta": {"category": "short", "language": "zh"}}]))[0]
    assert own.prompt == "What colour?\nA. red\nB. blue\n请直接回答选项的字母。" and own.categories == {"category": "short"}


def test_bad_benchmark_files_name_the_line_and_field(tmp_path):
    good = {"videoID": "v", "question_id": "1", "duration": "short", "task_type": "t", "question": "q",
            "options": ["A. x", "B. y"], "answer": "A"}
    broken = dict(good, question_id="2")
    del broken["options"]
    with pytest.raises(BenchmarkError, match=r"mme.jsonl:2: missing field\(s\) \['options'\]"):
        read_benchmark("videomme", write(tmp_path / "mme.jsonl", [good, broken]))
    with pytest.raises(BenchmarkError, match=r":1: field 'answer' must be one of \['A', 'B'\], got 'E'"):
        read_benchmark("videomme", write(tmp_path / "bad.jsonl", [dict(good, answer="E")]))
    with pytest.raises(BenchmarkError, match=r"appears twice"):
        read_benchmark("videomme", write(tmp_path / "twice.jsonl", [good, good]))
    with pytest.raises(BenchmarkError, match=r"unknown benchmark 'vmme'; known: \['egoschema', 'longvideobench', "
                                             r"'manifest', 'mlvu', 'mvbench', 'videomme'\]"):
        read_benchmark("vmme", str(tmp_path / "mme.jsonl"))
    out = subprocess.run([sys.executable, "-m", "kangaroo.cli", "eval", "--model", str(tmp_path), "--benchmark",
                          "videomme", "--data", str(tmp_path / "mme.jsonl"), "--output", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == (
        f"kangaroo: error: {tmp_path / 'mme.jsonl'}:2: missing field(s) ['options']")


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    """Video-MME layout: 8 questions over 3 generated clips, one video missing."""
    root = tmp_path_factory.mktemp("bench")
    for i in range(3):
        random_video(root / f"vid{i}.mp4", frames=8, seed=i)
    records = [{"videoID": f"vid{i % 3}" if i != 5 else "gone", "question_id": f"q{i}",
                "duration": ("short", "medium", "long")[i % 3], "domain": "d", "sub_category": "s",
                "task_type": ("Counting Problem", "OCR Problems")[i % 2], "question": f"Question {i}?",
                "options": ["A. one", "B. two", "C. three", "D. four"], "answer": "ABCD"[i % 4]} for i in range(8)]
    return write(root / "videomme.jsonl", records), root


def evaluate(folder, data: str, videos: Path, output: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kangaroo.cli", "eval", "--model", str(folder), "--benchmark",
                           "videomme", "--data", data, "--videos", str(videos), "--output", str(output), "--quiet",
                           *extra], capture_output=True, text=True, timeout=600, **kwargs)


def test_two_processes_give_the_results_of_one_and_missing_videos_are_counted(random_model_folder, benchmark,
                                                                            tmp_path):
    data, videos = benchmark
    one = evaluate(random_model_folder[0], data, videos, tmp_path / "one", "--mode", "likelihood")
    two = evaluate(random_model_folder[0], data, videos, tmp_path / "two", "--mode", "likelihood", "--devices", "2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    first, second = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two"))
    assert first == second
    assert first["questions"] == 8 and first["scored"] == 7 and first["missing_media"] == 1
    assert first["missing"][0]["id"] == "q5" and "missing file" in first["missing"][0]["error"]
    assert set(first["categories"]) == {"duration", "task_type", "domain"}
    assert sum(row["scored"] for row in first["categories"]["duration"].values()) == 7
    lines = [json.loads(line) for line in (tmp_path / "two" / "samples.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"q{i}" for i in range(8)]
    assert first["correct"] == sum(line.get("correct", False) for line in lines)
    assert "accuracy" in one.stdout and "missing or undecodable media" in one.stdout


def test_a_killed_eval_resumes_without_asking_finished_questions_again(random_model_folder, benchmark, tmp_path):
    data, videos = benchmark
    journal = tmp_path / "run" / "samples.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "kangaroo.cli", "eval", "--model", str(random_model_folder[0]),
                                "--benchmark", "videomme", "--data", data, "--videos", str(videos), "--output",
                                str(tmp_path / "run"), "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while (not journal.exists() or len(journal.read_text().splitlines()) < 3) and time.time() < deadline:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = [json.loads(line) for line in journal.read_text().splitlines() if line.endswith("}")]
    assert 3 <= len(before) < 8, "killed part way"
    resumed = evaluate(random_model_folder[0], data, videos, tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = [json.loads(line) for line in journal.read_text().splitlines()]
    assert after[:len(before)] == before, "finished answers kept as they were"
    assert sorted(line["id"] for line in after) == sorted(f"q{i}" for i in range(8)), "each question answered once"
    whole = evaluate(random_model_folder[0], data, videos, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == \
        json.loads((tmp_path / "whole" / "results.json").read_text())


def test_replies_without_a_letter_count_wrong_and_are_listed(random_model_folder, benchmark, tmp_path):
    """A random model replies with words, not letters: every such reply is wrong and listed,
    never a random pick."""
    data, videos = benchmark
    out = evaluate(random_model_folder[0], data, videos, tmp_path / "gen", "--frames", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "gen" / "results.json").read_text())
    lines = [json.loads(line) for line in (tmp_path / "gen" / "samples.jsonl").read_text().splitlines()]
    no_letter = [line["id"] for line in lines if "error" not in line and line["letter"] == ""]
    assert no_letter, "a random model's replies hold no option letter"
    assert results["no_letter"] == no_letter
    assert all(not line["correct"] for line in lines if line.get("letter") == "")
    assert results["correct"] == sum(line["correct"] for line in lines if "error" not in line)
    assert all(line["prompt"].startswith("Select the best answer") for line in lines if "error" not in line)
    other = evaluate(random_model_folder[0], data, videos, tmp_path / "gen", "--mode", "likelihood")
    assert other.returncode == 2 and "holds the answers of another evaluation (it differs in ['mode', 'sampling'])" \
        in other.stderr, other.stderr[-2000:]


# -- on a trained model ----------------------------------------------------------------------------


def test_eval_of_the_trained_model_agrees_with_its_logged_validation_accuracy(trained_model, tmp_path):
    """The stage's ``val/accuracy`` (teacher-forced first answer token) and ``kangaroo eval`` in
    generation mode (greedy reply, letter read from it) on the same held-out clips."""
    out = subprocess.run([sys.executable, "-m", "kangaroo.cli", "eval", "--model", str(trained_model.folder),
                          "--benchmark", "manifest", "--data", str(trained_model.val_manifest), "--output",
                          str(tmp_path), "--quiet"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert trained_model.val_accuracy >= 0.75, f"the model learned colours: {trained_model.val_accuracy}"
    assert abs(results["accuracy"] - trained_model.val_accuracy) <= 0.05, (results["accuracy"], trained_model.val_accuracy)
    assert results["categories"]["category"]["colour"]["scored"] == results["scored"] == 24


def test_kangaroo_validate_on_the_stage_checkpoint_gives_the_logged_validation_accuracy(trained_model, tmp_path):
    """`kangaroo validate --config STAGE --ckpt_path CKPT` (LightningCLI's validate) scores the
    stage's last checkpoint on its held-out clips: the accuracy the fit logged after that step."""
    import re

    checkpoint = max(trained_model.stage_dir.rglob("*.ckpt"), key=lambda path: path.stat().st_mtime)
    out = subprocess.run([sys.executable, "-m", "kangaroo.cli", "validate", "--config", str(trained_model.stage_file),
                          "--ckpt_path", str(checkpoint), f"--trainer.default_root_dir={tmp_path}",
                          f"--trainer.logger.init_args.save_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr[-2000:]
    shown = re.search(r"val/accuracy\s*[│|]\s*([0-9.]+)", out.stdout)
    assert shown, out.stdout[-2000:]
    assert abs(float(shown.group(1)) - trained_model.val_accuracy) <= 1e-4, (shown.group(1), trained_model.val_accuracy)
    assert not list(trained_model.stage_dir.rglob("version_1")), "the shared stage folder is left as it was"
