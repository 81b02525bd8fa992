"""`svlm eval`: the judge protocol against a real HTTP judge on loopback that answers by a known rule
(win rate, both orders, ties, the cache, retries, failures never counted), the Wilson interval
against published values, the judge-free metrics against hand-counted and brute-force answers,
the questions against a session stepped by hand, and the command end to end on a tiny random
model (its commentary is `svlm stream`'s)."""

from __future__ import annotations

import collections
import http.server
import itertools
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

import svlm_jax
from svlm_jax import cli
from svlm_jax.evaluation import judge, metrics, qa
from svlm_jax.evaluation.reference import read_reference, reference_by_second
from svlm_jax.media.video import VideoReader
from svlm_jax.stream_format import CachePolicy
from svlm_jax.streaming import SamplingConfig, StreamConfig, StreamingSession
from svlm_jax.synth import MatchConfig, RenderConfig, stream_seconds
from svlm_jax.synth.dataset import opening_frame, write_video
from svlm_jax.train.data import DataError

SLEEP_S = 1.0  # what the judge takes for a "SLOW" window, above the client's timeout


class RuleJudge(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint. The rule: prefer the commentary that says GOOD when only
    one does, else answer "A" (a judge that follows the position: a tie in the protocol). A window
    saying SLOW answers after SLEEP_S, GARBAGE answers prose, FLAKY answers prose on its first try,
    HTTP500 fails with 500 on its first try, DENIED with 401."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        key = json.dumps(body, sort_keys=True)
        with server.lock:
            server.requests.append(body)
            server.tries[key] += 1
            tries = server.tries[key]
        user = body["messages"][-1]["content"]
        a = user.split("Commentary A:\n")[1].split("\n\nCommentary B:\n")[0]
        b = user.split("\n\nCommentary B:\n")[1].split("\n\nWhich commentary")[0]
        if "DENIED" in user or ("HTTP500" in user and tries == 1):
            self.send_error(401 if "DENIED" in user else 500)
            return
        if "SLOW" in user:
            time.sleep(SLEEP_S)
        garbage = "GARBAGE" in user or ("FLAKY" in user and tries == 1)
        content = "I cannot decide." if garbage else "B" if "GOOD" in b and "GOOD" not in a else "A"
        payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload.encode())
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RuleJudge)
    server.daemon_threads = True
    server.requests, server.tries, server.lock = [], collections.Counter(), threading.Lock()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def config_for(server, **changes) -> judge.JudgeConfig:
    base = judge.JudgeConfig(url=judge.chat_url(f"http://127.0.0.1:{server.server_port}/v1"), model="rule-judge",
                             api_key=None, timeout_s=10.0, attempts=3, retry_wait_s=0.0)
    return judge.JudgeConfig(**{**base.__dict__, **changes})


def windows_of(pairs: list[tuple[str, str]]) -> list[judge.Window]:
    """One window of 2 s per (model, reference) pair, each side's text in its first second."""
    model = [text for m, _ in pairs for text in (m, "")]
    reference = [text for _, r in pairs for text in (r, "")]
    return judge.cut_windows([float(t) for t in range(len(model))], model, reference, 2)


def sides(body: dict) -> tuple[str, str]:
    user = body["messages"][-1]["content"]
    return (user.split("Commentary A:\n")[1].split("\n\nCommentary B:\n")[0],
            user.split("\n\nCommentary B:\n")[1].split("\n\nWhich commentary")[0])


def test_win_rate_both_orders_ties_and_the_cache(judge_server, tmp_path):
    pairs = [("GOOD goal", "a pass"),   # the judge prefers the model in both orders: a win
             ("a pass", "GOOD save"),   # a loss
             ("a pass", "a shot"),      # "A" both times: the orders disagree, a tie
             ("GOOD", "GOOD too"),      # a tie
             ("GOOD run", ""),          # a win over silence
             ("", ""),                  # silent on both sides: not judged
             ("FLAKY GOOD", "a foul")]  # prose first, retried, then a win
    windows = windows_of(pairs)
    config, cache_path = config_for(judge_server), tmp_path / "cache.jsonl"
    verdicts = judge.judge_windows(config, judge.JudgeCache(cache_path), windows)
    assert [v.outcome for v in verdicts] == ["win", "loss", "tie", "tie", "win", "win"]
    result = judge.win_rate(verdicts, len(windows))
    assert (result["wins"], result["ties"], result["losses"], result["judged"], result["silent_windows"]) == (3, 2, 1, 6, 1)
    assert result["win_rate"] == pytest.approx(4 / 6)
    # Wilson 95% of 4 of 6 (scipy.stats.binomtest(4, 6).proportion_ci(method="wilson"))
    assert result["interval"]["bounds"] == pytest.approx([0.2999933151383921, 0.9032285888942195], abs=1e-12)
    # Both orders of every judged window, the model's text as A, then as B; the flaky one's twice each.
    asked = [sides(body) for body in judge_server.requests]
    expected = []
    for w in (w for w in windows if w.model or w.reference):
        m, r = w.model or judge.SILENT, w.reference or judge.SILENT
        tries = 2 if "FLAKY" in m else 1  # prose at the first try of each order
        expected += [(m, r)] * tries + [(r, m)] * tries
    assert asked == expected
    assert all(body["model"] == "rule-judge" and body["temperature"] == 0 for body in judge_server.requests)
    assert len(cache_path.read_text().splitlines()) == 12  # every counted answer, the prose one not
    # A re-run asks nothing and reproduces every verdict.
    n_asked = len(judge_server.requests)
    again = judge.judge_windows(config, judge.JudgeCache(cache_path), windows)
    assert len(judge_server.requests) == n_asked
    assert [(v.model_first.answer, v.model_second.answer) for v in again] == [
        (v.model_first.answer, v.model_second.answer) for v in verdicts]
    assert judge.win_rate(again, len(windows))["cached_answers"] == 12
    # The key is the exact request: another judge model is asked again.
    judge.judge_windows(config_for(judge_server, model="other"), judge.JudgeCache(cache_path), windows[:1])
    assert len(judge_server.requests) == n_asked + 2


def test_timeouts_and_garbage_are_retried_then_reported_never_counted(judge_server, tmp_path):
    windows = windows_of([("SLOW GOOD", "x"), ("GARBAGE", "y"), ("HTTP500 GOOD", "z"), ("GOOD", "w")])
    config = config_for(judge_server, timeout_s=0.3, attempts=2)
    cache_path = tmp_path / "cache.jsonl"
    verdicts = judge.judge_windows(config, judge.JudgeCache(cache_path), windows)
    assert [v.outcome for v in verdicts] == [None, None, "win", "win"]
    tries = collections.Counter(sides(body) for body in judge_server.requests)
    # every try of a timeout, a prose answer or an HTTP 500, up to the bound; one of the rest
    assert [(tries[w.model, w.reference], tries[w.reference, w.model]) for w in windows] == [(2, 2), (2, 2), (2, 2),
                                                                                           (1, 1)]
    result = judge.win_rate(verdicts, len(windows))
    assert (result["judged"], result["wins"], result["win_rate"]) == (2, 2, 1.0)
    failed = {f["start"]: f["problems"] for f in result["failed"]}
    assert failed[0.0] == ["no answer within 0.3 s"] * 4
    assert failed[2.0] == ["answered 'I cannot decide.', not A or B"] * 4
    assert len(cache_path.read_text().splitlines()) == 4  # the two judged windows only
    with pytest.raises(judge.JudgeError, match="HTTP 401"):  # a wrong key stops at once
        judge.judge_windows(config, judge.JudgeCache(cache_path), windows_of([("DENIED", "v")]))


def test_an_unreachable_judge_is_reported_per_window(tmp_path):
    config = judge.JudgeConfig(url="http://127.0.0.1:9/v1/chat/completions", model="m", api_key=None,
                               timeout_s=1.0, attempts=2, retry_wait_s=0.0)
    verdicts = judge.judge_windows(config, judge.JudgeCache(tmp_path / "c.jsonl"), windows_of([("a", "b")]))
    assert verdicts[0].outcome is None
    assert all(p.startswith("cannot reach the judge") for p in verdicts[0].model_first.problems)


def test_cache_file_problems(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "k1", "answer": "A"}\n{"key": "k2", "ans')  # a run killed mid-line
    assert judge.JudgeCache(path).answers == {"k1": "A"}
    path.write_text('{"key": "k1", "answer": "A"}\nnot json\n{"key": "k2", "answer": "B"}\n')
    with pytest.raises(judge.JudgeError, match=r"cache.jsonl:2: not a cached answer"):
        judge.JudgeCache(path)


@pytest.mark.parametrize("k, n, low, high", [(8, 10, 0.4901624715366418, 0.9433178485456248),
                                             (0, 5, 0.0, 0.43448246478317476),
                                             (50, 100, 0.4038315303659956, 0.5961684696340044)])
def test_wilson_interval_known_values(k, n, low, high):
    """Values of scipy.stats.binomtest(k, n).proportion_ci(0.95, method="wilson")."""
    assert judge.wilson_interval(k / n, n) == pytest.approx((low, high), abs=1e-12)


def test_parse_answer():
    for content, answer in [("A", "A"), ("B.", "B"), ("**B** because it names the team", "B"), ("(A)", "A"),
                            ("Answer: B", "B"), ("A is better", "A"), ("a good one", None), ("Both", None), ("b", None), ("", None),
                            (None, None)]:
        assert judge.parse_answer(content) == answer, content


# ---------------------------------------------------------------- judge-free metrics

def test_word_agreement_hand_counted():
    model = ["Goal for Red!", "", "pass pass", "Shot"]
    reference = ["goal", "for red", "pass", ""]
    inside = metrics.word_agreement(model, reference, 0)
    assert (inside.matched, inside.model_words, inside.reference_words) == (2, 6, 4)
    assert (inside.precision, inside.recall) == (2 / 6, 2 / 4)
    near = metrics.word_agreement(model, reference, 1)
    assert (near.matched, near.precision, near.recall, near.f1) == (4, 4 / 6, 1.0, 0.8)
    assert metrics.silence_ratio(model) == 0.25 and metrics.words_per_second(model) == 1.5
    empty = metrics.word_agreement(["", ""], ["", ""], 1)
    assert (empty.precision, empty.recall, empty.f1) == (None, None, None)


def maximum_matching(model, reference, tolerance) -> int:
    """Kuhn's augmenting paths over (second, word) occurrences: an independent maximum matching."""
    left = [(s, w) for s, text in enumerate(model) for w in metrics.words_of(text)]
    right = [(s, w) for s, text in enumerate(reference) for w in metrics.words_of(text)]
    owner = [-1] * len(right)

    def augment(i, seen):
        for j, (t, w) in enumerate(right):
            if w == left[i][1] and abs(t - left[i][0]) <= tolerance and j not in seen:
                seen.add(j)
                if owner[j] < 0 or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return sum(augment(i, set()) for i in range(len(left)))


def test_word_agreement_is_a_maximum_matching(rng):
    vocabulary = ["goal", "pass", "red", "blue"]
    for _ in range(40):
        n = int(rng.integers(1, 8))
        texts = [[" ".join(rng.choice(vocabulary, int(rng.integers(0, 4)))) for _ in range(n)] for _ in range(2)]
        for tolerance in (0, 1, 2):
            assert (metrics.word_agreement(*texts, tolerance).matched
                    == maximum_matching(*texts, tolerance)), (texts, tolerance)


def test_latency_summary_leaves_the_first_second_apart():
    summary = metrics.latency_summary([5.0, 1.0, 2.0, 3.0], 2.0)
    assert (summary["first_s"], summary["mean_s"], summary["p50_s"], summary["max_s"]) == (5.0, 2.0, 2.0, 3.0)


def test_reference_per_second(tmp_path):
    transcript = tmp_path / "t.json"
    transcript.write_text(json.dumps([[10.2, 10.9, "one"], [10.95, 11.0, "two"], [11.5, 12.2, "three"],
                                      [13.1, 13.5, "late"]]))
    # a word belongs to the second its end falls in; from --start 10, 3 seconds
    assert reference_by_second(read_reference(transcript), 10.0, 3) == ["one", "two", "three"]
    commentary = tmp_path / "c.jsonl"
    commentary.write_text('{"start": 10.0, "end": 11.0, "text": "Goal!"}\n{"start": 12.0, "end": 13.0, "text": ""}\n')
    assert reference_by_second(read_reference(commentary), 10.0, 3) == ["Goal!", "", ""]
    commentary.write_text('{"start": 10.0, "end": 11.0, "text": "a"}\n{"start": 12.0}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: expected an object"):
        read_reference(commentary)


# ---------------------------------------------------------------- questions

OPTIONS = ("zero to zero", "one to zero", "zero to one")


def test_parse_choice():
    for reply, choice in [("B", "B"), ("(C) because", "C"), ("Answer: A", "A"), ("Score one to zero.", "B"),
                          ("D", None), ("one", None), ("zero to zero or one to zero", None), ("", None)]:
        assert qa.parse_choice(reply, OPTIONS) == choice, reply


def write_questions(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_questions_file_errors_name_the_line(tmp_path):
    good = {"time": 1.0, "question": "Score?", "options": list(OPTIONS), "answer": "B"}
    cases = [({**good, "answer": "D"}, r"q\.jsonl:2: answer must be one of the options' letters A, B, C"),
             ({**good, "options": ["x"]}, r"q\.jsonl:2: options must be 2 to 26"),
             ({**good, "when": 3}, r"q\.jsonl:2: missing fields \[\], unknown fields \['when'\]"),
             ({**good, "time": -1}, r"q\.jsonl:2: time must be a non-negative number")]
    for bad, message in cases:
        with pytest.raises(DataError, match=message):
            qa.read_questions(write_questions(tmp_path / "q.jsonl", [good, bad]))
    (tmp_path / "q.jsonl").write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(DataError, match=r"q\.jsonl:2: not valid JSON"):
        qa.read_questions(tmp_path / "q.jsonl")
    questions = qa.read_questions(write_questions(tmp_path / "q.jsonl", [good, {**good, "time": 1.7}]))
    with pytest.raises(DataError, match=r"q\.jsonl:2: a second question in the second from 1\.0 s \(line 1"):
        qa.question_seconds(questions, 0.0, "q.jsonl")


def test_scores_per_task():
    questions = [qa.Question(i + 1, f"q{i}", float(i), task, "Score?", OPTIONS, answer)
                 for i, (task, answer) in enumerate([("score", "B"), ("score", "A"), ("score", "C"), ("side", "A"),
                                                     ("side", "B")])]
    replies = {"q0": "B", "q1": "Score one to zero.", "q2": "no idea", "q3": "A"}  # q4: after the video ended
    result = qa.score_questions(questions, replies)
    assert result["tasks"]["score"] == {"asked": 3, "correct": 1, "unparsed": 1, "not_asked": 0, "accuracy": 1 / 3}
    assert result["tasks"]["side"] == {"asked": 1, "correct": 1, "unparsed": 0, "not_asked": 1, "accuracy": 1.0}
    assert (result["asked"], result["accuracy"], result["mean_task_accuracy"]) == (4, 0.5, (1 / 3 + 1) / 2)


SIDE, SECONDS = 56, 6
POLICY = CachePolicy(max_new_tokens=4, text_rounds=3, vision_window_s=2, text_sink=8, text_window=8)
GREEDY = SamplingConfig(temperature=0.0, repetition_penalty=1.0)
PIXELS = {"min_pixels": SIDE * SIDE, "max_pixels": SIDE * SIDE}


@pytest.fixture(scope="module")
def match_video(tmp_path_factory):
    """SECONDS of a synthetic match at 56x56 and its true words."""
    folder = tmp_path_factory.mktemp("eval_video")
    render = RenderConfig(height=SIDE, width=SIDE)
    items = list(itertools.islice(stream_seconds(MatchConfig(3), render), SECONDS))
    frames = itertools.chain([opening_frame(MatchConfig(3), 0, render)], *(item.frames for item in items))
    write_video(folder / "match.mp4", frames, render.fps, SIDE, SIDE)
    return folder / "match.mp4", [w for item in items for w in item.truth.words]


def test_questions_go_through_the_sessions_question_path(stream_model, stream_tokenizer, match_video):
    import dataclasses

    from svlm_jax.media.preprocess import VisionPreprocessConfig

    policy = dataclasses.replace(POLICY, max_question_tokens=80, max_answer_tokens=8)
    config = StreamConfig(policy=policy, sampling=GREEDY)
    preprocess = VisionPreprocessConfig(**PIXELS)
    questions = [qa.Question(1, "a", 1.5, "t", "Score?", OPTIONS, "A"), qa.Question(2, "b", 3.0, "t", "Who?",
                                                                                   ("Red", "Blue"), "B")]
    with VideoReader(match_video[0], fps=2) as reader:
        seconds = list(reader)
    consumed = []

    def counted():
        for second in seconds:
            consumed.append(second.t_start)
            yield second

    session = StreamingSession(stream_model, stream_tokenizer, config, preprocess=preprocess)
    replies = qa.ask_questions(session, counted(), questions, 0.0, "q.jsonl")
    assert consumed == [0.0, 1.0, 2.0, 3.0]  # stops after the last question
    by_hand = StreamingSession(stream_model, stream_tokenizer, config, preprocess=preprocess)
    asked = {1: qa.question_text(questions[0]), 3: qa.question_text(questions[1])}
    texts = [by_hand.step_batch([s.frames_thwc], [s.t_start], [s.t_end], questions=[asked.get(k)])[0]
             for k, s in enumerate(seconds[:4])]
    assert replies == {"a": texts[1], "b": texts[3]}
    short = StreamingSession(stream_model, stream_tokenizer, StreamConfig(policy=POLICY, sampling=GREEDY),
                             preprocess=preprocess)
    with pytest.raises(DataError, match=r"q\.jsonl:1: the question has \d+ tokens; this stream takes at most 0"):
        qa.ask_questions(short, iter(seconds), questions, 0.0, "q.jsonl")


# ---------------------------------------------------------------- the command end to end

FAST = ["--dtype", "float32", "--greedy", "--min-pixels", str(SIDE * SIDE), "--max-pixels", str(SIDE * SIDE),
        "--max-new-tokens", "4", "--text-rounds", "3", "--vision-window", "2", "--text-sink", "8",
        "--text-window", "8"]


@pytest.fixture(scope="module")
def model_dir(stream_model, stream_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoint")
    svlm_jax.save_pretrained(stream_model, path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(stream_tokenizer.name) / name, path / name)
    return path


def test_svlm_eval_end_to_end(model_dir, match_video, judge_server, tmp_path, capsys):
    video, words = match_video
    reference = tmp_path / "truth.json"
    reference.write_text(json.dumps([list(w) for w in words]))
    questions = write_questions(tmp_path / "q.jsonl", [
        {"time": 2.0, "task": "score", "question": "Score?", "options": list(OPTIONS), "answer": "A"},
        {"time": 4.5, "task": "side", "question": "Who?", "options": ["Red", "Blue"], "answer": "B", "id": "w"}])
    url = f"http://127.0.0.1:{judge_server.server_port}/v1"
    args = ["eval", "--model", str(model_dir), "--video", str(video), "--reference", str(reference),
            "--questions", str(questions), "--out", str(tmp_path / "out"), "--window", "2", "--judge-url", url,
            "--judge-model", "rule-judge", "--judge-retry-wait", "0", "--max-question-tokens", "80", *FAST]
    assert cli.main(args) == 0
    out = tmp_path / "out"
    result = json.loads((out / "eval.json").read_text())
    # The commentary is `svlm stream`'s with the same settings.
    assert cli.main(["stream", "--model", str(model_dir), "--video", str(video), "--jsonl",
                     str(tmp_path / "stream.jsonl"), *FAST]) == 0
    assert (out / "commentary.jsonl").read_text() == (tmp_path / "stream.jsonl").read_text()
    texts = [json.loads(line)["text"] for line in (out / "commentary.jsonl").read_text().splitlines()]
    truth = reference_by_second(read_reference(reference), 0.0, SECONDS)
    assert [s["text"] for s in result["per_second"]] == texts and [s["reference"] for s in result["per_second"]] == truth
    m = result["metrics"]
    assert m["seconds"] == SECONDS and m["latency"]["seconds"] == SECONDS
    assert m["agreement"]["within_1s"] == metrics.word_agreement(texts, truth, 1).record()
    assert m["reference_words_per_second"] == len(words) / SECONDS
    j = result["judge"]
    assert j["requests"] == 2 * j["judged"] and j["judged"] + j["silent_windows"] == j["windows"] == 3
    assert j["cached_answers"] == 0 and len(judge_server.requests) == j["requests"]
    assert set(result["qa"]["tasks"]) == {"score", "side"} and result["qa"]["asked"] == 2
    assert result["model"]["name"] == model_dir.name and len(result["data"]["video_file"]["sha256"]) == 64
    assert result["settings"]["window"] == 2 and result["environment"]["git"]
    assert "| win rate vs reference" in (out / "eval.md").read_text()
    # A re-run makes no call and reproduces the verdicts (without the questions, which take a stream more).
    n_asked = len(judge_server.requests)
    assert cli.main([a for a in args if a not in ("--questions", str(questions))]) == 0
    again = json.loads((out / "eval.json").read_text())
    assert len(judge_server.requests) == n_asked and again["judge"]["cached_answers"] == j["requests"]
    assert again["judge"]["verdicts"] == [{**v, "cached": [True, True]} for v in j["verdicts"]]
    capsys.readouterr()


@pytest.mark.parametrize("extra, message", [
    (["--judge-url", "http://127.0.0.1:9"], "--judge-url needs --judge-model"),
    (["--judge-url", "http://127.0.0.1:9", "--judge-model", "m", "--reference", ""], "--judge-url needs --reference"),
    (["--reference", "missing.json"], "missing.json: cannot read the transcript"),
    (["--questions", "BAD"], "q.jsonl:1: answer must be one of"),
])
def test_bad_eval_input_is_one_line(extra, message, model_dir, match_video, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_questions(tmp_path / "q.jsonl", [{"time": 1, "question": "?", "options": ["a", "b"], "answer": "C"}])
    extra = [str(tmp_path / "q.jsonl") if e == "BAD" else e for e in extra]
    code = cli.main(["eval", "--model", str(model_dir), "--video", str(match_video[0]), "--out", "out", *extra])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("svlm: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out" / "eval.json").exists()
