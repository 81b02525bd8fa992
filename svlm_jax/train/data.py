"""Overlapped-chunk SFT data (docs/method.md §5): JSONL samples -> chunks -> padded, bucketed batches.

Sample format (one JSON object per line; times in seconds on the video's own timeline):
  video        path of the video, relative to the JSONL file's folder
  video_start  where the stream starts in the video; second k of the stream is
               [video_start + k, video_start + k + 1)
  video_end    where it ends; only whole seconds are used
  text_stream  [[start, end, word], ...]: a word belongs to the second its END time falls in
  previous     optional: what was said before video_start (the stream started earlier)
  qa_stream    optional [[time, time, question, answer], ...]: the question joins the user turn
               of the second the second `time` falls in (`stream_format.round_user_text`: after
               the query when both are there, as `svlm serve` asks) and
               the answer's words follow that second's commentary in its assistant turn, so later
               rounds see it in the previous text, as at inference.

A stream is cut into chunks of `chunk_seconds` starting every `chunk_seconds - overlap_seconds`
(the last chunk ends at the stream's end). A chunk is the one stream format of
`svlm_jax.stream_format` laid flat (`StreamFormat.flat_chunk`): head, previous text, footer, then
per second its round (user turn with `Time=a-b s`, that second's frames as one video grid and the
query if any; the answer: words, " ...", <|im_end|>).
Previous text = the sample's `previous` (as one commentary) then the commentary of every earlier
second of the stream (each second tokenized on its own, as inference moves each round's generated
text), cut by `stream_format.truncate_previous` to the policy's first `text_sink` and last `text_window` tokens.
The query (`stream_format.round_query`, which the engine follows too): a chunk carries it in its round 0
exactly when that round is second 0 of a sample without `previous` (a stream's true start).
Labels (aligned with the ids; IGNORE elsewhere): the assistant turns (content, " ...", <|im_end|>).

Batches: every chunk is padded to the smallest `Bucket` (token and patch capacity) that holds it,
so the train step compiles once per bucket. A chunk's patch rows are followed by one zero
"padding grid" (1, 2, n) filling its patch capacity; its features are never placed anywhere.
Order: per epoch, chunks are shuffled within buckets, grouped, and the groups shuffled (numpy,
seeded); Grain maps groups to arrays (optionally in worker processes) and its iterator state
(get_state / set_state) makes the order resumable exactly. A held-out set (`eval_dataset`) gives
every chunk once, in order, its last batches filled with rows of padding.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
from pathlib import Path
from typing import Sequence

import grain
import numpy as np

from svlm_jax.stream_format import IGNORE, CachePolicy, Round, StreamFormat, round_user_text, truncate_previous
from svlm_jax.config import ModelConfig, VisionConfig
from svlm_jax.media.preprocess import VisionPreprocessConfig, preprocess_video
from svlm_jax.media.video import VideoReader
from svlm_jax.model import vision
from svlm_jax.model.vlm import positions_for
from svlm_jax.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

class DataError(ValueError):
    """A sample or dataset setting is unusable; the message names the file, line and field."""


@dataclasses.dataclass(frozen=True)
class ChunkSpec:
    """How streams become chunks (docs/method.md §5 defaults) under the streaming cache policy:
    the chunks' previous text is the policy's sink and window, their frames its fps."""

    chunk_seconds: int = 24
    overlap_seconds: int = 12
    policy: CachePolicy = CachePolicy()

    def __post_init__(self):
        if self.chunk_seconds < 1 or not 0 <= self.overlap_seconds < self.chunk_seconds:
            raise DataError(f"need chunk_seconds >= 1 and 0 <= overlap_seconds < chunk_seconds, got "
                            f"{self.chunk_seconds} / {self.overlap_seconds}")


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Capacity of one padded chunk: tokens and vision patch rows."""

    tokens: int
    patches: int


@dataclasses.dataclass(frozen=True)
class Sample:
    video: Path | None  # None for in-memory samples
    video_start: float
    video_end: float
    words: tuple[tuple[float, float, str], ...]
    previous: str = ""
    qa: tuple[tuple[float, float, str, str], ...] = ()

    @property
    def n_seconds(self) -> int:
        return int(math.floor(self.video_end - self.video_start))

    def second_of(self, end_time: float) -> int:
        return int(math.floor(end_time - self.video_start))


@dataclasses.dataclass(frozen=True)
class TokenizerFile:
    """`encode` of a tokenizer directory, picklable (Grain workers load the tokenizer once each)."""

    tokenizer_dir: str

    def __call__(self, text: str) -> list[int]:
        return _tokenizer(self.tokenizer_dir).encode(text)


def training_format(tok: Tokenizer, tokenizer_dir: str | Path, *, system: str, query: str,
                    stamp_frames: int = 0) -> StreamFormat:
    """The stream format of `tok` (loaded from `tokenizer_dir`) with a picklable encoder;
    `stamp_frames` as `CachePolicy.stamp_frames` gives it for the model (Qwen3-VL's timestamps)."""
    return StreamFormat.from_tokenizer(tok, TokenizerFile(str(tokenizer_dir)), system=system, query=query,
                                       stamp_frames=stamp_frames)


def pad_id(tok: Tokenizer) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.special.endoftext


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_dir: str) -> Tokenizer:
    return Tokenizer.from_pretrained(tokenizer_dir)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One chunk, host arrays: ids, labels (IGNORE = no loss) and 3D positions [T], patch rows
    [P, 1176] of its seconds in order and their grids [S, 3]."""

    ids_t: np.ndarray
    labels_t: np.ndarray
    positions_t3: np.ndarray
    rows_pv: np.ndarray
    grids_s3: np.ndarray


# ---- samples ------------------------------------------------------------------------------------

MAX_SAMPLE_SECONDS = 1_000_000  # ~11.6 days: a longer sample is a typo, not a stream
_SAMPLE_FIELDS = ("video", "video_start", "video_end", "text_stream", "previous", "qa_stream")
_REQUIRED_FIELDS = ("video", "video_start", "video_end", "text_stream")


def read_samples(path: str | Path) -> list[Sample]:
    """Samples of a JSONL file, validated; errors name the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such samples file" if not path.exists() else f"{path}: is not a file")
    samples = []
    try:
        with path.open("rb") as file:
            for line_no, raw in enumerate(file, 1):
                if raw.strip():
                    samples.append(_parse_sample(_json_line(raw, path, line_no), path, line_no))
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if not samples:
        raise DataError(f"{path}: no samples (the file is empty)" if path.stat().st_size == 0
                        else f"{path}: no samples")
    return samples


def _json_line(raw: bytes, path: Path, line_no: int):
    where = f"{path}:{line_no}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text: {e}") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{where}: not valid JSON ({e}); each line must be one JSON object") from None


def _shown(value) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value) -> float | None:
    """A finite JSON number (not a boolean, not a string) as float, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            return None
        return value if math.isfinite(value) else None
    return None


def _entries(d: dict, field: str, where: str, kinds: tuple[str, ...], spelled: str) -> list[tuple]:
    """A list of fixed-length entries of numbers ("n") and strings ("s")."""
    value = d.get(field, [])
    if not isinstance(value, list):
        raise DataError(f"{where}: {field} must be a list of {spelled}, got {_shown(value)}")
    out = []
    for i, entry in enumerate(value):
        ok = isinstance(entry, list) and len(entry) == len(kinds)
        items = []
        for kind, item in zip(kinds, entry) if ok else ():
            converted = _number(item) if kind == "n" else item if isinstance(item, str) else None
            if converted is None:
                ok = False
                break
            items.append(converted)
        if not ok:
            raise DataError(f"{where}: {field}[{i}] must be {spelled}, got {_shown(entry)}")
        out.append(tuple(items))
    return out


def _parse_sample(d: dict, path: Path, line_no: int) -> Sample:
    where = f"{path}:{line_no}"
    if not isinstance(d, dict):
        raise DataError(f"{where}: a sample must be a JSON object, got {_shown(d)}")
    missing = [k for k in _REQUIRED_FIELDS if k not in d]
    unknown = sorted(set(d) - set(_SAMPLE_FIELDS))
    if missing or unknown:
        raise DataError(f"{where}: missing fields {missing}, unknown fields {unknown}")
    video = d["video"]
    if not isinstance(video, str) or not video.strip() or "\0" in video:
        raise DataError(f"{where}: video must be a non-empty path string, got {_shown(video)}")
    times = {}
    for field in ("video_start", "video_end"):
        times[field] = _number(d[field])
        if times[field] is None or times[field] < 0:
            raise DataError(f"{where}: {field} must be a non-negative number of seconds, got {_shown(d[field])}")
    previous = d.get("previous", "")
    if not isinstance(previous, str):
        raise DataError(f"{where}: previous must be a string (omit it for none), got {_shown(previous)}")
    words = _entries(d, "text_stream", where, ("n", "n", "s"), "[start, end, word] (two numbers and a string)")
    qa = _entries(d, "qa_stream", where, ("n", "n", "s", "s"),
                  "[start, end, question, answer] (two numbers and two strings)")
    video_start, video_end = times["video_start"], times["video_end"]
    if not 1 <= video_end - video_start <= MAX_SAMPLE_SECONDS:
        raise DataError(f"{where}: video_end - video_start must cover at least one second "
                        f"(and at most {MAX_SAMPLE_SECONDS}), got {video_start} .. {video_end}")
    sample = Sample(video=path.parent / video, video_start=video_start, video_end=video_end,
                    words=tuple(words), previous=previous, qa=tuple(qa))
    for name, times in (("text_stream", [w[1] for w in sample.words]), ("qa_stream", [q[1] for q in sample.qa])):
        bad = [t for t in times if not 0 <= sample.second_of(t) < sample.n_seconds]
        if bad:
            raise DataError(f"{where}: {name} times {bad[:3]} fall outside the sample's whole seconds "
                            f"[{sample.video_start}, {sample.video_start + sample.n_seconds})")
    return sample


def sample_rounds(sample: Sample, fmt: StreamFormat) -> list[Round]:
    """Every second of a sample as a Round (see the module docstring for query and QA placement)."""
    words: list[list[str]] = [[] for _ in range(sample.n_seconds)]
    for _, end, word in sample.words:
        words[sample.second_of(end)].append(word)
    questions: list[list[str]] = [[] for _ in range(sample.n_seconds)]
    for _, time, question, answer in sample.qa:
        k = sample.second_of(time)
        questions[k].append(question)
        words[k] += answer.split()
    rounds = []
    for k in range(sample.n_seconds):
        t = sample.video_start + k
        rounds.append(Round(t, t + 1, round_user_text(fmt.query, k, bool(sample.previous), questions[k]),
                            tuple(words[k])))
    return rounds


def chunk_bounds(n_seconds: int, spec: ChunkSpec) -> list[tuple[int, int]]:
    """[start, end) seconds of the overlapped chunks of a stream of `n_seconds`."""
    stride = spec.chunk_seconds - spec.overlap_seconds
    bounds = [(0, min(spec.chunk_seconds, n_seconds))]
    while bounds[-1][1] < n_seconds:
        start = bounds[-1][0] + stride
        bounds.append((start, min(start + spec.chunk_seconds, n_seconds)))
    return bounds


def previous_ids(fmt: StreamFormat, sample: Sample, rounds: Sequence[Round], start: int, policy: CachePolicy) -> list[int]:
    """Previous-text tokens of a chunk starting at second `start`: inference's truncation policy.
    Tokenizes only the rounds that reach the sink (from the front) or the window (from the back),
    so a chunk hours into a stream costs no more than one near its start."""
    head, k = fmt.previous_text_ids(sample.previous), 0
    while len(head) < policy.text_sink and k < start:
        head += fmt.commentary_ids(rounds[k].words)
        k += 1
    tail, j = [], start
    while len(tail) < policy.text_window and j > k:
        j -= 1
        tail = fmt.commentary_ids(rounds[j].words) + tail
    # rounds k .. j-1 (if any) fall between the sink and the window
    return truncate_previous(head + tail, policy.text_sink, policy.text_window)


# ---- one chunk ----------------------------------------------------------------------------------

def build_chunk(fmt: StreamFormat, model_cfg: ModelConfig, spec: ChunkSpec, vision_cfg: VisionPreprocessConfig,
                rounds: Sequence[Round], previous: Sequence[int], frames_per_second: Sequence[np.ndarray]) -> Chunk:
    """A chunk from its rounds, previous-text ids and each second's uint8 frames [fps, H, W, 3]."""
    rows, grids = zip(*(preprocess_video(f, vision_cfg) for f in frames_per_second), strict=True)
    merge = model_cfg.vision.spatial_merge_size ** 2
    ids, labels = fmt.flat_chunk(previous, rounds, [math.prod(g) // merge for g in grids])
    second_per_grid = spec.policy.second_per_grid(model_cfg.vision.temporal_patch_size)
    positions = positions_for(model_cfg, ids[None], video_grid_thw=np.asarray(grids),
                              second_per_grid_ts=[second_per_grid] * len(grids))[0]
    return Chunk(ids, labels, positions, np.concatenate(rows).astype(np.float32), np.asarray(grids, np.int32))


def chunk_from_frames(fmt: StreamFormat, model_cfg: ModelConfig, spec: ChunkSpec, vision_cfg: VisionPreprocessConfig,
                      sample: Sample, start: int, frames_sfhwc: Sequence[np.ndarray]) -> Chunk:
    """The chunk of `sample` covering seconds [start, start + len(frames_sfhwc)), from in-memory frames
    (no files: `sample.video` may be None). This is what the file pipeline builds after decoding."""
    rounds = sample_rounds(sample, fmt)
    end = start + len(frames_sfhwc)
    if not 0 <= start < end <= len(rounds):
        raise DataError(f"seconds [{start}, {end}) are not inside the sample's {len(rounds)} seconds")
    return build_chunk(fmt, model_cfg, spec, vision_cfg, rounds[start:end],
                       previous_ids(fmt, sample, rounds, start, spec.policy), frames_sfhwc)


def read_frames(sample: Sample, start: int, end: int, fps: int) -> list[np.ndarray]:
    """Frames [fps, H, W, 3] of seconds [start, end) of a sample, decoded with VideoReader."""
    frames = []
    with VideoReader(sample.video, fps=fps, start=sample.video_start + start) as reader:
        for second in reader:
            frames.append(second.frames_thwc)
            if len(frames) == end - start:
                return frames
    raise DataError(f"{sample.video}: only {len(frames)} of seconds [{start}, {end}) after "
                    f"video_start {sample.video_start} could be read")


# ---- padding into buckets -----------------------------------------------------------------------

def patches_per_second(video: Path, vision_cfg: VisionPreprocessConfig, fps: int) -> int:
    """Patch rows one second of `video` gives (its frames resized like preprocess_video does)."""
    with VideoReader(video, fps=fps) as reader:
        height, width = reader.height, reader.width
    h, w = vision_cfg.resized_size(height, width, fps)
    frames_per_grid = -(-fps // vision_cfg.temporal_patch_size)
    return frames_per_grid * (h // vision_cfg.patch_size) * (w // vision_cfg.patch_size)


def pick_bucket(buckets: Sequence[Bucket], n_tokens: int, n_patches: int) -> int | None:
    """Index of the first bucket (buckets are sorted by size) holding the chunk, or None."""
    for i, b in enumerate(buckets):
        if n_tokens <= b.tokens and n_patches <= b.patches:
            return i
    return None


def pad_chunks(chunks: Sequence[Chunk | None], bucket: Bucket, pad_id: int, max_seconds: int,
               patch_dim: int | None = None) -> dict[str, np.ndarray]:
    """Chunks padded to `bucket` and stacked, [B, ...] (a None chunk: a row of padding alone, which
    needs `patch_dim` when no chunk is given):
      ids_bt, positions_bt3, segment_bt (1 = token, 0 = padding)
      targets_bt     the label of the NEXT token (IGNORE at the end and on padding): logits at t
                     are scored against targets_bt[t]
      rows_bpv       patch rows, then zeros up to the bucket's patch capacity
      grids_bg3      the chunk's grids, then the padding grid (1, 2, n), then zero rows
    """
    b, t_cap, p_cap = len(chunks), bucket.tokens, bucket.patches
    patch_dim = next((c.rows_pv.shape[1] for c in chunks if c is not None), patch_dim)
    out = {"ids_bt": np.full((b, t_cap), pad_id, np.int32), "targets_bt": np.full((b, t_cap), IGNORE, np.int32),
           "positions_bt3": np.zeros((b, t_cap, 3), np.int32), "segment_bt": np.zeros((b, t_cap), np.int32),
           "rows_bpv": np.zeros((b, p_cap, patch_dim), np.float32),
           "grids_bg3": np.zeros((b, max_seconds + 1, 3), np.int32)}
    for i, c in enumerate(chunks):
        if c is None:
            out["grids_bg3"][i, 0] = (1, 2, p_cap // 2)
            continue
        n, p, s = len(c.ids_t), len(c.rows_pv), len(c.grids_s3)
        if n > t_cap or p > p_cap or s > max_seconds:
            raise DataError(f"chunk of {n} tokens, {p} patches, {s} seconds exceeds bucket {bucket} / "
                            f"{max_seconds} seconds")
        out["ids_bt"][i, :n] = c.ids_t
        out["targets_bt"][i, :n - 1] = c.labels_t[1:]
        out["positions_bt3"][i, :n] = c.positions_t3
        out["segment_bt"][i, :n] = 1
        out["rows_bpv"][i, :p] = c.rows_pv
        out["grids_bg3"][i, :s] = c.grids_s3
        if p < p_cap:  # patch counts are multiples of 4 (2x2 merge), so n/2 is even
            out["grids_bg3"][i, s] = (1, 2, (p_cap - p) // 2)
    return out


def vision_layouts(cfg: VisionConfig, grids_abg3: np.ndarray) -> vision.VisionLayout:
    """Per-chunk vision layouts stacked to [A, B, ...] numpy leaves (main process only:
    `vision_layout` makes jax arrays). Cached: most chunks share their grids."""
    layouts = [[_layout(cfg, _grid_key(g)) for g in grids_bg3] for grids_bg3 in grids_abg3]
    return vision.VisionLayout(*(np.stack([np.stack([getattr(l, f.name) for l in row]) for row in layouts])
                                 for f in dataclasses.fields(vision.VisionLayout)))


def _grid_key(grids_g3: np.ndarray) -> tuple:
    return tuple(tuple(int(x) for x in g) for g in grids_g3 if g[0] > 0)


@functools.lru_cache(maxsize=64)
def _layout(cfg: VisionConfig, grids: tuple) -> vision.VisionLayout:
    layout = vision.vision_layout(cfg, grids)
    return vision.VisionLayout(*(np.asarray(getattr(layout, f.name)) for f in dataclasses.fields(layout)))


# ---- the dataset --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ChunkRef:
    sample: int
    start: int
    end: int
    bucket: int


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """Everything a Grain worker needs to turn a group of chunk indices into arrays (picklable)."""

    fmt: StreamFormat
    pad_id: int
    model_cfg: ModelConfig
    spec: ChunkSpec
    vision_cfg: VisionPreprocessConfig
    samples: tuple[Sample, ...]
    refs: tuple[ChunkRef, ...]
    buckets: tuple[Bucket, ...]


def plan_chunks(fmt: StreamFormat, pad_id: int, model_cfg: ModelConfig, spec: ChunkSpec, vision_cfg: VisionPreprocessConfig,
                samples: Sequence[Sample], buckets: Sequence[Bucket]) -> DataPlan:
    """Every chunk of every sample with its bucket (text is tokenized here, frames are not decoded:
    a video's patch count per second follows from its size). Chunks too big for every bucket are
    dropped with a warning naming how many."""
    buckets = tuple(sorted(buckets, key=lambda b: (b.tokens, b.patches)))
    per_second: dict[Path, int] = {}
    refs, dropped = [], 0
    merge = model_cfg.vision.spatial_merge_size ** 2
    for i, sample in enumerate(samples):
        if sample.video not in per_second:
            per_second[sample.video] = patches_per_second(sample.video, vision_cfg, spec.policy.fps)
        patches = per_second[sample.video]
        rounds = sample_rounds(sample, fmt)
        for start, end in chunk_bounds(len(rounds), spec):
            ids, _ = fmt.flat_chunk(previous_ids(fmt, sample, rounds, start, spec.policy), rounds[start:end],
                                    [patches // merge] * (end - start))
            bucket = pick_bucket(buckets, len(ids), patches * (end - start))
            if bucket is None:
                dropped += 1
            else:
                refs.append(ChunkRef(i, start, end, bucket))
    if dropped:
        logger.warning("%d of %d chunks fit no bucket %s and are left out", dropped, dropped + len(refs), buckets)
    if not refs:
        raise DataError(f"no chunk fits the buckets {buckets}")
    return DataPlan(fmt, pad_id, model_cfg, spec, vision_cfg, tuple(samples), tuple(refs), buckets)


def group_order(plan: DataPlan, group_size: int, seed: int, n_groups: int) -> list[tuple[int, ...]]:
    """The first `n_groups` groups of `group_size` chunk indices sharing a bucket, epoch after epoch.
    Per epoch: chunks shuffled within each bucket, cut into groups (a bucket's leftovers join the
    next larger bucket, the largest's are dropped), groups shuffled. Deterministic in `seed`."""
    groups = []
    for epoch in itertools.count():
        if len(groups) >= n_groups:
            return groups[:n_groups]
        rng = np.random.default_rng([seed, epoch])
        epoch_groups, carry = [], []
        for b in range(len(plan.buckets)):
            pool = carry + [i for i, r in enumerate(plan.refs) if r.bucket == b]
            pool = [pool[j] for j in rng.permutation(len(pool))]
            n_full = len(pool) // group_size * group_size
            epoch_groups += [tuple(pool[j:j + group_size]) for j in range(0, n_full, group_size)]
            carry = pool[n_full:]
        if not epoch_groups:
            raise DataError(f"{len(plan.refs)} chunks make no group of {group_size} chunks")
        groups += [epoch_groups[j] for j in rng.permutation(len(epoch_groups))]


@dataclasses.dataclass(frozen=True)
class LoadGroup:
    """Grain map: a group of chunk indices -> this process's arrays [A, B_local, ...]."""

    plan: DataPlan
    grad_accum: int
    process_index: int = 0
    process_count: int = 1

    def __call__(self, group: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Index -1 in `group`: a row of padding (the end of an evaluation)."""
        plan = self.plan
        # group_order carries a bucket's leftovers into the next larger one: pad to the largest.
        bucket = plan.buckets[max(plan.refs[i].bucket for i in group if i >= 0)]
        per_micro = len(group) // self.grad_accum
        local = per_micro // self.process_count
        micro = []
        for a in range(self.grad_accum):
            first = a * per_micro + self.process_index * local
            chunks = [self._chunk(plan.refs[i]) if i >= 0 else None for i in group[first:first + local]]
            micro.append(pad_chunks(chunks, bucket, plan.pad_id, plan.spec.chunk_seconds, plan.model_cfg.vision.patch_dim))
        return {k: np.stack([m[k] for m in micro]) for k in micro[0]}

    def _chunk(self, ref: ChunkRef) -> Chunk:
        p, sample = self.plan, self.plan.samples[ref.sample]
        frames = read_frames(sample, ref.start, ref.end, p.spec.policy.fps)
        return chunk_from_frames(p.fmt, p.model_cfg, p.spec, p.vision_cfg, sample, ref.start, frames)


def make_dataset(plan: DataPlan, *, batch_size: int, grad_accum: int, seed: int, steps: int, workers: int = 0,
                 prefetch: int = 2, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The training stream: `steps` elements, one per optimizer step, arrays [grad_accum, batch_size / process_count, ...].
    Iterate it with `iter(...)`; the iterator's get_state() / set_state() resume it exactly."""
    if batch_size % process_count:
        raise DataError(f"batch_size {batch_size} must be a multiple of the process count {process_count}")
    groups = group_order(plan, batch_size * grad_accum, seed, steps)
    ds = grain.MapDataset.source(groups).map(LoadGroup(plan, grad_accum, process_index, process_count))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if workers else 2, prefetch_buffer_size=prefetch))
    if workers:
        # Grain reads an absl flag in its workers; outside an absl app nobody parses flags.
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch))
    return ds


def eval_groups(plan: DataPlan, batch_size: int) -> list[tuple[int, ...]]:
    """Every chunk once, in order, in groups of `batch_size` sharing a bucket; a bucket's last group
    is filled with -1 (rows of padding, which count no token)."""
    groups = []
    for b in range(len(plan.buckets)):
        chunks = [i for i, r in enumerate(plan.refs) if r.bucket == b]
        chunks += [-1] * (-len(chunks) % batch_size)
        groups += [tuple(chunks[j:j + batch_size]) for j in range(0, len(chunks), batch_size)]
    return groups


def eval_dataset(plan: DataPlan, *, batch_size: int, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The held-out set: every chunk of `plan` once (`eval_groups`), arrays [1, batch_size / process_count, ...];
    iterate it whole for each evaluation."""
    if batch_size % process_count:
        raise DataError(f"batch_size {batch_size} must be a multiple of the process count {process_count}")
    return grain.MapDataset.source(eval_groups(plan, batch_size)).map(
        LoadGroup(plan, 1, process_index, process_count)).to_iter_dataset(grain.ReadOptions(num_threads=2))
