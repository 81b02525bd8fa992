"""The stream, defined once: its cache policy, its special tokens and its token order (docs/method.md §1, §3).

A stream is, in token order:
  head      <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>previous text\\n
  previous  earlier commentary, kept as the first `text_sink` and last `text_window` tokens
  footer    <|im_end|>\\n
  rounds    one per second, each made of the parts `ROUND_PARTS` in this order:
    before  <|im_start|>user\\nTime={a:.1f}-{b:.1f}s<|vision_start|>  (Qwen3-VL: <{t:.1f} seconds>, `time_label`)
    vision  <|video_pad|> x (the second's merged vision tokens)
    after   <|vision_end|>{query}<|im_end|>\\n<|im_start|>assistant\\n
    answer  {commentary} ...<|im_end|>        what the model generates (training's labels)
    close   " ...<|im_end|>", only when generation was cut at max_new_tokens (streaming)
    tail    \\n
The query appears in round 0 of a stream's true start only (`round_query`). Commentary for a second
is its words each preceded by a space, so a silent second is just " ..."; the commentary (without
" ..." and <|im_end|>: `content_length`) is what later moves into the previous text. Each piece is
tokenized on its own: special tokens and the leading space of commentary are natural token
boundaries, so concatenated pieces equal the tokenized whole.

Training lays the parts flat (`StreamFormat.flat_chunk`); the streaming cache gives each part of a
round a fixed slot range (`StreamFormat.round_slots`), and the engine prefills a round as
`PREFILL_PARTS`: what the previous round still owes, then this round's prompt.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from svlm_jax.config import ConfigError, ModelConfig
from svlm_jax.tokenizer import SpecialTokenIds

Encode = Callable[[str], list[int]]

SYSTEM = "You are a helpful assistant."
QUERY = "Commentate on this match"
END_MARKER = " ..."
IGNORE = -100  # training label of tokens that carry no loss

ROUND_PARTS = ("before", "vision", "after", "answer", "close", "tail")
# A round's prefill queries, in order: the previous round's close (if it was cut) and tail, then this
# round's prompt; a replayed round appends its known answer.
PREFILL_PARTS = (("previous", "close"), ("previous", "tail"), ("current", "before"), ("current", "vision"),
                 ("current", "after"))
# The longest time label a stream can reach (over a day of video) sizes the "before" slots.
LONGEST_STREAM_S = 99999.0


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """What a stream keeps (the paper's defaults), read by streaming and by SFT chunk building.

    text_sink / text_window: first and last tokens of all earlier commentary kept as previous text;
    text_rounds: recent seconds kept whole (prompt, vision while it lasts, commentary);
    vision_window_s: seconds whose vision tokens are kept, the current one included;
    fps: frames per second given to the model (sets the M-RoPE time step);
    max_new_tokens: the longest answer of one second, " ..." and <|im_end|> included;
    max_question_tokens: the longest question a second's user turn can take (0: no questions);
    max_answer_tokens: the longest answer of a second that carries a question (at least max_new_tokens).
    """

    text_sink: int = 512
    text_window: int = 512
    text_rounds: int = 16
    vision_window_s: int = 16
    fps: int = 2
    max_new_tokens: int = 20
    max_question_tokens: int = 0
    max_answer_tokens: int = 0

    def __post_init__(self):
        if self.text_rounds < 1 or self.vision_window_s < 0 or self.text_sink < 0 or self.text_window < 0:
            raise ValueError("text_rounds must be >= 1; vision_window_s, text_sink and text_window >= 0")
        if isinstance(self.fps, bool) or not isinstance(self.fps, int) or self.fps < 1:
            raise ValueError(f"fps must be a whole number >= 1, got {self.fps!r}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.max_question_tokens < 0 or self.max_answer_tokens < 0:
            raise ValueError("max_question_tokens and max_answer_tokens must be >= 0")

    @property
    def answer_cap(self) -> int:
        """Slots a round keeps for its answer: a question's answer may be longer than commentary."""
        return max(self.max_new_tokens, self.max_answer_tokens)

    @property
    def vision_rounds(self) -> int:
        """Rounds whose vision is kept (at least the current one, at most the rounds kept)."""
        return max(1, min(self.vision_window_s, self.text_rounds))

    def second_per_grid(self, temporal_patch_size: int) -> float:
        """Seconds of video one temporal patch covers: the M-RoPE time step's input."""
        return temporal_patch_size / self.fps

    def check_model(self, model_config: ModelConfig) -> None:
        patch = model_config.vision.temporal_patch_size
        if self.fps % patch:
            raise ValueError(f"fps must be a multiple of the model's temporal patch size ({patch}), got {self.fps}")
        if model_config.frame_blocks and self.fps != patch:
            # each temporal patch would be a block with a timestamp of its own: one a round
            raise ValueError(f"a {model_config.model_type} stream takes one temporal patch a second: fps must be "
                             f"{patch}, got {self.fps}")

    def stamp_frames(self, model_config: ModelConfig) -> int:
        """`StreamFormat.stamp_frames` for this model: a round's frame count where the model reads its
        time as a timestamp (Qwen3-VL), 0 where it reads "Time=a-b s"."""
        return self.fps if model_config.frame_blocks else 0


@dataclasses.dataclass(frozen=True)
class Round:
    """One second of a stream as text: its time span, user query (or None) and commentary words."""

    t_start: float
    t_end: float
    query: str | None
    words: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class RoundSlots:
    """Slot capacities of one round's parts (`ROUND_PARTS` order) in the streaming cache."""

    caps: tuple[int, ...]

    def cap(self, part: str) -> int:
        return self.caps[ROUND_PARTS.index(part)]

    def offset(self, part: str) -> int:
        return sum(self.caps[:ROUND_PARTS.index(part)])

    @property
    def size(self) -> int:
        return sum(self.caps)

    def prefill_offset(self, part: tuple[str, str]) -> int:
        """Where `part` (("previous" | "current", name)) starts among a round's prefill queries."""
        i = PREFILL_PARTS.index(part)
        return sum(self.cap(name) for _, name in PREFILL_PARTS[:i])


def round_query(query: str | None, round_index: int, has_previous: bool) -> str | None:
    """The query of round `round_index`: asked in round 0 of a stream without previous text only.
    Previous text means the stream began earlier (a later clip of a training stream, a session
    resumed from its transcript), where the query was already asked."""
    return query if round_index == 0 and not has_previous and query else None


def round_user_text(query: str | None, round_index: int, has_previous: bool, questions: Sequence[str] = ()
                    ) -> str | None:
    """The text of a round's user turn after its frames: the round's query, then the questions asked
    at that second (the model's turn that follows answers them); None when there is neither."""
    return " ".join([*filter(None, [round_query(query, round_index, has_previous)]), *questions]) or None


def time_label(t_start: float, t_end: float, stamp_frames: int = 0) -> str:
    """A round's time before its frames: "Time=a-b s"; with `stamp_frames` (Qwen3-VL), its processor's
    timestamp of a temporal patch of that many frames evenly spaced from t_start: "<t seconds>", t the
    mean of the first and last frame's times."""
    if not stamp_frames:
        return f"Time={t_start:.1f}-{t_end:.1f}s"
    last = t_start + (t_end - t_start) * (stamp_frames - 1) / stamp_frames
    return f"<{(t_start + last) / 2:.1f} seconds>"


def commentary_text(words: Sequence[str]) -> str:
    return "".join(f" {w}" for w in words)


def truncate_previous(ids: Sequence[int], sink: int, window: int) -> list[int]:
    """The previous-text policy: the first `sink` and the last `window` tokens of all text."""
    ids = list(ids)
    if len(ids) <= sink + window:
        return ids
    return ids[:sink] + (ids[len(ids) - window:] if window else [])


def check_special_tokens(special: SpecialTokenIds, model_config: ModelConfig) -> None:
    """The model config's vision token ids must be the tokenizer's (a mismatch mis-places frames)."""
    pairs = {"image_token_id": (model_config.image_token_id, special.image_pad),
             "video_token_id": (model_config.video_token_id, special.video_pad),
             "vision_start_token_id": (model_config.vision_start_token_id, special.vision_start),
             "vision_end_token_id": (model_config.vision_end_token_id, special.vision_end)}
    wrong = [f"{name} {config_id} (tokenizer: {token_id})" for name, (config_id, token_id) in pairs.items()
             if config_id != token_id]
    if wrong:
        raise ConfigError(f"config.json and the tokenizer disagree on special tokens: {', '.join(wrong)}")


@dataclasses.dataclass(frozen=True)
class StreamFormat:
    """The token pieces of a stream for one tokenizer. Picklable when `encode` is (Grain workers)."""

    special: SpecialTokenIds
    encode: Encode
    system: str = SYSTEM
    query: str = QUERY
    stamp_frames: int = 0  # see `time_label` and `CachePolicy.stamp_frames`

    @classmethod
    def from_tokenizer(cls, tokenizer, encode: Encode | None = None, *, system: str = SYSTEM,
                       query: str = QUERY, stamp_frames: int = 0) -> "StreamFormat":
        return cls(tokenizer.special, encode or tokenizer.encode, system, query, stamp_frames)

    # ---- the pieces
    @property
    def newline(self) -> tuple[int, ...]:
        return tuple(self.encode("\n"))

    @property
    def end_marker(self) -> tuple[int, ...]:
        """" ..." that closes every answer."""
        return tuple(self.encode(END_MARKER))

    def head_ids(self) -> list[int]:
        sp = self.special
        return [sp.im_start, *self.encode(f"system\n{self.system}"), sp.im_end, *self.newline,
                sp.im_start, *self.encode("previous text\n")]

    def footer_ids(self) -> list[int]:
        return [self.special.im_end, *self.newline]

    def commentary_ids(self, words: Sequence[str]) -> list[int]:
        text = commentary_text(words)
        return self.encode(text) if text else []

    def previous_text_ids(self, text: str) -> list[int]:
        """Initial previous text, tokenized like commentary so it joins later commentary seamlessly."""
        return self.commentary_ids(text.split())

    def prompt_ids(self, t_start: float, t_end: float, query: str | None) -> tuple[list[int], list[int]]:
        """A round's user turn around its vision pads: (before, after), `after` ending with the
        assistant header so generation starts right after."""
        sp = self.special
        before = [sp.im_start, *self.encode(f"user\n{time_label(t_start, t_end, self.stamp_frames)}"),
                  sp.vision_start]
        after = [sp.vision_end, *(self.encode(query) if query else []), sp.im_end, *self.newline,
                 sp.im_start, *self.encode("assistant\n")]
        return before, after

    def answer_ids(self, content_ids: Sequence[int]) -> list[int]:
        """What the model generates for a second: commentary, " ...", <|im_end|>."""
        return [*content_ids, *self.end_marker, self.special.im_end]

    def close_ids(self) -> list[int]:
        """Forced after an answer cut at max_new_tokens."""
        return [*self.end_marker, self.special.im_end]

    def tail_ids(self) -> list[int]:
        return list(self.newline)

    # ---- training: the flat sequence
    def round_parts(self, rnd: Round, n_vision: int) -> dict[str, list[int]]:
        """The ids of each part of one round of a recorded stream (an answer is never cut)."""
        before, after = self.prompt_ids(rnd.t_start, rnd.t_end, rnd.query)
        return {"before": before, "vision": [self.special.video_pad] * n_vision, "after": after,
                "answer": self.answer_ids(self.commentary_ids(rnd.words)), "close": [], "tail": self.tail_ids()}

    def flat_chunk(self, previous: Sequence[int], rounds: Sequence[Round], n_vision: Sequence[int]
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, labels) of head, previous text, footer and `rounds` (round k with n_vision[k] video pads);
        labels are the answers' ids, IGNORE elsewhere."""
        ids = self.head_ids() + list(previous) + self.footer_ids()
        labels = [IGNORE] * len(ids)
        for rnd, n in zip(rounds, n_vision, strict=True):
            parts = self.round_parts(rnd, n)
            for name in ROUND_PARTS:
                ids += parts[name]
                labels += parts[name] if name == "answer" else [IGNORE] * len(parts[name])
        return np.asarray(ids, np.int32), np.asarray(labels, np.int32)

    # ---- streaming: the slot layout
    def round_slots(self, n_vision: int, policy: CachePolicy) -> RoundSlots:
        """Capacities of a round's parts: the longest time label, the query and a question of
        `policy.max_question_tokens` (and a joining space), `policy.answer_cap` generated."""
        before = max(len(self.prompt_ids(t, t + 1.0, None)[0]) for t in (0.0, LONGEST_STREAM_S)) + 2
        after = len(self.prompt_ids(0.0, 1.0, self.query)[1])
        after += policy.max_question_tokens + 1 if policy.max_question_tokens else 0
        caps = {"before": before, "vision": n_vision, "after": after, "answer": policy.answer_cap,
                "close": len(self.close_ids()), "tail": len(self.tail_ids())}
        return RoundSlots(tuple(caps[name] for name in ROUND_PARTS))
