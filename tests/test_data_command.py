"""`svlm data`: synthetic match videos with WhisperX-style transcripts -> SFT samples that `svlm train`
trains on; the trainer sees in the cut samples what it sees in the whole stream; every kind of broken
transcript is one clear line naming the file and the word, and nothing is written."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from svlm_jax import cli, stream_format
from svlm_jax.synth import MatchConfig, RenderConfig, stream_seconds
from svlm_jax.synth.dataset import opening_frame, write_video
from svlm_jax.train import data
from train_runs import train_records, write_config

SECONDS = 20
RENDER = RenderConfig(height=56, width=56)
SEEDS = (5, 6, 7)


def render_match(folder: Path, seed: int) -> list[tuple[float, float, str]]:
    """An mp4 of the first SECONDS of match `seed` (as the synth dataset writes them); its true words."""
    items = list(itertools.islice(stream_seconds(MatchConfig(seed), RENDER), SECONDS))
    frames = itertools.chain([opening_frame(MatchConfig(seed), 0, RENDER)], *(item.frames for item in items))
    write_video(folder / f"match_{seed}.mp4", frames, RENDER.fps, RENDER.height, RENDER.width)
    return [word for item in items for word in item.truth.words]


def whisperx(words) -> dict:
    """WhisperX's aligned layout: a segment per second that says something, with extra keys."""
    segments = []
    for _, group in itertools.groupby(words, key=lambda w: int(w[1])):
        group = list(group)
        segments.append({"start": group[0][0], "end": group[-1][1], "text": " ".join(w for _, _, w in group),
                         "words": [{"word": w, "start": a, "end": b, "score": 0.9} for a, b, w in group]})
    return {"segments": segments, "language": "en"}


@pytest.fixture(scope="module")
def matches(tmp_path_factory):
    """Videos and transcripts (two WhisperX, one triples) in one folder; {seed: true words}."""
    folder = tmp_path_factory.mktemp("matches")
    truths = {seed: render_match(folder, seed) for seed in SEEDS}
    for seed, words in truths.items():
        layout = [list(w) for w in words] if seed == SEEDS[-1] else whisperx(words)
        (folder / f"match_{seed}.json").write_text(json.dumps(layout, indent=1))
    return folder, truths


def run_data(capsys, transcripts: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = cli.main(["data", "--transcripts", str(transcripts), "--out", str(out), *extra])
    return code, capsys.readouterr().err


def test_samples_hold_the_transcripts_and_the_split_is_by_video(matches, tmp_path, capsys):
    folder, truths = matches
    args = ("--sample-seconds", "8", "--validation-fraction", "0.34", "--seed", "3", "--text-sink", "3",
            "--text-window", "4")
    assert run_data(capsys, folder, tmp_path / "a", *args) == (0, "")
    samples = {split: data.read_samples(tmp_path / "a" / f"{split}.jsonl") for split in ("train", "validation")}
    by_video = {}
    for split, split_samples in samples.items():
        for sample in split_samples:
            by_video.setdefault(sample.video.resolve(), (split, []))[1].append(sample)
    assert sorted(p.name for p in by_video) == [f"match_{s}.mp4" for s in SEEDS]
    assert sorted(split for split, _ in by_video.values()) == ["train", "train", "validation"]
    for video, (_, cut) in by_video.items():
        words = truths[int(video.stem.split("_")[1])]
        first = int(words[0][1])  # the second of the first word: no cut before it
        assert [(s.video_start, s.video_end) for s in cut] == [
            (float(a), float(min(a + 8, SECONDS))) for a in [0, *range(8 * (first // 8 + 1), SECONDS, 8)]]
        assert [w for s in cut for w in s.words] == [tuple(w) for w in words]
        for s in cut:
            said = [w for _, end, w in words if end < s.video_start]
            expected = said if len(said) <= 7 else said[:3] + said[-4:]
            assert s.previous == " ".join(expected)
    summary = json.loads((tmp_path / "a" / "data.json").read_text())
    assert summary["splits"]["train"]["videos"] == 2 and summary["splits"]["validation"]["samples"] == 3
    # The split is the seed's: the same again, and another seed can hold out another video.
    assert run_data(capsys, folder, tmp_path / "b", *args) == (0, "")
    assert (tmp_path / "b" / "validation.jsonl").read_text() == (tmp_path / "a" / "validation.jsonl").read_text()
    held_out = set()
    for seed in range(6):
        assert run_data(capsys, folder, tmp_path / f"s{seed}", "--validation-fraction", "0.34", "--seed",
                        str(seed))[0] == 0
        held_out.add(json.loads((tmp_path / f"s{seed}" / "validation.jsonl").read_text().splitlines()[0])["video"])
    assert len(held_out) > 1


def test_the_trainer_sees_in_the_samples_what_it_sees_in_the_whole_stream(matches, tmp_path, capsys,
                                                                          stream_tokenizer):
    """Previous text and query of every chunk of the cut samples = those of the uncut stream at the
    same second, under the training policy's token sink and window (as many words given to svlm data)."""
    folder, truths = matches
    assert run_data(capsys, folder, tmp_path, "--sample-seconds", "7", "--validation-fraction", "0",
                    "--text-sink", "8", "--text-window", "8") == (0, "")
    policy = stream_format.CachePolicy(text_sink=8, text_window=8)
    fmt = data.training_format(stream_tokenizer, stream_tokenizer.name, system=stream_format.SYSTEM,
                               query=stream_format.QUERY)
    samples = data.read_samples(tmp_path / "train.jsonl")
    checked = 0
    for seed, words in truths.items():
        whole = data.Sample(folder / f"match_{seed}.mp4", 0.0, float(SECONDS), tuple(words))
        whole_rounds = data.sample_rounds(whole, fmt)
        for sample in (s for s in samples if s.video.name == whole.video.name):
            rounds = data.sample_rounds(sample, fmt)
            for k in range(sample.n_seconds):
                t = int(sample.video_start) + k
                assert rounds[k] == whole_rounds[t]  # query, time label and words
                assert (data.previous_ids(fmt, sample, rounds, k, policy)
                        == data.previous_ids(fmt, whole, whole_rounds, t, policy))
                checked += 1
    assert checked == len(SEEDS) * SECONDS


def test_svlm_train_trains_on_the_samples(matches, tmp_path, capsys, stream_tokenizer):
    folder, _ = matches
    assert run_data(capsys, folder, tmp_path / "data", "--sample-seconds", "10", "--text-sink", "16",
                    "--text-window", "16") == (0, "")
    config = write_config(tmp_path, "run", stream_tokenizer, tmp_path / "data" / "train.jsonl", steps=2, every=2,
                          grad_accum=1, keep=1)
    assert cli.main(["train", "--config", str(config)]) == 0
    log = train_records(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in log)


def broken(folder: Path, name: str, content) -> None:
    text = content if isinstance(content, str) else json.dumps(content, indent=1)
    (folder / f"{name}.json").write_text(text)


def word_list(words):
    return [list(w) for w in words]


CASES = {
    "outside the video": (lambda w: word_list(w[:-1]) + [[SECONDS + 0.2, SECONDS + 0.9, "late"]],
                          r"match_9\.json: \[{n}\] \('late'\) lies outside its video: it ends at 20\.9 s and "
                          r".*match_9\.mp4 lasts 20\.500 s"),
    "overlapping": (lambda w: word_list(w[:3]) + [[w[2][1] - 0.05, w[2][1] + 0.3, "over"]],
                    r"match_9\.json: \[3\] \('over'\) overlaps the word before it: .* before \[2\]"),
    "out of order": (lambda w: word_list(w[:3]) + [[w[0][0] - 0.05, w[0][0], "early"]],
                     r"match_9\.json: \[3\] \('early'\) is out of time order"),
    "ends before it starts": (lambda w: [[2.5, 2.0, "backwards"]], r"\[0\] \('backwards'\): needs 0 <= start <= end"),
    "not a triple": (lambda w: [[1.0, "x"]], r"match_9\.json: \[0\] must be \[start, end, word\], got \[1.0, \"x\"\]"),
    "untimed WhisperX word": (lambda w: {"segments": [{"words": [{"word": "one", "start": 1.0, "end": 1.2},
                                                                 {"word": "2"}]}]},
                              r"segments\[0\]\.words\[1\] \('2'\) has no start or end time .* --drop-untimed"),
    "WhisperX segment without words": (lambda w: {"segments": [{"text": "hello"}]},
                                       r"segments\[0\] needs a list 'words'"),
    "malformed JSON": (lambda w: '[\n [0.1, 0.5, "a"],\n [0.6, 0.9 "b"]\n]', r"match_9\.json:3:12: not valid JSON"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_broken_transcript_is_one_clear_line(case, matches, tmp_path_factory, capsys):
    folder, truths = matches
    work = tmp_path_factory.mktemp("broken")
    for suffix in (".mp4", ".json"):  # a good pair beside the broken one
        shutil.copy(folder / f"match_5{suffix}", work)
    shutil.copy(folder / "match_6.mp4", work / "match_9.mp4")
    make, message = CASES[case]
    words = truths[6]
    broken(work, "match_9", make(words))
    code, err = run_data(capsys, work, work / "out")
    assert code == 1 and err.count("\n") == 1 and err.startswith("svlm: error: "), err
    assert re.search(message.format(n=len(words) - 1), err), err
    assert not (work / "out").exists()  # nothing written


def test_missing_video_and_dropped_untimed_words(matches, tmp_path, capsys):
    folder, truths = matches
    shutil.copy(folder / "match_5.json", tmp_path / "ghost.json")
    code, err = run_data(capsys, tmp_path, tmp_path / "out", "--videos", str(folder))
    assert code == 1 and "ghost.json: its video is missing: no video named ghost.* in" in err, err
    (tmp_path / "ghost.json").unlink()
    layout = whisperx(truths[5])
    layout["segments"][0]["words"].insert(0, {"word": "1990"})  # WhisperX leaves numerals unaligned
    broken(tmp_path, "match_5", layout)
    assert run_data(capsys, tmp_path, tmp_path / "out", "--videos", str(folder), "--drop-untimed",
                    "--validation-fraction", "0") == (0, "")
    summary = json.loads((tmp_path / "out" / "data.json").read_text())
    assert [v["untimed_words_dropped"] for v in summary["videos"]] == [1]
    assert summary["videos"][0]["words"] == len(truths[5])
    assert not (tmp_path / "out" / "validation.jsonl").exists()
