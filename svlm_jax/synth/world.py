"""A seeded five-a-side football match that never ends, advanced one second at a time.

Pitch coordinates: x in [0, 1] runs from the home goal line (x = 0) to the away goal line
(x = 1), y in [0, 1] across the pitch. The home team (index 0) attacks +x, the away team
(index 1) attacks -x. x slightly outside [0, 1] means behind a goal line (in the net, or wide).
Each team has a keeper (player 0), two defenders and two forwards.

Time: second s covers (s, s + 1]. The state is sampled at s, s + 0.5 and s + 1.0 (2 Hz sub-steps)
and each event of second s is stamped at one of its sub-steps. At most one event happens per
second, so "what happened in this second" is unambiguous for both the commentary and the frames.

The clock never stops and the match never ends: `clock_text` shows the elapsed time modulo
90 minutes (the display wraps to 00:00 at each 90:00; the score keeps running).
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

HOME, AWAY = 0, 1
TEAM_NAMES = ("Red", "Blue", "Yellow", "Black", "Purple", "Orange")
PLAYERS_PER_TEAM = 5
KEEPER = 0
KICKER = 3  # the forward who takes kick-offs
EVENT_KINDS = ("kickoff", "pass", "tackle", "shot", "save", "miss", "goal", "foul")
CLOCK_PERIOD_SECONDS = 90 * 60
GOAL_MOUTH = (0.4, 0.6)  # y range between the posts

# Formation in team coordinates (u = progress towards the goal the team attacks, y).
_FORMATION = np.array([[0.03, 0.5], [0.25, 0.3], [0.25, 0.7], [0.55, 0.35], [0.55, 0.65]])


@dataclass(frozen=True)
class MatchConfig:
    """The seed picks the teams and every random choice; the weights set the pace."""

    seed: int
    # Relative weights of an outfield player's options in an open-play second.
    dribble_weight: float = 0.30  # silent
    pass_weight: float = 0.40
    tackle_weight: float = 0.12
    foul_weight: float = 0.017
    shot_weight: float = 0.35  # only within shooting range
    shooting_range: float = 0.68  # attacking progress u from which shots are possible
    keeper_hold_probability: float = 0.3  # a keeper in possession waits (silent) instead of passing
    # Shot outcomes: goal, save, or wide otherwise. Lively, so a few minutes of play hold several
    # goals and the score the commentary has to remember keeps changing.
    goal_probability: float = 0.5
    save_probability: float = 0.3
    celebration_seconds: int = 2  # silent seconds between a goal and the kick-off


@dataclass(frozen=True)
class Snapshot:
    time: float
    players: np.ndarray  # (2, PLAYERS_PER_TEAM, 2) pitch xy
    ball: np.ndarray  # (2,) pitch xy
    possessor: tuple[int, int] | None  # (team, player); None while the ball travels or is dead


@dataclass(frozen=True)
class Event:
    time: float
    kind: str  # one of EVENT_KINDS
    team: int  # the acting team: passer, tackler, shooter, saving keeper, scorer, fouler, kicker
    score: tuple[int, int]  # goals (home, away) after this event


@dataclass(frozen=True)
class SecondRecord:
    second: int
    snapshots: tuple[Snapshot, Snapshot, Snapshot]  # at second, second + 0.5, second + 1.0
    events: tuple[Event, ...]  # empty (a silent second) or one event


def clock_text(second: int) -> str:
    elapsed = second % CLOCK_PERIOD_SECONDS
    return f"{elapsed // 60:02d}:{elapsed % 60:02d}"


def _to_team(xy: np.ndarray, team: int) -> np.ndarray:
    """Pitch xy <-> team (u, y); the mapping is its own inverse."""
    return xy if team == HOME else np.array([1.0 - xy[0], xy[1]])


class Match:
    """`step()` plays the next second; iterate for a never-ending stream of SecondRecords."""

    def __init__(self, config: MatchConfig):
        self.config = config
        self._rng = np.random.default_rng(config.seed)
        home, away = self._rng.choice(len(TEAM_NAMES), size=2, replace=False)
        self.teams = (TEAM_NAMES[home], TEAM_NAMES[away])
        self._players = self._kickoff_formation()
        self._ball = np.array([0.5, 0.5])
        self._possessor: tuple[int, int] | None = None
        self._score = [0, 0]
        self._second = 0
        self._phase = "kickoff"
        self._phase_team = int(self._rng.integers(2))  # who kicks off / restarts / shot
        self._shot: tuple[str, float] = ("", 0.0)  # (outcome, target y) of the shot in flight
        self._celebration_left = 0

    def __iter__(self) -> Iterator[SecondRecord]:
        while True:
            yield self.step()

    def step(self) -> SecondRecord:
        s = self._second
        self._snapshots = [self._snapshot(float(s))]
        self._events: list[Event] = []
        {
            "kickoff": self._kickoff_second,
            "play": self._play_second,
            "restart": self._restart_second,
            "shot_outcome": self._shot_outcome_second,
            "celebration": self._celebration_second,
        }[self._phase](s)
        self._second += 1
        return SecondRecord(s, tuple(self._snapshots), tuple(self._events))

    # --- bookkeeping ---------------------------------------------------------------------

    def _snapshot(self, time: float) -> Snapshot:
        if self._possessor is not None:
            self._ball = self._players[self._possessor].copy()
        return Snapshot(time, self._players.copy(), self._ball.copy(), self._possessor)

    def _substep(self, s: int, k: int) -> None:
        """Record the state at sub-step k (1 or 2) of second s."""
        self._snapshots.append(self._snapshot(s + 0.5 * k))

    def _event(self, time: float, kind: str, team: int) -> None:
        self._events.append(Event(time, kind, team, tuple(self._score)))

    def _kickoff_formation(self) -> np.ndarray:
        players = np.empty((2, PLAYERS_PER_TEAM, 2))
        for team in (HOME, AWAY):
            for p, (u, y) in enumerate(_FORMATION):
                players[team, p] = _to_team(np.array([u * 0.8, y]), team)  # own half
        return players

    def _drift(self, still: tuple[tuple[int, int], ...] = ()) -> None:
        """Move every player except `still` half-way to a ball-following formation spot, with jitter."""
        for team in (HOME, AWAY):
            ball_u, ball_y = _to_team(self._ball, team)
            for p, (u, y) in enumerate(_FORMATION):
                if (team, p) in still or (team, p) == self._possessor:
                    continue
                if p == KEEPER:
                    target = np.array([u, np.clip(0.5 + 0.4 * (ball_y - 0.5), 0.35, 0.65)])
                else:
                    target = np.array([np.clip(u + 0.45 * (ball_u - 0.5), 0.05, 0.92),
                                       np.clip(y + 0.25 * (ball_y - 0.5), 0.05, 0.95)])
                current = self._players[team, p]
                moved = current + 0.5 * (_to_team(target, team) - current)
                self._players[team, p] = np.clip(moved + self._rng.normal(0.0, 0.012, 2), 0.02, 0.98)

    def _nearest_opponent(self, team: int) -> int:
        opponents = self._players[1 - team, 1:]
        return 1 + int(np.argmin(np.linalg.norm(opponents - self._ball, axis=1)))

    # --- phases ----------------------------------------------------------------------------

    def _kickoff_second(self, s: int) -> None:
        team = self._phase_team
        self._players = self._kickoff_formation()
        self._players[team, KICKER] = [0.5, 0.5]
        self._possessor = (team, KICKER)
        self._substep(s, 1)
        self._event(s + 0.5, "kickoff", team)
        self._dribble(team, du=0.03)
        self._substep(s, 2)
        self._phase = "play"

    def _restart_second(self, s: int) -> None:
        """The free kick after a foul: the game stands still for a second."""
        self._substep(s, 1)
        self._substep(s, 2)
        self._phase = "play"

    def _celebration_second(self, s: int) -> None:
        for k in (1, 2):
            self._drift()
            self._substep(s, k)
        self._celebration_left -= 1
        if self._celebration_left == 0:
            self._phase = "kickoff"

    def _play_second(self, s: int) -> None:
        team, player = self._possessor
        cfg = self.config
        if player == KEEPER:
            action = "hold" if self._rng.random() < cfg.keeper_hold_probability else "pass"
        else:
            in_range = _to_team(self._ball, team)[0] >= cfg.shooting_range
            options = {"dribble": cfg.dribble_weight, "pass": cfg.pass_weight,
                       "tackle": cfg.tackle_weight, "foul": cfg.foul_weight,
                       "shot": cfg.shot_weight if in_range else 0.0}
            weights = np.array(list(options.values()))
            action = list(options)[self._rng.choice(len(options), p=weights / weights.sum())]
        if action == "hold":
            for k in (1, 2):
                self._drift()
                self._substep(s, k)
        elif action == "dribble":
            for k in (1, 2):
                self._dribble(team, du=self._rng.uniform(0.02, 0.04))
                self._drift()
                self._substep(s, k)
        elif action == "pass":
            self._pass(s, team, player)
        elif action == "tackle":
            self._tackle(s, team)
        elif action == "foul":
            self._foul(s, team)
        else:
            self._shoot(s, team, player)

    def _dribble(self, team: int, du: float) -> None:
        u, y = _to_team(self._players[self._possessor], team)
        stepped = np.array([min(u + du, 0.9), np.clip(y + self._rng.normal(0.0, 0.02), 0.1, 0.9)])
        self._players[self._possessor] = _to_team(stepped, team)
        self._ball = self._players[self._possessor].copy()

    def _pass(self, s: int, team: int, passer: int) -> None:
        mates = [p for p in range(1, PLAYERS_PER_TEAM) if p != passer]
        progress = np.array([_to_team(self._players[team, p], team)[0] for p in mates])
        weights = np.exp(3.0 * progress)  # forward passes are likelier
        receiver = mates[self._rng.choice(len(mates), p=weights / weights.sum())]
        start = self._ball.copy()
        self._possessor = None
        self._drift()
        self._ball = 0.5 * (start + self._players[team, receiver])
        self._substep(s, 1)
        self._event(s + 0.5, "pass", team)
        self._drift()
        self._possessor = (team, receiver)
        self._substep(s, 2)

    def _tackle(self, s: int, team: int) -> None:
        winner = 1 - team
        tackler = self._nearest_opponent(team)
        self._players[winner, tackler] = self._ball
        self._possessor = (winner, tackler)
        self._drift()
        self._substep(s, 1)
        self._event(s + 0.5, "tackle", winner)
        self._dribble(winner, du=0.03)
        self._drift()
        self._substep(s, 2)

    def _foul(self, s: int, team: int) -> None:
        fouler = 1 - team
        offender = self._nearest_opponent(team)
        towards_own_goal = -0.03 if fouler == HOME else 0.03
        self._players[fouler, offender] = self._ball + [towards_own_goal, 0.0]
        self._drift(still=((fouler, offender),))
        self._substep(s, 1)
        self._event(s + 0.5, "foul", fouler)
        self._substep(s, 2)  # play stops at the whistle
        self._phase = "restart"

    def _shoot(self, s: int, team: int, shooter: int) -> None:
        cfg = self.config
        outcome = self._rng.choice(["goal", "save", "miss"],
                                   p=[cfg.goal_probability, cfg.save_probability,
                                      1.0 - cfg.goal_probability - cfg.save_probability])
        if outcome == "miss":
            target_y = 0.5 + self._rng.choice([-1.0, 1.0]) * self._rng.uniform(0.2, 0.3)
        else:
            target_y = self._rng.uniform(GOAL_MOUTH[0] + 0.03, GOAL_MOUTH[1] - 0.03)
        start = self._ball.copy()
        goal_line = _to_team(np.array([0.95, target_y]), team)
        self._possessor = None
        self._ball = 0.5 * (start + goal_line)
        self._drift()
        self._substep(s, 1)
        self._event(s + 0.5, "shot", team)
        self._ball = goal_line
        self._drift()
        self._substep(s, 2)
        self._phase, self._phase_team, self._shot = "shot_outcome", team, (str(outcome), target_y)

    def _shot_outcome_second(self, s: int) -> None:
        team, (outcome, target_y) = self._phase_team, self._shot
        defender = 1 - team
        if outcome == "save":
            self._players[defender, KEEPER] = self._ball
            self._possessor = (defender, KEEPER)
            self._drift()
            self._substep(s, 1)
            self._event(s + 0.5, "save", defender)
            self._drift()
            self._substep(s, 2)
            self._phase = "play"
            return
        self._ball = _to_team(np.array([1.03, target_y]), team)  # behind the line
        self._drift()
        self._substep(s, 1)
        if outcome == "goal":
            self._score[team] += 1
            self._event(s + 0.5, "goal", team)
            self._drift()
            self._substep(s, 2)
            self._phase, self._phase_team = "celebration", defender
            self._celebration_left = self.config.celebration_seconds
        else:
            self._event(s + 0.5, "miss", team)
            self._possessor = (defender, KEEPER)  # goal kick
            self._substep(s, 2)
            self._phase = "play"
