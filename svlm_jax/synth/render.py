"""Frames of the synthetic match: bold flat shapes a tiny vision tower can read.

Layout: a bar on top with the clock (white digits in a dark box), the green pitch, a strip at the
bottom; goals as light-grey nets behind each goal line, players as squares in their team colour,
the ball as a white square. A player holding the ball is drawn last, so the ball sits inside a
ring of the possessor's colour. Like a broadcast's captions, every event shows on each frame of its
second: the top bar in the event kind's colour (EVENT_COLOURS) and the bottom strip in the acting
team's colour; a goal also draws a border in the scorer's colour round the half of the pitch
the ball went in (the right half for a home goal). Both bars are grey otherwise. In a second whose
commentary restates the score, the clock's box is RECAP_COLOUR instead of dark. Large flat areas,
so a 1M-parameter vision tower trained for minutes reads them; the score is never drawn: only the
commentary tells it.

Frame times follow the frame-end convention: at `fps` frames per second, second s is shown by the
frames at times s + (k + 1) / fps, k = 0 .. fps - 1 (s + 0.5 and s + 1.0 at 2 fps), which are the
world's sub-steps, so every event of second s is visible in that second's frames.
"""

from dataclasses import dataclass

import numpy as np

from svlm_jax.stream_format import CachePolicy
from svlm_jax.synth.world import GOAL_MOUTH, HOME, SecondRecord, Snapshot, clock_text

TEAM_COLOURS = {
    "Red": (220, 30, 30),
    "Blue": (30, 70, 235),
    "Yellow": (245, 225, 30),
    "Black": (15, 15, 15),
    "Purple": (150, 40, 200),
    "Orange": (255, 140, 0),
}
EVENT_COLOURS = {  # the top bar during an event of that kind
    "kickoff": (255, 255, 255),
    "pass": (0, 230, 230),
    "tackle": (230, 0, 230),
    "shot": (255, 150, 150),
    "save": (150, 255, 150),
    "miss": (150, 150, 255),
    "goal": (255, 255, 150),
    "foul": (120, 0, 0),
}
RECAP_COLOUR = (255, 0, 0)  # the clock's box in a second that restates the score
BALL_COLOUR = (255, 255, 255)
PITCH_COLOUR = (40, 140, 40)
LINE_COLOUR = (90, 180, 90)  # faint, so the white ball stands out
NET_COLOUR = (150, 150, 150)  # darker than the ball, which can land in it
BAR_COLOUR = (128, 128, 128)
CLOCK_BOX_COLOUR = (30, 30, 30)
DIGIT_COLOUR = (255, 255, 255)

_GLYPHS = {  # 3x5 bitmap font
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
    ":": ("000", "010", "000", "010", "000"),
}


@dataclass(frozen=True)
class RenderConfig:
    height: int = 112  # multiples of 28 match the model's merged patch size
    width: int = 112
    fps: int = CachePolicy.fps

    @property
    def bar_height(self) -> int:
        return self.height // 8

    @property
    def player_half(self) -> int:
        """Players are squares of side 2 * player_half + 1."""
        return max(2, round(self.width / 37))

    @property
    def ball_half(self) -> int:
        return max(1, self.width // 112)

    @property
    def goal_depth(self) -> int:
        return 2 * self.player_half


def frame_times(second: int, fps: int) -> list[float]:
    return [second + (k + 1) / fps for k in range(fps)]


def pitch_to_pixel(xy: np.ndarray, config: RenderConfig) -> tuple[int, int]:
    """(row, col) of a pitch point; x outside [0, 1] lands in the goal-net margins."""
    col0, col1 = config.goal_depth, config.width - 1 - config.goal_depth
    row0, row1 = config.bar_height + 1, config.height - config.bar_height - 2
    return (int(round(row0 + xy[1] * (row1 - row0))), int(round(col0 + xy[0] * (col1 - col0))))


def render_second(record: SecondRecord, teams: tuple[str, str], config: RenderConfig,
                  recap: bool = False) -> np.ndarray:
    """The (fps, height, width, 3) uint8 frames showing second `record.second`; `recap` marks a
    second whose commentary restates the score."""
    return np.stack([render_frame(record, teams, t, config, recap) for t in frame_times(record.second, config.fps)])


def render_frame(record: SecondRecord, teams: tuple[str, str], time: float, config: RenderConfig,
                 recap: bool = False) -> np.ndarray:
    """The frame at `time` in [second, second + 1], interpolated between the world's sub-steps (at
    `second` itself: the state at that instant, which only a video's opening frame shows)."""
    s = record.second
    if not s <= time <= s + 1:
        raise ValueError(f"time {time} is outside second {s}")
    before, after = record.snapshots[:2] if time <= s + 0.5 else record.snapshots[1:]
    weight = (time - before.time) / (after.time - before.time)
    frame = np.empty((config.height, config.width, 3), np.uint8)
    event = record.events[0] if record.events else None  # at most one per second
    _draw_bar(frame, s, EVENT_COLOURS[event.kind] if event else BAR_COLOUR, RECAP_COLOUR if recap else CLOCK_BOX_COLOUR,
              config)
    frame[config.height - config.bar_height:] = TEAM_COLOURS[teams[event.team]] if event else BAR_COLOUR
    _draw_pitch(frame, config)
    if event and event.kind == "goal":
        _draw_pitch_border(frame, TEAM_COLOURS[teams[event.team]], event.team == HOME, config)
    _draw_players_and_ball(frame, before, after, weight, teams, config)
    return frame


def _draw_bar(frame: np.ndarray, second: int, colour: tuple[int, int, int], box_colour: tuple[int, int, int],
              config: RenderConfig) -> None:
    bar = frame[: config.bar_height]
    bar[:] = colour
    text = clock_text(second)
    scale = max(1, (config.bar_height - 2) // 5)
    glyph_width = 4 * scale  # 3 columns plus one of spacing
    left = (config.width - len(text) * glyph_width) // 2
    top = (config.bar_height - 5 * scale) // 2
    bar[max(0, top - 1): top + 5 * scale + 1, left - 2: left + len(text) * glyph_width + 1] = box_colour
    for i, char in enumerate(text):
        bits = np.array([[c == "1" for c in row] for row in _GLYPHS[char]])
        pixels = np.kron(bits, np.ones((scale, scale), bool))
        region = bar[top: top + 5 * scale, left + i * glyph_width: left + i * glyph_width + 3 * scale]
        region[pixels] = DIGIT_COLOUR


def _draw_pitch(frame: np.ndarray, config: RenderConfig) -> None:
    frame[config.bar_height: config.height - config.bar_height] = PITCH_COLOUR
    top, left = pitch_to_pixel(np.array([0.0, 0.0]), config)
    bottom, right = pitch_to_pixel(np.array([1.0, 1.0]), config)
    centre_col = (left + right) // 2
    frame[top: bottom + 1, centre_col] = LINE_COLOUR
    frame[top: bottom + 1, left] = LINE_COLOUR
    frame[top: bottom + 1, right] = LINE_COLOUR
    post_top = pitch_to_pixel(np.array([0.0, GOAL_MOUTH[0]]), config)[0]
    post_bottom = pitch_to_pixel(np.array([0.0, GOAL_MOUTH[1]]), config)[0]
    frame[post_top: post_bottom + 1, :left] = NET_COLOUR
    frame[post_top: post_bottom + 1, right + 1:] = NET_COLOUR


def _draw_pitch_border(frame: np.ndarray, colour: tuple[int, int, int], right_half: bool, config: RenderConfig) -> None:
    thickness = config.player_half
    pitch = frame[config.bar_height: config.height - config.bar_height]
    half = pitch[:, config.width // 2:] if right_half else pitch[:, : config.width // 2]
    half[:thickness] = colour
    half[-thickness:] = colour
    half[:, slice(-thickness, None) if right_half else slice(thickness)] = colour  # the goal line's side


def _draw_square(frame: np.ndarray, centre: tuple[int, int], half: int, colour: tuple[int, int, int],
                 config: RenderConfig) -> None:
    row, col = centre
    top = max(config.bar_height, row - half)  # never paint over the bars
    bottom = min(config.height - config.bar_height, row + half + 1)
    frame[top: max(top, bottom), max(0, col - half): col + half + 1] = colour


def _draw_players_and_ball(frame: np.ndarray, before: Snapshot, after: Snapshot, weight: float,
                           teams: tuple[str, str], config: RenderConfig) -> None:
    players = (1 - weight) * before.players + weight * after.players
    ball = (1 - weight) * before.ball + weight * after.ball
    possessor = after.possessor
    order = [(t, p) for t in range(2) for p in range(players.shape[1]) if (t, p) != possessor]
    if possessor is not None:
        order.append(possessor)  # drawn last: the ball sits in a ring of its holder's colour
    for team, player in order:
        _draw_square(frame, pitch_to_pixel(players[team, player], config), config.player_half,
                     TEAM_COLOURS[teams[team]], config)
    _draw_square(frame, pitch_to_pixel(ball, config), config.ball_half, BALL_COLOUR, config)
