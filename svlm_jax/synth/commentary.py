"""Ground-truth commentary for the synthetic match, its per-second facts, and a scorer.

Each event gets one short fixed sentence, which names the acting team followed by its side
("Blue home passes."). Goals also state the new score, and every RECAP_PERIOD_SECONDS (the seconds
s > 0 with s % RECAP_PERIOD_SECONDS == 0, unless a goal already states it) the commentary restates
the score after that second's event, if any. A score is home goals first, in words: "Score two to
one." Words, not digits, because every prompt's `Time=a-b s` label is full of digits: a small
model copying "the last digits it saw" then reads the clock (found with the demo model: many of
its wrong score digits were the current time label's). The scorer accepts digits too. The score is
never drawn on the frames (the frames only mark the seconds that restate it), so a model can only
get it right by remembering its earlier commentary: a recap copies the previous score statement,
at most RECAP_PERIOD_SECONDS back, and a goal adds one to it on the side it names ("Goal for Blue
away! Score two to two."), which makes the addition a function of the text (the demo's text
pretraining: 97% of held-out score words). Foul counts are not stated: a team's previous foul is
often minutes back, beyond any bounded text window.

The side is a copy, never read from the frames: every stream opens with the match's intro as its
previous text ("Blue home, Black away."), which the cache's text sink keeps for as long as the
stream runs, and every event repeats it after the team's name, so the word after a name is the
word after its last mention: the simplest copying a language model learns, practised at every
event. The team is what the frames show at every event (the strip in its colour). Earlier forms
said the side at goals only ("Goal for Blue, the away side!"): read from the goal's half of the
pitch, no demo model learned it (each said one side for every goal, and the score broke at the
first goal of the other side), and with the intro in the sink a language model did not learn to
look it up from there in a few hundred steps (52-58% of held-out side words).

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
    "kickoff": "{team} {side} kick off.",
    "pass": "{team} {side} passes.",
    "tackle": "{team} {side} wins the ball.",
    "shot": "{team} {side} shoots!",
    "save": "Saved by {team} {side}.",
    "miss": "Wide from {team} {side}.",
    "goal": "Goal for {team} {side}! Score {home_goals} to {away_goals}.",
    "foul": "Foul by {team} {side}.",
    "recap": "Score {home_goals} to {away_goals}.",
}
INTRO = "{home} home, {away} away."  # the previous text every stream starts from
# Well below the demo's 16 text rounds: the previous statement is always a full round in the
# window. Every 2 s (was 5, before that 10): more copies to learn from per chunk of training, and
# the source of each one at most two rounds back.
RECAP_PERIOD_SECONDS = 2
SIDES = ("home", "away")  # by team index: world.HOME, world.AWAY
_NUMBER_SLOTS = ("{home_goals}", "{away_goals}")
_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
          "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10 ** 9, "billion"), (10 ** 6, "million"), (1000, "thousand"), (100, "hundred"))
_SCALE_VALUES = {name: scale for scale, name in _SCALES}
NUMBER_WORDS = frozenset(_UNITS + _TENS[2:] + list(_SCALE_VALUES))


def number_words(n: int) -> str:
    """A count in English words, without "and" or hyphens: 21 -> "twenty one",
    1305 -> "one thousand three hundred five"."""
    if n < 0:
        raise ValueError(f"a count is never negative, got {n}")
    for scale, name in _SCALES:
        if n >= scale:
            rest = n % scale
            return f"{number_words(n // scale)} {name}" + (f" {number_words(rest)}" if rest else "")
    if n < 20:
        return _UNITS[n]
    return _TENS[n // 10] + (f" {_UNITS[n % 10]}" if n % 10 else "")


def parse_number(tokens: Sequence[str], i: int) -> tuple[int, int] | None:
    """(value, index after it) of the count at tokens[i]: one digit run, or the longest run of
    number words, which must be exactly how number_words writes its value ("one one" is not 2)."""
    if i < len(tokens) and tokens[i].isdigit():
        return int(tokens[i]), i + 1
    j = i
    while j < len(tokens) and tokens[j] in NUMBER_WORDS:
        j += 1
    if j == i:
        return None
    total = group = 0
    for word in tokens[i:j]:
        if word == "hundred":
            group *= 100
        elif word in _SCALE_VALUES:
            total, group = total + group * _SCALE_VALUES[word], 0
        else:
            group += _TENS.index(word) * 10 if word in _TENS else _UNITS.index(word)
    value = total + group
    return (value, j) if number_words(value).split() == list(tokens[i:j]) else None


def _normalize(text: str) -> list[str]:
    """Lower-case word and number tokens: case, punctuation and `...` silence markers drop out."""
    return re.findall(r"[a-z]+|\d+", text.lower())


VOCABULARY = tuple(sorted(
    {token for sentence in SENTENCES.values() for token in _normalize(re.sub(r"\{\w+\}", " ", sentence))}
    | {name.lower() for name in TEAM_NAMES} | set(SIDES) | NUMBER_WORDS))


@dataclass(frozen=True)
class Fact:
    """One checkable statement: an event (kind, acting team) or a recap, with the numbers it states."""

    kind: str  # an event kind of world.EVENT_KINDS, or "recap"
    team: str  # acting team's name; "" for a recap
    score: tuple[int, int] | None = None  # (home, away) goals stated by a 'goal' or 'recap'; else None
    side: str = ""  # the acting team's side (SIDES); "" for a recap


@dataclass(frozen=True)
class SecondTruth:
    second: int
    facts: tuple[Fact, ...]  # empty for a silent second
    words: tuple[Word, ...]

    @property
    def text(self) -> str:
        return " ".join(word for _, _, word in self.words)


def fact_sentence(fact: Fact) -> str:
    home_goals, away_goals = map(number_words, fact.score) if fact.score else (None, None)
    return SENTENCES[fact.kind].format(team=fact.team, side=fact.side, home_goals=home_goals, away_goals=away_goals)


def match_intro(teams: tuple[str, str]) -> str:
    """The previous text every stream of the match of `teams` (home, away) starts from: each team
    followed by its side, as every event names it."""
    return INTRO.format(home=teams[0], away=teams[1])


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

    def comment(self, record: SecondRecord) -> SecondTruth:
        s = record.second
        facts = []
        for event in record.events:
            self._score = event.score
            goal = event.kind == "goal"
            facts.append(Fact(event.kind, self.teams[event.team], self._score if goal else None, SIDES[event.team]))
        if s > 0 and s % RECAP_PERIOD_SECONDS == 0 and not any(fact.score for fact in facts):
            facts.append(Fact("recap", "", self._score))
        text = " ".join(fact_sentence(fact) for fact in facts)
        return SecondTruth(s, tuple(facts), timed_words(s, text) if text else ())


def _pattern(sentence: str) -> list[str]:
    """A sentence template as normalized tokens, its `{slot}`s kept as they are."""
    tokens = []
    for piece in re.findall(r"\{\w+\}|[^\s{}]+", sentence):
        tokens.extend([piece] if piece.startswith("{") else _normalize(piece))
    return tokens


_PATTERNS = {kind: _pattern(sentence) for kind, sentence in SENTENCES.items()}
_TEAMS_BY_TOKEN = {name.lower(): name for name in TEAM_NAMES}


def _match(pattern: list[str], tokens: list[str]) -> tuple[dict[str, str | int], int] | None:
    """(slot values, tokens used) if `tokens` starts with `pattern`, else None."""
    slots: dict[str, str | int] = {}
    i = 0
    for want in pattern:
        if i >= len(tokens):
            return None
        if want in _NUMBER_SLOTS:
            number = parse_number(tokens, i)
            if number is None:
                return None
            slots[want], i = number
            continue
        if want == "{team}" and tokens[i] in _TEAMS_BY_TOKEN:
            slots[want] = _TEAMS_BY_TOKEN[tokens[i]]
        elif want == "{side}" and tokens[i] in SIDES:
            slots[want] = tokens[i]
        elif want != tokens[i]:
            return None
        i += 1
    return slots, i


def parse_facts(text: str) -> tuple[Fact, ...]:
    """The facts stated in a commentary text; words outside the sentence templates are skipped."""
    tokens = _normalize(text)
    facts = []
    i = 0
    while i < len(tokens):
        for kind, pattern in _PATTERNS.items():
            matched = _match(pattern, tokens[i:])
            if matched is not None:
                facts.append(_fact(kind, matched[0]))
                i += matched[1]
                break
        else:
            i += 1
    return tuple(facts)


def _fact(kind: str, slots: dict[str, str | int]) -> Fact:
    score = (int(slots["{home_goals}"]), int(slots["{away_goals}"])) if "{home_goals}" in slots else None
    return Fact(kind, str(slots.get("{team}", "")), score, str(slots.get("{side}", "")))


@dataclass(frozen=True)
class SecondScore:
    second: int
    silent: bool  # the truth says nothing this second
    events_correct: bool  # the same (kind, team, side) statements as the truth; silence when silent
    score_correct: bool | None  # every score the truth states, stated right; None if none is due

    @property
    def correct(self) -> bool:
        return self.events_correct and self.score_correct is not False


def score_commentary(predicted: Sequence[str], truth: Sequence[SecondTruth]) -> list[SecondScore]:
    """Per-second correctness of predicted texts (one per second, aligned with `truth`).

    Tolerant of case, punctuation, spacing, `...` markers and words outside the templates; not of
    a wrong or missing event, team, side or score.
    """
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted seconds for {len(truth)} true ones")
    scores = []
    for text, true in zip(predicted, truth):
        said = parse_facts(text)
        events_correct = (Counter((f.kind, f.team, f.side) for f in said)
                          == Counter((f.kind, f.team, f.side) for f in true.facts))
        with_score = [f for f in true.facts if f.score is not None]
        score_correct = all(f in said for f in with_score) if with_score else None
        scores.append(SecondScore(true.second, not true.facts, events_correct, score_correct))
    return scores


# A stated score whose last change is older than this is long-remembered: past the demo's 8 s
# vision window and the paper's 16 s one, only the commentary history can carry it.
LONG_MEMORY_S = 16


def score_consistency(predicted: Sequence[str]) -> list[bool | None]:
    """For each predicted second (in order from the stream's start): whether every score it states
    is the one the commentary's own earlier statements imply (its last stated score, 0-0 before any,
    raised by one for the side of each goal it calls); None where it states no score. Unlike
    score_commentary it asks nothing of the truth: a miscounted goal is one inconsistent second,
    while forgetting or garbling the score is inconsistent wherever it is stated."""
    held, consistent = (0, 0), []
    for text in predicted:
        stated = [f for f in parse_facts(text) if f.score is not None]
        ok = True
        for fact in stated:
            implied = held
            if fact.kind == "goal":
                slot = SIDES.index(fact.side)
                implied = tuple(n + (i == slot) for i, n in enumerate(held))
            ok &= fact.score == implied
            held = fact.score
        consistent.append(ok if stated else None)
    return consistent


def memory_ages(truths: Sequence[SecondTruth]) -> list[int | None]:
    """For each second stating the score (a goal or a recap): seconds since the score it builds on
    last changed (the previous goal; the stream's start if none); None where no score is stated.
    `truths` run from the stream's start, where the score starts (0-0 as old as the match)."""
    last_goal, ages = 0, []
    for truth in truths:
        kinds = {fact.kind for fact in truth.facts}
        ages.append(truth.second - last_goal if kinds & {"goal", "recap"} else None)
        if "goal" in kinds:
            last_goal = truth.second
    return ages


def summarize_scores(scores: Sequence[SecondScore], ages: Sequence[int | None] | None = None,
                     long_s: int = LONG_MEMORY_S, consistent: Sequence[bool | None] | None = None) -> dict[str, float]:
    """Accuracy over all seconds, then separately over eventful and silent seconds and over the
    scores due (goals and recaps). With `ages` (memory_ages of the same seconds) also over the
    scores last changed more than `long_s` seconds before (those only memory can carry). With
    `consistent` (score_consistency of the same seconds) also the share of stated scores that agree
    with the commentary's own earlier ones. A rate with nothing to rate is None."""
    def rate(values):
        return sum(values) / len(values) if values else None

    summary = {
        "seconds": len(scores),
        "accuracy": rate([s.correct for s in scores]),
        "event_accuracy": rate([s.events_correct for s in scores if not s.silent]),
        "silence_accuracy": rate([s.events_correct for s in scores if s.silent]),
        "score_seconds": sum(s.score_correct is not None for s in scores),
        "score_accuracy": rate([s.score_correct for s in scores if s.score_correct is not None]),
    }
    if ages is not None:
        if len(ages) != len(scores):
            raise ValueError(f"{len(ages)} ages for {len(scores)} scored seconds")
        due = [s.score_correct for s, age in zip(scores, ages) if age is not None and age > long_s]
        summary.update(memory_seconds=len(due), memory_accuracy=rate(due))
    if consistent is not None:
        if len(consistent) != len(scores):
            raise ValueError(f"{len(consistent)} consistency flags for {len(scores)} scored seconds")
        stated = [c for c in consistent if c is not None]
        summary.update(stated_score_seconds=len(stated), score_consistency=rate(stated))
    return summary
