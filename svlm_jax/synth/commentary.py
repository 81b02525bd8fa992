"""Ground-truth commentary for the synthetic match, its per-second facts, and a scorer.

Each event gets one short fixed sentence. Goals state the running score and fouls the fouler's
running foul count; in the first silent second of each minute (from minute 1, within its first
RECAP_WINDOW_SECONDS) a recap restates the score. Those numbers are never drawn on the frames, so a
model can only get them right by remembering its earlier commentary.

Words are timed inside their second: second s's words end in (s + 0.1, s + 0.95], in order, so a
word always belongs to the second its end time falls in. Words carry their punctuation and no
spaces; the text of a second is its words joined by single spaces.
"""

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from svlm_jax.synth.world import TEAM_NAMES, SecondRecord

Word = tuple[float, float, str]  # (start, end, word), seconds on the stream's timeline

SENTENCES = {
    "kickoff": "{team} kick off.",
    "pass": "{team} passes.",
    "tackle": "{team} wins the ball.",
    "shot": "{team} shoots!",
    "save": "Saved by {team}.",
    "miss": "Wide from {team}.",
    "goal": "Goal for {team}! {home} {home_goals} {away} {away_goals}.",
    "foul": "Foul by {team}, number {fouls}.",
    "recap": "Still {home} {home_goals} {away} {away_goals}.",
}
RECAP_WINDOW_SECONDS = 10
_TEAM_SLOTS = ("{team}", "{home}", "{away}")
_NUMBER_SLOTS = ("{home_goals}", "{away_goals}", "{fouls}")


def _normalize(text: str) -> list[str]:
    """Lower-case word and number tokens: case, punctuation and `...` silence markers drop out."""
    return re.findall(r"[a-z]+|\d+", text.lower())


VOCABULARY = tuple(sorted(
    {token for sentence in SENTENCES.values() for token in _normalize(re.sub(r"\{\w+\}", " ", sentence))}
    | {name.lower() for name in TEAM_NAMES}))  # plus the numbers, which are open-ended


@dataclass(frozen=True)
class Fact:
    """One checkable statement: an event (kind, acting team) or a recap, with the numbers it states."""

    kind: str  # an event kind of world.EVENT_KINDS, or "recap"
    team: str  # acting team's name; "" for a recap
    # (team, number) pairs sorted by team: goals for 'goal' and 'recap', the fouler's fouls for 'foul'.
    counts: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class SecondTruth:
    second: int
    facts: tuple[Fact, ...]  # empty for a silent second
    words: tuple[Word, ...]

    @property
    def text(self) -> str:
        return " ".join(word for _, _, word in self.words)


def fact_sentence(fact: Fact, teams: tuple[str, str]) -> str:
    counts = dict(fact.counts)
    if fact.kind == "foul":
        return SENTENCES["foul"].format(team=fact.team, fouls=counts[fact.team])
    home, away = teams
    return SENTENCES[fact.kind].format(team=fact.team, home=home, away=away,
                                       home_goals=counts.get(home), away_goals=counts.get(away))


def timed_words(second: int, text: str) -> tuple[Word, ...]:
    words = text.split()
    ends = [round(second + 0.1 + 0.85 * (i + 1) / len(words), 3) for i in range(len(words))]
    starts = [round(second + 0.1, 3)] + ends[:-1]
    return tuple(zip(starts, ends, words))


class Commentator:
    """Turns SecondRecords, fed in order from second 0, into SecondTruths."""

    def __init__(self, teams: tuple[str, str]):
        self.teams = teams
        self._score = (0, 0)
        self._last_recap_minute = 0

    def comment(self, record: SecondRecord) -> SecondTruth:
        s = record.second
        facts = []
        for event in record.events:
            self._score = event.score
            team = self.teams[event.team]
            if event.kind == "goal":
                facts.append(Fact("goal", team, self._score_counts()))
            elif event.kind == "foul":
                facts.append(Fact("foul", team, ((team, event.fouls[event.team]),)))
            else:
                facts.append(Fact(event.kind, team))
        minute = s // 60
        if not facts and minute > self._last_recap_minute and s % 60 < RECAP_WINDOW_SECONDS:
            self._last_recap_minute = minute
            facts.append(Fact("recap", "", self._score_counts()))
        text = " ".join(fact_sentence(fact, self.teams) for fact in facts)
        return SecondTruth(s, tuple(facts), timed_words(s, text) if text else ())

    def _score_counts(self) -> tuple[tuple[str, int], ...]:
        return tuple(sorted(zip(self.teams, self._score)))


def _pattern(sentence: str) -> list[str]:
    """A sentence template as normalized tokens, its `{slot}`s kept as they are."""
    tokens = []
    for piece in re.findall(r"\{\w+\}|[^\s{}]+", sentence):
        tokens.extend([piece] if piece.startswith("{") else _normalize(piece))
    return tokens


_PATTERNS = {kind: _pattern(sentence) for kind, sentence in SENTENCES.items()}
_TEAMS_BY_TOKEN = {name.lower(): name for name in TEAM_NAMES}


def _match(pattern: list[str], tokens: list[str]) -> dict[str, str | int] | None:
    """Slot values if `tokens` starts with `pattern`, else None."""
    if len(tokens) < len(pattern):
        return None
    slots: dict[str, str | int] = {}
    for want, got in zip(pattern, tokens):
        if want in _TEAM_SLOTS and got in _TEAMS_BY_TOKEN:
            slots[want] = _TEAMS_BY_TOKEN[got]
        elif want in _NUMBER_SLOTS and got.isdigit():
            slots[want] = int(got)
        elif want != got:
            return None
    return slots


def parse_facts(text: str) -> tuple[Fact, ...]:
    """The facts stated in a commentary text; words outside the sentence templates are skipped."""
    tokens = _normalize(text)
    facts = []
    i = 0
    while i < len(tokens):
        for kind, pattern in _PATTERNS.items():
            slots = _match(pattern, tokens[i:])
            if slots is not None:
                facts.append(_fact(kind, slots))
                i += len(pattern)
                break
        else:
            i += 1
    return tuple(facts)


def _fact(kind: str, slots: dict[str, str | int]) -> Fact:
    if kind in ("goal", "recap"):
        goals = {slots["{home}"]: slots["{home_goals}"], slots["{away}"]: slots["{away_goals}"]}
        return Fact(kind, str(slots.get("{team}", "")), tuple(sorted(goals.items())))
    if kind == "foul":
        return Fact(kind, str(slots["{team}"]), ((str(slots["{team}"]), int(slots["{fouls}"])),))
    return Fact(kind, str(slots["{team}"]))


@dataclass(frozen=True)
class SecondScore:
    second: int
    silent: bool  # the truth says nothing this second
    events_correct: bool  # the same (kind, team) statements as the truth; silence when silent
    counts_correct: bool | None  # every number the truth states, stated right; None if none is due

    @property
    def correct(self) -> bool:
        return self.events_correct and self.counts_correct is not False


def score_commentary(predicted: Sequence[str], truth: Sequence[SecondTruth]) -> list[SecondScore]:
    """Per-second correctness of predicted texts (one per second, aligned with `truth`).

    Tolerant of case, punctuation, spacing, `...` markers, words outside the templates and the
    order of teams in a score; not of a wrong or missing event, team or number.
    """
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted seconds for {len(truth)} true ones")
    scores = []
    for text, true in zip(predicted, truth):
        said = parse_facts(text)
        events_correct = (Counter((f.kind, f.team) for f in said)
                          == Counter((f.kind, f.team) for f in true.facts))
        with_counts = [f for f in true.facts if f.counts]
        counts_correct = all(f in said for f in with_counts) if with_counts else None
        scores.append(SecondScore(true.second, not true.facts, events_correct, counts_correct))
    return scores


def memory_ages(truths: Sequence[SecondTruth]) -> list[int | None]:
    """For each second stating numbers: seconds since the oldest of them last changed (the previous
    goal for a score, the fouler's previous foul for a foul count); None where nothing is stated.
    `truths` run from the stream's start, which is where every number starts (0-0 as old as the match)."""
    last_goal, last_foul, ages = 0, {}, []
    for truth in truths:
        age = None
        for fact in truth.facts:
            if fact.kind in ("goal", "recap"):
                since = truth.second - last_goal
            elif fact.kind == "foul":
                since = truth.second - last_foul.get(fact.team, 0)
            else:
                continue
            age = since if age is None else max(age, since)
        for fact in truth.facts:
            if fact.kind == "goal":
                last_goal = truth.second
            elif fact.kind == "foul":
                last_foul[fact.team] = truth.second
        ages.append(age)
    return ages


def summarize_scores(scores: Sequence[SecondScore], ages: Sequence[int | None] | None = None,
                     long_s: int = 16) -> dict[str, float]:
    """Accuracy over all seconds, then separately over eventful and silent seconds and over the
    numbers due (score and foul counts). With `ages` (memory_ages of the same seconds) also over
    the numbers last changed more than `long_s` seconds before (those only memory can carry).
    A rate with nothing to rate is None."""
    def rate(values):
        return sum(values) / len(values) if values else None

    summary = {
        "seconds": len(scores),
        "accuracy": rate([s.correct for s in scores]),
        "event_accuracy": rate([s.events_correct for s in scores if not s.silent]),
        "silence_accuracy": rate([s.events_correct for s in scores if s.silent]),
        "count_seconds": sum(s.counts_correct is not None for s in scores),
        "count_accuracy": rate([s.counts_correct for s in scores if s.counts_correct is not None]),
    }
    if ages is not None:
        if len(ages) != len(scores):
            raise ValueError(f"{len(ages)} ages for {len(scores)} scored seconds")
        due = [s.counts_correct for s, age in zip(scores, ages) if age is not None and age > long_s]
        summary.update(memory_seconds=len(due), memory_accuracy=rate(due))
    return summary
