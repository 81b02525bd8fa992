"""Real-time questions in the OVO-Bench style: multiple-choice questions asked at given seconds of a
stream, answered by the model in that second's turn, scored per task.

Questions file: JSONL, one question per line:
  {"time": 42.0, "task": "score", "question": "What is the score?",
   "options": ["zero to zero", "one to zero", "zero to one"], "answer": "B", "id": "q7"}
  time      seconds on the video's timeline; the question joins the user turn of the second it
            falls in (as training's qa_stream and `svlm serve` ask), at most one question a second
  task      optional name the results are grouped by (default "all")
  options   2 to 26 distinct non-empty strings, lettered A, B, C, ... in this order
  answer    the right option's letter
  id        optional (default: the line number)
The model is asked `question_text`: the question, the lettered options and "Answer with the
option's letter." through `StreamingSession.step_batch(..., questions=...)`, which checks that it fits
the cache's question room (`max_question_tokens`); its reply is that second's answer. The reply
chooses an option when it starts with a valid letter ("B", "(B) ...", "Answer: B"), or else when
exactly one option's words appear in it in order ("Score one to zero." chooses "one to zero");
otherwise it is unparsed and counted wrong. Accuracy per task, over all questions (micro) and as
the mean of the tasks (macro, as OVO-Bench averages its tasks).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import string
from pathlib import Path
from typing import Iterable, Sequence

from svlm_jax.evaluation.metrics import words_of
from svlm_jax.train.data import DataError, Sample, _number, _shown

LETTERS = string.ascii_uppercase
LEADING_LETTER = re.compile(r"^[\s*_`\"'(\[]*(?:(?i:answer)\s*[:\-]?[\s*_`\"'(\[]*)?([A-Z])(?![A-Za-z])")
FIELDS = {"time", "task", "question", "options", "answer", "id"}


@dataclasses.dataclass(frozen=True)
class Question:
    line: int
    id: str
    time: float
    task: str
    question: str
    options: tuple[str, ...]
    answer: str  # a letter


def _question(record, where: str, line_no: int) -> Question:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a question must be a JSON object, got {_shown(record)}")
    missing = sorted({"time", "question", "options", "answer"} - set(record))
    unknown = sorted(set(record) - FIELDS)
    if missing or unknown:
        raise DataError(f"{where}: missing fields {missing}, unknown fields {unknown}")
    time_s, question, options = _number(record["time"]), record["question"], record["options"]
    task, answer, qid = record.get("task", "all"), record["answer"], record.get("id", str(line_no))
    if time_s is None or time_s < 0:
        raise DataError(f"{where}: time must be a non-negative number of seconds, got {_shown(record['time'])}")
    for name, value in (("question", question), ("task", task), ("id", qid)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: {name} must be a non-empty string, got {_shown(value)}")
    if (not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS)
            or not all(isinstance(o, str) and o.strip() for o in options) or len(set(options)) != len(options)):
        raise DataError(f"{where}: options must be 2 to {len(LETTERS)} distinct non-empty strings, got {_shown(options)}")
    if answer not in LETTERS[:len(options)]:
        raise DataError(f"{where}: answer must be one of the options' letters {', '.join(LETTERS[:len(options)])}, "
                        f"got {_shown(answer)}")
    return Question(line_no, qid, time_s, task, question.strip(), tuple(o.strip() for o in options), answer)


def read_questions(path: str | Path) -> list[Question]:
    """The questions of a JSONL file (see the module docstring); errors name the file and the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the questions: {getattr(e, 'strerror', None) or e}") from None
    questions = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg}); each line must be one question") from None
        questions.append(_question(record, f"{path}:{line_no}", line_no))
    if not questions:
        raise DataError(f"{path}: no questions")
    ids = collections.Counter(q.id for q in questions)
    if twice := [qid for qid, n in ids.items() if n > 1]:
        raise DataError(f"{path}: question id {twice[0]!r} is used more than once")
    return questions


def question_text(question: Question) -> str:
    """What the model is asked: the question, its lettered options and how to answer."""
    options = " ".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(question.options))
    return f"{question.question} Options: {options} Answer with the option's letter."


def parse_choice(reply: str, options: Sequence[str]) -> str | None:
    """The letter a reply chooses (see the module docstring), or None."""
    match = LEADING_LETTER.match(reply)
    if match and match.group(1) in LETTERS[:len(options)]:
        return match.group(1)
    said = f" {' '.join(words_of(reply))} "
    found = [LETTERS[i] for i, option in enumerate(options) if words_of(option)
             and f" {' '.join(words_of(option))} " in said]
    return found[0] if len(found) == 1 else None


def question_seconds(questions: Sequence[Question], start_s: float, source: str) -> dict[int, Question]:
    """The question of each asked second of a stream starting at `start_s` (one a second)."""
    span = Sample(video=None, video_start=start_s, video_end=start_s, words=())
    by_second: dict[int, Question] = {}
    for q in questions:
        k = span.second_of(q.time)
        if k < 0:
            raise DataError(f"{source}:{q.line}: time {q.time} s is before the stream's start ({start_s} s)")
        if k in by_second:
            raise DataError(f"{source}:{q.line}: a second question in the second from {start_s + k} s (line "
                            f"{by_second[k].line} asks there); a second carries one question")
        by_second[k] = q
    return by_second


def ask_questions(session, seconds: Iterable, questions: Sequence[Question], start_s: float,
                  source: str) -> dict[str, str]:
    """Stream `seconds` (VideoSeconds from `start_s`) through `session` (batch 1) until the last
    question is answered; the reply to each question asked, by id (a question after the end of
    the video is missing)."""
    by_second = question_seconds(questions, start_s, source)
    for q in questions:
        try:
            session.check_question(question_text(q))
        except ValueError as e:
            raise DataError(f"{source}:{q.line}: {e}") from None
    replies, last = {}, max(by_second)
    for k, second in enumerate(seconds):
        q = by_second.get(k)
        text = session.step_batch([second.frames_thwc], [second.t_start], [second.t_end],
                                  questions=[question_text(q) if q else None])[0]
        if q is not None:
            replies[q.id] = text
        if k == last:
            break
    return replies


def score_questions(questions: Sequence[Question], replies: dict[str, str]) -> dict:
    """Per question its reply and choice; per task and overall the accuracy (see the module docstring)."""
    rows, tasks = [], collections.defaultdict(lambda: collections.Counter())
    for q in questions:
        reply = replies.get(q.id)
        choice = None if reply is None else parse_choice(reply, q.options)
        counts = tasks[q.task]
        if reply is None:
            counts["not_asked"] += 1
        else:
            counts["asked"] += 1
            counts["correct"] += choice == q.answer
            counts["unparsed"] += choice is None
        rows.append({"id": q.id, "task": q.task, "time": q.time, "question": q.question, "answer": q.answer,
                     "reply": reply, "choice": choice, "correct": reply is not None and choice == q.answer})
    per_task = {task: {"asked": c["asked"], "correct": c["correct"], "unparsed": c["unparsed"],
                       "not_asked": c["not_asked"], "accuracy": c["correct"] / c["asked"] if c["asked"] else None}
                for task, c in sorted(tasks.items())}
    asked = sum(t["asked"] for t in per_task.values())
    rated = [t["accuracy"] for t in per_task.values() if t["accuracy"] is not None]
    return {"questions": len(questions), "asked": asked,
            "accuracy": sum(t["correct"] for t in per_task.values()) / asked if asked else None,
            "mean_task_accuracy": sum(rated) / len(rated) if rated else None,
            "tasks": per_task, "answers": rows}
