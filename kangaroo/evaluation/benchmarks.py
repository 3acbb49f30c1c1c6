"""Readers for the video benchmarks in the layouts they publish (the field names lmms-eval
reads), their prompt templates, and the option letter read from a reply.

Each reader turns one record into a ``Question``: the video's path (relative to ``--videos``),
the full prompt, the option letters, the answer letter and the categories its results are
grouped by. A data file is a JSON list or JSON lines.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from kangaroo.data.manifest import MCQ_SUFFIX, OPTION_LETTERS

ANSWER_WITH_LETTER = "Answer with the option's letter from the given choices directly."


@dataclass
class Question:
    id: str
    video: str
    """The media path: relative to ``--videos`` (or absolute)."""
    prompt: str
    letters: str
    answer: str
    categories: dict[str, str] = field(default_factory=dict)


class BenchmarkError(ValueError):
    """A benchmark file that cannot be read; the message names the line and field."""


def _need(record: dict[str, Any], names: tuple[str, ...], where: str) -> None:
    missing = [name for name in names if name not in record]
    if missing:
        raise BenchmarkError(f"{where}: missing field(s) {missing}")


def _letters(count: int, where: str) -> str:
    if not 2 <= count <= len(OPTION_LETTERS):
        raise BenchmarkError(f"{where}: {count} options (2 to {len(OPTION_LETTERS)} are allowed)")
    return OPTION_LETTERS[:count]


def _letter_list(letters: str) -> str:
    return ", ".join(letters[:-1]) + f", or {letters[-1]}"


def _index_answer(value: Any, letters: str, where: str, name: str) -> str:
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise BenchmarkError(f"{where}: field {name!r} must be an option index, got {value!r}") from None
    if not 0 <= index < len(letters):
        raise BenchmarkError(f"{where}: field {name!r} = {index} is not one of the {len(letters)} options")
    return letters[index]


def _letter_answer(value: Any, letters: str, where: str, name: str = "answer") -> str:
    letter = str(value).strip().strip("()").rstrip(".").upper()
    if letter not in letters or len(letter) != 1:
        raise BenchmarkError(f"{where}: field {name!r} must be one of {list(letters)}, got {value!r}")
    return letter


_OPTION_PREFIX = re.compile(r"^\(?([A-J])[.)]\s*")


def _strip_letter(option: str) -> str:
    return _OPTION_PREFIX.sub("", option.strip(), count=1)


def _choices(record: dict[str, Any], field: str, where: str) -> tuple[list, str]:
    """The record's list of choices in ``field`` and their letters."""
    choices = record[field]
    if not isinstance(choices, list):
        raise BenchmarkError(f"{where}: field '{field}' must be a list")
    return choices, _letters(len(choices), where)


def video_mme(record: dict[str, Any], where: str) -> Question:
    _need(record, ("videoID", "question_id", "duration", "task_type", "question", "options", "answer"), where)
    options, letters = _choices(record, "options", where)
    shown = [f"{letter}. {_strip_letter(str(option))}" for letter, option in zip(letters, options)]
    prompt = ("Select the best answer to the following multiple-choice question based on the video. Respond with only "
              f"the letter ({_letter_list(letters)}) of the correct option.\n{record['question']}\n" + "\n".join(shown)
              + "\n\n" + ANSWER_WITH_LETTER)
    categories = {"duration": str(record["duration"]), "task_type": str(record["task_type"])}
    if "domain" in record:
        categories["domain"] = str(record["domain"])
    return Question(str(record["question_id"]), _with_suffix(str(record["videoID"]), ".mp4"), prompt, letters,
                    _letter_answer(record["answer"], letters, where), categories)


def mvbench(record: dict[str, Any], where: str) -> Question:
    _need(record, ("video", "question", "candidates", "answer"), where)
    candidates, letters = _choices(record, "candidates", where)
    if record["answer"] not in candidates:
        raise BenchmarkError(f"{where}: field 'answer' {record['answer']!r} is none of the candidates")
    options = "".join(f"({letter}) {option}\n" for letter, option in zip(letters, candidates))
    prompt = f"Question:{record['question']}\nOption:\n{options}Only give the best option.\n"
    subtask = str(record.get("sub_task", record.get("task_type", "mvbench")))
    return Question(str(record.get("id", f"{record['video']}:{record['question']}")), str(record["video"]), prompt,
                    letters, letters[candidates.index(record["answer"])], {"subtask": subtask})


_INLINE_OPTION = re.compile(r"\(([A-J])\)")


def mlvu(record: dict[str, Any], where: str) -> Question:
    _need(record, ("video_name", "question", "answer", "task_type"), where)
    found = _INLINE_OPTION.findall(record["question"])
    letters = "".join(dict.fromkeys(found))
    if letters != OPTION_LETTERS[:len(letters)] or len(letters) < 2:
        raise BenchmarkError(f"{where}: field 'question' must hold its options as (A) ... (B) ..., found {found}")
    answer = str(record["answer"])
    candidates = record.get("candidates")
    if isinstance(candidates, list) and answer in candidates:
        answer = letters[candidates.index(answer)]
    prompt = f"{record['question']}\nOnly give the best option.\nBest option: ("
    return Question(str(record.get("question_id", f"{record['video_name']}:{record['question'][:40]}")),
                    str(record["video_name"]), prompt, letters, _letter_answer(answer, letters, where),
                    {"task_type": str(record["task_type"])})


def longvideobench(record: dict[str, Any], where: str) -> Question:
    _need(record, ("video_path", "question", "option0", "option1", "correct_choice"), where)
    options = [record[f"option{i}"] for i in range(5) if record.get(f"option{i}", "N/A") != "N/A"]
    letters = _letters(len(options), where)
    body = "\n".join(f"{letter}. {option}" for letter, option in zip(letters, options))
    prompt = f"{record['question']}\n{body}\n{ANSWER_WITH_LETTER}\n"
    categories = {name: str(record[name]) for name in ("duration_group", "question_category") if name in record}
    return Question(str(record.get("id", record["video_path"])), str(record["video_path"]), prompt, letters,
                    _index_answer(record["correct_choice"], letters, where, "correct_choice"), categories)


def egoschema(record: dict[str, Any], where: str) -> Question:
    _need(record, ("video_idx", "question", "option", "answer"), where)
    options, letters = _choices(record, "option", where)
    body = "".join(f"\n{letter}. {_strip_letter(str(option))}" for letter, option in zip(letters, options))
    prompt = f"{record['question']}{body}\n{ANSWER_WITH_LETTER}"
    return Question(str(record.get("question_idx", record["video_idx"])), _with_suffix(str(record["video_idx"]), ".mp4"),
                    prompt, letters, _index_answer(record["answer"], letters, where, "answer"))


def manifest_mcq(record: dict[str, Any], where: str) -> Question:
    """The project's own manifests (``task: mcq``), prompted exactly as training prompted them."""
    from kangaroo.data.manifest import mcq_conversation

    _need(record, ("id", "question", "options", "answer"), where)
    if record.get("task") != "mcq":
        raise BenchmarkError(f"{where}: field 'task' must be 'mcq', got {record.get('task')!r}")
    media = record.get("video", record.get("image"))
    if media is None:
        raise BenchmarkError(f"{where}: missing field(s) ['video' or 'image']")
    language = (record.get("meta") or {}).get("language", "en")
    try:
        conversation = mcq_conversation(record, language if language in MCQ_SUFFIX else "en")
    except ValueError as err:
        raise BenchmarkError(f"{where}: {err}") from None
    letters = OPTION_LETTERS[:len(record["options"])]
    category = (record.get("meta") or {}).get("category")
    return Question(str(record["id"]), str(media), conversation[0]["content"], letters, record["answer"],
                    {"category": str(category)} if category else {})


def _with_suffix(name: str, suffix: str) -> str:
    return name if os.path.splitext(name)[1] else name + suffix


READERS: dict[str, Callable[[dict[str, Any], str], Question]] = {
    "videomme": video_mme,
    "mvbench": mvbench,
    "mlvu": mlvu,
    "longvideobench": longvideobench,
    "egoschema": egoschema,
    "manifest": manifest_mcq,
}
"""Benchmark name -> reader of one record."""


def read_benchmark(name: str, path: str) -> list[Question]:
    """Every question of ``path`` in benchmark ``name``'s layout. An unknown name lists the known
    ones; a record with a missing or malformed field names its line and the field; two records
    with one id are an error."""
    if name not in READERS:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {sorted(READERS)}")
    reader = READERS[name]
    questions, seen = [], set()
    for number, record in _records(path):
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise BenchmarkError(f"{where}: a record must be a JSON object")
        question = reader(record, where)
        if question.id in seen:
            raise BenchmarkError(f"{where}: question id {question.id!r} appears twice")
        seen.add(question.id)
        questions.append(question)
    if not questions:
        raise BenchmarkError(f"{path}: no questions")
    return questions


def _records(path: str) -> list[tuple[int, Any]]:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise BenchmarkError(f"cannot read benchmark file {path}: {err}") from err
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as err:
            raise BenchmarkError(f"{path}: not valid JSON: {err}") from err
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise BenchmarkError(f"{path}:{number}: not valid JSON: {err}") from err
    return records


# -- reading the letter of a reply ------------------------------------------------------------

_ANSWER_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
                   "best answer is", "the correct option is", "correct option is", "the best option is",
                   "best option is", "the choice is", "choice is", "the correct choice is", "correct choice is",
                   "i choose", "i select", "i pick", "my answer is", "my choice is", "答案是", "答案为", "选")
_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
             "space": 2, "fallback": 0}


def extract_letter(reply: str, letters: str = "ABCD") -> str:
    """The option letter a reply gives, or ``""`` when it gives none (counted wrong, never a
    random pick). The rules of lmms-eval's ``extract_mcq_answer``: a letter opening or closing
    the reply, after an answer phrase, in parentheses, before a period, colon or parenthesis,
    before a space, and only then anywhere, the strongest and then the last match winning.
    Written here rather than imported: lmms-eval is an optional extra, and eval must not need it."""
    text = reply.strip()
    for char in (",", ".", "!", "?", ";", ":", "'", '"'):
        text = text.strip(char)
    stripped = text.strip()
    padded = f" {text} "
    candidates: list[tuple[int, int, str]] = []
    for letter in letters:
        for form, kind in ((f"({letter})", "parentheses"), (f"{letter}.", "period"), (f"{letter}:", "colon"),
                           (f"{letter})", "right_paren"), (f" {letter} ", "space")):
            position = padded.rfind(form)
            if position >= 0 and (kind == "space" or position == 0 or not padded[position - 1].isalpha()
                                  or kind == "parentheses"):
                candidates.append((_PRIORITY[kind], position, letter))
        if stripped.startswith(letter) and (len(stripped) == 1 or not stripped[1].isalpha()):
            candidates.append((_PRIORITY["start"], 0, letter))
        if stripped.endswith(letter) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            candidates.append((_PRIORITY["end"], len(stripped), letter))
    lowered = padded.lower()
    for phrase in _ANSWER_PHRASES:
        at = lowered.find(phrase)
        if at < 0:
            continue
        after = padded[at + len(phrase):]
        found = [(after.find(letter), letter) for letter in letters if letter in after]
        if found:
            position, letter = min(found)
            candidates.append((_PRIORITY["phrase"], at + len(phrase) + position, letter))
    if not candidates:
        candidates = [(_PRIORITY["fallback"], padded.find(letter), letter) for letter in letters if letter in text]
    if not candidates:
        return ""
    return max(candidates)[2]
