"""The embedded default task: a synthetic football match that never ends, its frames, and its
ground-truth commentary (world -> render -> commentary -> dataset)."""

from svlm_jax.synth.commentary import (
    LONG_MEMORY_S,
    Commentator,
    Fact,
    SecondScore,
    SecondTruth,
    Word,
    match_intro,
    memory_ages,
    parse_facts,
    score_commentary,
    score_consistency,
    summarize_scores,
)
from svlm_jax.synth.dataset import (
    QUESTION,
    DatasetConfig,
    StreamSecond,
    StreamWindow,
    qa_seconds,
    score_answer,
    scores_by_second,
    stream_seconds,
    stream_start,
    stream_window,
    write_dataset,
)
from svlm_jax.synth.render import RenderConfig, render_frame, render_second
from svlm_jax.synth.world import Event, Match, MatchConfig, SecondRecord

__all__ = [
    "LONG_MEMORY_S", "Commentator", "DatasetConfig", "Event", "Fact", "Match", "MatchConfig", "QUESTION", "RenderConfig",
    "SecondRecord", "SecondScore", "SecondTruth", "StreamSecond", "StreamWindow", "Word",
    "match_intro", "memory_ages", "parse_facts", "qa_seconds", "render_frame", "render_second", "score_answer",
    "score_commentary", "score_consistency", "scores_by_second", "stream_seconds",
    "stream_start", "stream_window", "summarize_scores", "write_dataset",
]
