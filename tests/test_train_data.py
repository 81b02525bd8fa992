"""Overlapped-chunk SFT data: chunk bounds, turns, labels, previous-text truncation, padding, the
file pipeline (video decoding, resumable order). Expected texts are written out by hand."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from svlm_jax import stream_format
from svlm_jax.config import tiny
from svlm_jax.media.preprocess import VisionPreprocessConfig, preprocess_video
from svlm_jax.media.video import VideoReader
from svlm_jax.tokenizer import SpecialTokenIds, Tokenizer
from svlm_jax.train import data

# A character-level toy tokenizer: text is its code points, special tokens are 1001..1005.
SPECIAL = {1001: "<s>", 1002: "</s>", 1003: "<vs>", 1004: "<ve>", 1005: "P"}


def char_encode(text: str) -> list[int]:
    return [ord(c) for c in text]


CHARS = stream_format.StreamFormat(
    SpecialTokenIds(endoftext=1000, im_start=1001, im_end=1002, vision_start=1003, vision_end=1004, vision_pad=1007,
                    image_pad=1006, video_pad=1005), char_encode, system="S", query="Q")
MODEL = dataclasses.replace(tiny(vocab_size=1100), image_token_id=1006, video_token_id=1005,
                            vision_start_token_id=1003, vision_end_token_id=1004)
VISION = VisionPreprocessConfig()
SPEC = data.ChunkSpec(chunk_seconds=3, overlap_seconds=1, policy=stream_format.CachePolicy(text_sink=2, text_window=3))


def text_of(ids) -> str:
    return "".join(SPECIAL.get(int(i), chr(int(i)) if int(i) < 1000 else "?") for i in ids)


def labelled_spans(ids, labels) -> list[str]:
    """Texts of the maximal runs of labelled tokens."""
    spans, current = [], []
    for i, label in zip(ids, labels):
        if label != data.IGNORE:
            assert label == i
            current.append(i)
        elif current:
            spans.append(text_of(current))
            current = []
    return spans + ([text_of(current)] if current else [])


def random_frames(rng, n_seconds, size=56):
    return [rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8) for _ in range(n_seconds)]


SAMPLE = data.Sample(video=None, video_start=10.0, video_end=14.0,
                     words=((10.1, 10.4, "hi"), (10.5, 11.0, "yo"), (12.2, 12.9, "go"), (13.0, 13.5, "up")),
                     qa=((13.1, 13.6, "who?", "red team"),))


def test_chunk_bounds():
    spec = data.ChunkSpec()  # 24 s chunks every 12 s
    assert data.chunk_bounds(60, spec) == [(0, 24), (12, 36), (24, 48), (36, 60)]
    assert data.chunk_bounds(50, spec) == [(0, 24), (12, 36), (24, 48), (36, 50)]
    assert data.chunk_bounds(10, spec) == [(0, 10)]
    assert data.chunk_bounds(24, spec) == [(0, 24)]
    assert data.chunk_bounds(7, data.ChunkSpec(chunk_seconds=3, overlap_seconds=0)) == [(0, 3), (3, 6), (6, 7)]


def test_first_chunk_turns_labels_and_query(rng):
    frames = random_frames(rng, 3)
    chunk = data.chunk_from_frames(CHARS, MODEL, SPEC, VISION, SAMPLE, 0, frames)
    round_ = "<s>user\nTime={}<vs>PPPP<ve>{}</s>\n<s>assistant\n{} ...</s>\n"
    assert text_of(chunk.ids_t) == (
        "<s>system\nS</s>\n<s>previous text\n</s>\n"
        + round_.format("10.0-11.0s", "Q", " hi") + round_.format("11.0-12.0s", "", " yo")
        + round_.format("12.0-13.0s", "", " go"))
    assert labelled_spans(chunk.ids_t, chunk.labels_t) == [" hi ...</s>", " yo ...</s>", " go ...</s>"]
    np.testing.assert_array_equal(chunk.grids_s3, [[1, 4, 4]] * 3)
    np.testing.assert_array_equal(chunk.rows_pv, np.concatenate([preprocess_video(f, VISION)[0] for f in frames]))


def test_later_chunk_previous_text_truncated_and_qa(rng):
    chunk = data.chunk_from_frames(CHARS, MODEL, SPEC, VISION, SAMPLE, 2, random_frames(rng, 2))
    # said before second 2: " hi" + " yo" = " hi yo"; first 2 + last 3 characters: " h" + " yo"
    assert text_of(chunk.ids_t) == (
        "<s>system\nS</s>\n<s>previous text\n h yo</s>\n"
        "<s>user\nTime=12.0-13.0s<vs>PPPP<ve></s>\n<s>assistant\n go ...</s>\n"
        "<s>user\nTime=13.0-14.0s<vs>PPPP<ve>who?</s>\n<s>assistant\n up red team ...</s>\n")
    assert labelled_spans(chunk.ids_t, chunk.labels_t) == [" go ...</s>", " up red team ...</s>"]


def test_sample_with_previous_has_no_query(rng):
    sample = data.Sample(video=None, video_start=0.0, video_end=2.5, words=((1.2, 1.9, "go"),), previous="old news",
                         qa=((0.2, 0.5, "score?", "nil"),))
    rounds = data.sample_rounds(sample, CHARS)
    assert [(r.t_start, r.query, r.words) for r in rounds] == [(0.0, "score?", ("nil",)), (1.0, None, ("go",))]
    chunk = data.chunk_from_frames(CHARS, MODEL, SPEC, VISION, sample, 0, random_frames(rng, 2))
    # previous " old news": first 2 + last 3 characters
    assert text_of(chunk.ids_t).startswith("<s>system\nS</s>\n<s>previous text\n oews</s>\n<s>user\nTime=0.0-1.0s"
                                           "<vs>PPPP<ve>score?</s>")


def test_previous_ids_is_the_policy_over_all_earlier_text(rng):
    # The definition, spelled out: everything said before the chunk (the sample's previous text,
    # then each earlier second's commentary), then the first `sink` and last `window` tokens.
    for _ in range(40):
        n = int(rng.integers(1, 30))
        words = tuple((k + 0.2, k + 0.8, "".join(rng.choice(list("abc"), int(rng.integers(1, 4)))))
                      for k in range(n) if rng.random() < 0.6)
        previous = " ".join("xyz"[int(i)] * 2 for i in rng.integers(0, 3, int(rng.integers(0, 5))))
        sample = data.Sample(video=None, video_start=0.0, video_end=float(n), words=words, previous=previous)
        policy = stream_format.CachePolicy(text_sink=int(rng.integers(0, 8)), text_window=int(rng.integers(0, 12)))
        rounds = data.sample_rounds(sample, CHARS)
        for start in range(n + 1):
            said = [ord(c) for c in (" " + previous if previous else "")]
            for r in rounds[:start]:
                said += [ord(c) for c in "".join(" " + w for w in r.words)]
            want = said if len(said) <= policy.text_sink + policy.text_window else (
                said[:policy.text_sink] + said[len(said) - policy.text_window:] * (policy.text_window > 0))
            assert data.previous_ids(CHARS, sample, rounds, start, policy) == want


def test_positions_follow_the_vision_blocks(rng):
    chunk = data.chunk_from_frames(CHARS, MODEL, SPEC, VISION, SAMPLE, 0, random_frames(rng, 3))
    s = int(np.flatnonzero(chunk.ids_t == 1005)[0])  # text before the first block: positions 0..s-1
    np.testing.assert_array_equal(chunk.positions_t3[:s, 0], np.arange(s))
    # a 2x2 merged grid: (s, s+row, s+col), then text resumes at s + 2
    np.testing.assert_array_equal(chunk.positions_t3[s:s + 5],
                                  [[s, s, s], [s, s, s + 1], [s, s + 1, s], [s, s + 1, s + 1], [s + 2] * 3])
    # each of the 3 blocks of 4 tokens advances positions by 2
    assert chunk.positions_t3[-1].tolist() == [len(chunk.ids_t) - 1 - 3 * 2] * 3


def test_pad_chunks(rng):
    chunks = [data.chunk_from_frames(CHARS, MODEL, SPEC, VISION, SAMPLE, 0, random_frames(rng, 3)),
              data.chunk_from_frames(CHARS, MODEL, SPEC, VISION, SAMPLE, 2, random_frames(rng, 2))]
    out = data.pad_chunks(chunks, data.Bucket(tokens=400, patches=64), pad_id=0, max_seconds=3)
    for i, c in enumerate(chunks):
        n = len(c.ids_t)
        assert out["segment_bt"][i].sum() == n and out["segment_bt"][i, :n].all()
        np.testing.assert_array_equal(out["targets_bt"][i, :n - 1], c.labels_t[1:])
        assert (out["targets_bt"][i, n - 1:] == data.IGNORE).all() and (out["ids_bt"][i, n:] == 0).all()
    # 48 + 16 patch rows, then a padding grid of 64 - 48 = 16 patches; 32 real rows + padding of 32
    np.testing.assert_array_equal(out["grids_bg3"][0], [[1, 4, 4]] * 3 + [[1, 2, 8]])
    np.testing.assert_array_equal(out["grids_bg3"][1], [[1, 4, 4]] * 2 + [[1, 2, 16], [0, 0, 0]])
    assert (out["rows_bpv"][1, 32:] == 0).all()
    with pytest.raises(data.DataError):
        data.pad_chunks(chunks, data.Bucket(tokens=100, patches=64), pad_id=0, max_seconds=3)


@pytest.fixture(scope="module")
def synth_plan(tmp_path_factory, stream_tokenizer):
    from svlm_jax.synth import DatasetConfig, RenderConfig, write_dataset

    root = tmp_path_factory.mktemp("sft_data")
    jsonl = write_dataset(root, DatasetConfig(streams=2, minutes=1, clip_seconds=30,
                                              render=RenderConfig(height=56, width=56)))
    sp = stream_tokenizer.special
    model = dataclasses.replace(tiny(vocab_size=stream_tokenizer.vocab_size), image_token_id=sp.image_pad,
                                video_token_id=sp.video_pad, vision_start_token_id=sp.vision_start,
                                vision_end_token_id=sp.vision_end)
    fmt = data.training_format(stream_tokenizer, stream_tokenizer.name, system=stream_format.SYSTEM,
                               query=stream_format.QUERY)
    spec = data.ChunkSpec(chunk_seconds=8, overlap_seconds=4, policy=stream_format.CachePolicy(text_sink=16,
                                                                                               text_window=16))
    return data.plan_chunks(fmt, data.pad_id(stream_tokenizer), model, spec, VISION, data.read_samples(jsonl),
                            [data.Bucket(600, 128), data.Bucket(390, 128)])


def test_plan_and_group_order(synth_plan):
    # 4 clips of 30 s, chunks (0,8),(4,12),...,(24,30): 7 each
    assert len(synth_plan.refs) == 28
    assert [(r.start, r.end) for r in synth_plan.refs[:7]] == [(0, 8), (4, 12), (8, 16), (12, 20), (16, 24),
                                                               (20, 28), (24, 30)]
    assert synth_plan.buckets == (data.Bucket(390, 128), data.Bucket(600, 128))  # sorted
    groups = data.group_order(synth_plan, 4, seed=3, n_groups=14)
    assert groups == data.group_order(synth_plan, 4, seed=3, n_groups=14)
    assert groups != data.group_order(synth_plan, 4, seed=4, n_groups=14)
    per_epoch = len(groups) // 2
    for epoch in (groups[:per_epoch], groups[per_epoch:]):
        flat = [i for g in epoch for i in g]
        assert len(flat) == len(set(flat)) >= 28 - 4 * len(synth_plan.buckets)
    # A bucket's leftovers join groups of the next larger bucket; such a group is padded to the
    # larger one, which holds every member.
    mixed = [g for g in groups if len({synth_plan.refs[i].bucket for i in g}) > 1]
    assert mixed
    for g in mixed:
        assert data.LoadGroup(synth_plan, grad_accum=1)(g)["ids_bt"].shape[-1] == synth_plan.buckets[-1].tokens


def test_file_chunks_decode_the_right_seconds(synth_plan):
    sample_index = 1  # the second clip of stream 0: video_start 30, with previous text
    ref = next(i for i, r in enumerate(synth_plan.refs) if r.sample == sample_index and r.start == 4)
    out = data.LoadGroup(synth_plan, grad_accum=1)((ref,))
    sample = synth_plan.samples[sample_index]
    with VideoReader(sample.video, fps=2) as reader:
        seconds = [s.frames_thwc for s in reader][34:42]
    expected = np.concatenate([preprocess_video(f, VISION)[0] for f in seconds])
    np.testing.assert_array_equal(out["rows_bpv"][0, 0, :len(expected)], expected)
    decoded = Tokenizer.from_pretrained(synth_plan.fmt.encode.tokenizer_dir).decode(out["ids_bt"][0, 0])
    assert "Time=34.0-35.0s<|vision_start|>" in decoded and "Time=41.0-42.0s" in decoded
    assert "Time=42.0" not in decoded and stream_format.QUERY not in decoded


def test_dataset_resumes_exactly_and_workers_agree(synth_plan):
    ds = data.make_dataset(synth_plan, batch_size=2, grad_accum=2, seed=0, steps=8)
    it = iter(ds)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = [next(it) for _ in range(2)]
    resumed = iter(ds)
    resumed.set_state(state)
    for a, b in zip(rest, [next(resumed) for _ in range(2)]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert first[0]["ids_bt"].shape[:2] == (2, 2)
    parallel = iter(data.make_dataset(synth_plan, batch_size=2, grad_accum=2, seed=0, steps=8, workers=1))
    try:
        for a in first[:2]:
            b = next(parallel)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    finally:
        parallel.close()
