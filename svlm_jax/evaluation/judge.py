"""The Inf-Streams-Eval comparison: a judge model says which of two commentaries of the same
window of video is better, asked in both orders.

Windows: the evaluated seconds are cut into consecutive windows of `window_s` seconds (the last may
be shorter); each side's text of a window is one line per second that says something,
"HH:MM:SS text". A window where neither side says anything is not judged (counted as silent).

Protocol: per window two requests, the model's commentary as A then as B. The model wins the
window when the judge prefers it in both orders, loses when it prefers the reference in both,
and the window is a tie when the orders disagree (a judge that follows the position, not the
text). Win rate = (wins + ties / 2) / judged windows, with a Wilson score interval: for outcomes
in {0, 1/2, 1} the variance is at most the Bernoulli one, so the interval errs wide.

The judge is any OpenAI-compatible chat-completions endpoint (POST {"model", "messages",
"temperature": 0}; the answer is choices[0].message.content). An answer counts when it is the
capital letter A or B (optionally after "Answer:", bracketed, bold, or followed by punctuation and
words: "B. Because...");
anything else, a timeout, a refused connection, HTTP 408/429/5xx are retried `attempts` times in
all and then reported with the window, never counted. Other HTTP errors (a wrong key, model or
URL) stop the run: every request would fail the same way.

Cache: every counted answer is appended (and flushed) to a JSONL file keyed by the SHA-256 of the
exact request (URL and body; never the key), so a re-run asks nothing it has an answer to and
reproduces the same verdicts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import re
import statistics
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from svlm_jax.cli import clock
from svlm_jax.train.data import DataError

SYSTEM_PROMPT = ("You judge live commentary of a video. You are shown two commentaries of the same stretch of "
                 "video, one line per second that says something, each line starting with the time. The better "
                 "commentary says what happens when it happens, accurately, fluently and without repeating "
                 "itself; silence is better than wrong or empty talk.")
USER_PROMPT = ("Video from {start} to {end}.\n\nCommentary A:\n{a}\n\nCommentary B:\n{b}\n\n"
               "Which commentary is better? Answer with one letter: A or B.")
SILENT = "(says nothing)"
RETRIED_HTTP = (408, 429)  # and every 5xx
_OPEN = r"[\s*_`\"'(\[]*"
ANSWER = re.compile(rf"^{_OPEN}(?:(?i:answer)\s*[:\-]?{_OPEN})?([AB])(?:[\s*_`\"')\].,:;!]|$)")


class JudgeError(DataError):
    """The judge cannot be used at all (a wrong key, URL or model; an unreadable cache)."""


@dataclasses.dataclass(frozen=True)
class Window:
    start: float
    end: float
    model: str      # the model's lines, "" when it says nothing
    reference: str  # the reference's lines


def window_lines(t_starts: Sequence[float], texts: Sequence[str]) -> str:
    return "\n".join(f"{clock(t)} {text.strip()}" for t, text in zip(t_starts, texts, strict=True) if text.strip())


def cut_windows(t_starts: Sequence[float], model_texts: Sequence[str], reference_texts: Sequence[str],
                window_s: int) -> list[Window]:
    """The windows of `window_s` seconds of the evaluated seconds (which start at `t_starts`)."""
    if window_s < 1:
        raise ValueError(f"window_s must be >= 1, got {window_s}")
    windows = []
    for i in range(0, len(t_starts), window_s):
        part = slice(i, i + window_s)
        windows.append(Window(t_starts[i], t_starts[part][-1] + 1, window_lines(t_starts[part], model_texts[part]),
                              window_lines(t_starts[part], reference_texts[part])))
    return windows


def request_body(model: str, window: Window, model_first: bool) -> dict:
    a, b = (window.model, window.reference) if model_first else (window.reference, window.model)
    user = USER_PROMPT.format(start=clock(window.start), end=clock(window.end), a=a or SILENT, b=b or SILENT)
    return {"model": model, "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                         {"role": "user", "content": user}], "temperature": 0}


def request_key(url: str, body: dict) -> str:
    canonical = json.dumps({"url": url, "body": body}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def parse_answer(content) -> str | None:
    """"A" or "B" when the answer is that letter (see the module docstring), else None."""
    match = ANSWER.match(content) if isinstance(content, str) else None
    return match.group(1) if match else None


class JudgeCache:
    """The JSONL of counted answers: {"key", "request", "content", "answer"} per line."""

    def __init__(self, path: Path):
        self.path = path
        self.answers: dict[str, str] = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise JudgeError(f"judge cache {self.path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key, answer = record["key"], record["answer"]
                if answer not in ("A", "B") or not isinstance(key, str):
                    raise ValueError(answer)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                if line_no == len(lines):  # the last line of a run that was killed while writing it
                    continue
                raise JudgeError(f"judge cache {self.path}:{line_no}: not a cached answer; delete the line (or "
                                 "the file, to ask everything again)") from None
            self.answers[key] = answer

    def add(self, key: str, body: dict, content: str, answer: str) -> None:
        record = {"key": key, "request": body, "content": content, "answer": answer}
        try:
            with self.path.open("a", encoding="utf-8") as file:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
        except OSError as e:
            raise JudgeError(f"judge cache {self.path}: cannot write: {e.strerror or e}") from None
        self.answers[key] = answer


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    url: str             # the chat-completions endpoint (`chat_url` of a base URL)
    model: str
    api_key: str | None  # sent as a bearer token; never stored
    timeout_s: float
    attempts: int        # tries per request, the first included
    retry_wait_s: float  # wait before try k + 1: k * retry_wait_s


def chat_url(url: str) -> str:
    """The chat-completions endpoint of a base URL ("http://host/v1") or of the endpoint itself."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


@dataclasses.dataclass(frozen=True)
class Asked:
    answer: str | None         # "A", "B", or None when no try gave one
    cached: bool
    problems: tuple[str, ...]  # what went wrong, one per failed try


def post_chat(config: JudgeConfig, body: dict) -> str:
    """The content of the endpoint's answer to `body`; OSError or ValueError for what may pass on a
    retry, JudgeError for what will not."""
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    request = urllib.request.Request(config.url, data=json.dumps(body).encode("utf-8"), headers=headers,
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=config.timeout_s) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode("utf-8", "replace")
        if e.code in RETRIED_HTTP or e.code >= 500:
            raise OSError(f"HTTP {e.code} {e.reason}: {detail}") from None
        raise JudgeError(f"judge {config.url}: HTTP {e.code} {e.reason}: {detail}") from None
    except http.client.HTTPException as e:
        raise OSError(f"{type(e).__name__}: {e}") from None
    try:
        return json.loads(raw)["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        raise ValueError(f"not a chat completion: {raw[:200]!r}") from None


def ask(config: JudgeConfig, cache: JudgeCache, body: dict) -> Asked:
    """The judge's answer to one request: from the cache, or asked up to `config.attempts` times."""
    key = request_key(config.url, body)
    if key in cache.answers:
        return Asked(cache.answers[key], True, ())
    problems = []
    for attempt in range(config.attempts):
        if attempt:
            time.sleep(attempt * config.retry_wait_s)
        try:
            content = post_chat(config, body)
        except JudgeError:  # a ValueError too, but one no retry mends
            raise
        except TimeoutError:
            problems.append(f"no answer within {config.timeout_s} s")
            continue
        except urllib.error.URLError as e:
            reason = e.reason
            problems.append(f"no answer within {config.timeout_s} s" if isinstance(reason, TimeoutError)
                            else f"cannot reach the judge: {reason}")
            continue
        except (OSError, ValueError) as e:
            problems.append(str(e))
            continue
        answer = parse_answer(content)
        if answer is None:
            problems.append(f"answered {content[:80]!r}, not A or B" if isinstance(content, str)
                            else f"answered {content!r}, not text")
            continue
        cache.add(key, body, content, answer)
        return Asked(answer, False, ())
    return Asked(None, False, tuple(problems))


@dataclasses.dataclass(frozen=True)
class Verdict:
    window: Window
    model_first: Asked   # the model's commentary as A
    model_second: Asked  # the model's commentary as B

    @property
    def outcome(self) -> str | None:
        """"win", "loss" or "tie" for the model; None when an order has no answer."""
        if self.model_first.answer is None or self.model_second.answer is None:
            return None
        first, second = self.model_first.answer == "A", self.model_second.answer == "B"
        return "win" if first and second else "loss" if not (first or second) else "tie"


def judge_windows(config: JudgeConfig, cache: JudgeCache, windows: Sequence[Window]) -> list[Verdict]:
    """Both orders of every window where a side says something."""
    return [Verdict(w, ask(config, cache, request_body(config.model, w, True)),
                    ask(config, cache, request_body(config.model, w, False)))
            for w in windows if w.model or w.reference]


def wilson_interval(rate: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `rate` observed over `n` trials."""
    if n < 1:
        raise ValueError("an interval needs at least one trial")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    denominator = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denominator
    half = z * ((rate * (1 - rate) / n + z * z / (4 * n * n)) ** 0.5) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(verdicts: Sequence[Verdict], n_windows: int, confidence: float = 0.95) -> dict:
    """Wins, ties, losses, the win rate and its interval over the windows judged in both orders;
    the windows not judged (silent on both sides, or a judge failure) counted apart."""
    outcomes = [v.outcome for v in verdicts]
    wins, ties, losses = (outcomes.count(kind) for kind in ("win", "tie", "loss"))
    judged = wins + ties + losses
    rate = (wins + ties / 2) / judged if judged else None
    failed = [{"start": v.window.start, "end": v.window.end,
               "problems": [*v.model_first.problems, *v.model_second.problems]} for v in verdicts if v.outcome is None]
    return {"windows": n_windows, "silent_windows": n_windows - len(verdicts), "judged": judged, "wins": wins,
            "ties": ties, "losses": losses, "win_rate": rate,
            "interval": {"method": "wilson", "confidence": confidence,
                         "bounds": list(wilson_interval(rate, judged, confidence)) if judged else None},
            "requests": 2 * len(verdicts),
            "cached_answers": sum(a.cached for v in verdicts for a in (v.model_first, v.model_second)),
            "failed": failed}
