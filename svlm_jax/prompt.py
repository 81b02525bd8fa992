"""The streaming chat format (METHOD.md §2), defined once for inference, training and tests.

A stream is, in token order:
  system block      <|im_start|>system\\n{system}<|im_end|>\\n
  previous text     <|im_start|>previous text\\n {earlier commentary ...}<|im_end|>\\n
  round k           <|im_start|>user\\nTime={a:.1f}-{b:.1f}s<|vision_start|><|video_pad|>*N<|vision_end|>{query}<|im_end|>\\n
                    <|im_start|>assistant\\n{commentary} ...<|im_end|>\\n
The query appears in round 0 of a stream's true start only (`round_query`). Commentary for a
second is its words each preceded by a space, so a silent second is just " ..."; the commentary
(without " ...") is what later moves into the previous-text block. Each piece is tokenized on its
own: special tokens and the leading space of commentary are natural token boundaries, so
concatenated pieces equal the tokenized whole.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

Encode = Callable[[str], list[int]]

SYSTEM = "You are a helpful assistant."
QUERY = "Commentate on this match"
END_MARKER = " ..."


@dataclasses.dataclass(frozen=True)
class ChatTokens:
    """Token ids the format needs, read from the tokenizer (never hard-coded)."""

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    video_pad: int
    newline: tuple[int, ...]
    end_marker: tuple[int, ...]  # " ..." that closes every assistant turn

    @classmethod
    def from_tokenizer(cls, token_id: Callable[[str], int], encode: Encode) -> "ChatTokens":
        return cls(im_start=token_id("<|im_start|>"), im_end=token_id("<|im_end|>"),
                   vision_start=token_id("<|vision_start|>"), vision_end=token_id("<|vision_end|>"),
                   video_pad=token_id("<|video_pad|>"), newline=tuple(encode("\n")),
                   end_marker=tuple(encode(END_MARKER)))


def system_block(ct: ChatTokens, encode: Encode, system: str = SYSTEM) -> list[int]:
    return [ct.im_start, *encode(f"system\n{system}"), ct.im_end, *ct.newline]


def previous_header(ct: ChatTokens, encode: Encode) -> list[int]:
    return [ct.im_start, *encode("previous text\n")]


def previous_footer(ct: ChatTokens) -> list[int]:
    return [ct.im_end, *ct.newline]


def time_label(t_start: float, t_end: float) -> str:
    return f"Time={t_start:.1f}-{t_end:.1f}s"


def round_query(query: str | None, round_index: int, has_previous: bool) -> str | None:
    """The query of round `round_index`: asked in round 0 of a stream without previous text only.
    Previous text means the stream began earlier (a later clip of a training stream, a session
    resumed from its transcript), where the query was already asked. Training and the engine
    both place it here, so a session started with previous text sees what SFT trained on."""
    return query if round_index == 0 and not has_previous and query else None


def user_turn(ct: ChatTokens, encode: Encode, t_start: float, t_end: float, query: str | None
              ) -> tuple[list[int], list[int]]:
    """The user turn around its vision pads: (tokens before the pads, tokens after them), the
    latter ending with the assistant header so generation starts right after."""
    before = [ct.im_start, *encode(f"user\n{time_label(t_start, t_end)}"), ct.vision_start]
    after = [ct.vision_end, *(encode(query) if query else []), ct.im_end, *ct.newline,
             ct.im_start, *encode("assistant\n")]
    return before, after


def commentary_text(words: Sequence[str]) -> str:
    return "".join(f" {w}" for w in words)


def commentary_ids(encode: Encode, words: Sequence[str]) -> list[int]:
    text = commentary_text(words)
    return encode(text) if text else []


def previous_text_ids(encode: Encode, text: str) -> list[int]:
    """Initial previous text, tokenized like commentary so it joins later commentary seamlessly."""
    return commentary_ids(encode, text.split())


def assistant_turn(ct: ChatTokens, content_ids: Sequence[int]) -> list[int]:
    """What the model generates for a second: commentary, " ...", <|im_end|>."""
    return [*content_ids, *ct.end_marker, ct.im_end]


def round_tail(ct: ChatTokens) -> list[int]:
    """Closes a round after its assistant turn."""
    return list(ct.newline)


def truncate_previous(ids: Sequence[int], sink: int, window: int) -> list[int]:
    """The previous-text policy: the first `sink` and the last `window` tokens of all text."""
    ids = list(ids)
    if len(ids) <= sink + window:
        return ids
    return ids[:sink] + (ids[len(ids) - window:] if window else [])
