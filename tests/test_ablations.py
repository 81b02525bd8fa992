"""experiments/ablations.py: the memoryless baseline and the long-memory ages (known answers), a smoke run."""

from __future__ import annotations

import json

import pytest

from experiments import ablations
from svlm_jax.synth import Fact, SecondTruth, memory_ages, score_commentary, summarize_scores


def _truth(second: int, *facts: Fact) -> SecondTruth:
    return SecondTruth(second, facts, ())


def test_memory_ages_count_from_the_last_change_of_each_number():
    """Lives in svlm_jax.synth; tested here beside the baseline built on it."""
    truths = [
        _truth(0, Fact("kickoff", "Red")),
        _truth(5, Fact("foul", "Blue", (("Blue", 1),))),             # Blue's count: unchanged since the start
        _truth(30, Fact("goal", "Blue", (("Blue", 1), ("Red", 0)))),  # the score before it: since the start
        _truth(40, Fact("foul", "Blue", (("Blue", 2),))),             # Blue's previous foul at 5
        _truth(60, Fact("recap", "", (("Blue", 1), ("Red", 0)))),     # the goal at 30
        _truth(61),
        _truth(70, Fact("foul", "Red", (("Red", 1),))),
        _truth(75, Fact("goal", "Red", (("Blue", 1), ("Red", 1)))),   # previous goal at 30
        _truth(80, Fact("recap", "", (("Blue", 1), ("Red", 1)))),     # the goal at 75
    ]
    ages = memory_ages(truths)
    assert ages == [None, 5, 30, 35, 30, None, 70, 45, 5]
    said = ["Red kick off.", "Foul by Blue, number 1.", "Goal for Blue! Blue 1 Red 0.", "Foul by Blue, number 3.",
            "Still Blue 1 Red 0.", "", "Foul by Red, number 1.", "Goal for Red! Blue 1 Red 1.", "Still Red 1 Blue 1."]
    summary = summarize_scores(score_commentary(said, truths), ages, long_s=16)
    assert summary["memory_seconds"] == 5 and summary["memory_accuracy"] == 4 / 5  # only the foul at 40 wrong
    assert summary["count_seconds"] == 7 and summary["count_accuracy"] == 6 / 7
    # Numbers older than 16 s: seconds 30, 40, 60, 70, 75; remembering nothing gets 30 (1-0 from
    # 0-0) and 70 (Red's first foul) right.
    assert ablations.memoryless_baseline(truths, 16) == 2 / 5


def test_smoke_run_writes_results_tables_and_plot(tmp_path):
    ablations.main(["--smoke", "--variants", "ours", "sliding", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "ablations.json").read_text())
    assert set(result["variants"]) == {"ours", "sliding"}
    for variant in result["variants"].values():
        assert variant["seconds"] == 20 and len(variant["segments"]) == 2
        assert 0 <= variant["accuracy"] <= 1 and variant["ms_per_token"] > 0
    assert result["variants"]["sliding"]["config"]["scheme"] == "sliding"
    assert [c["values"].keys() for c in result["checks"]] == [{"ours", "sliding"}]
    table = (tmp_path / "ablations.md").read_text()
    assert "| ours | 20 |" in table and "| sliding | 20 |" in table
    assert (tmp_path / "ablations.png").stat().st_size > 0

    # --merge keeps what was measured and adds the new variant; a different match length refuses.
    ablations.main(["--smoke", "--variants", "native", "--out", str(tmp_path), "--merge"])
    merged = json.loads((tmp_path / "ablations.json").read_text())
    assert set(merged["variants"]) == {"ours", "sliding", "native"}
    assert merged["variants"]["ours"]["accuracy"] == result["variants"]["ours"]["accuracy"]
    assert merged["variants"]["ours"]["commit"] == result["commit"]
    assert {"ours", "native"} in [set(c["values"]) for c in merged["checks"]]
    with pytest.raises(SystemExit, match="seed"):
        ablations.main(["--variants", "native", "--minutes", "1", "--out", str(tmp_path), "--merge"])
