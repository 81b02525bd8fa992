"""experiments/ablations.py: the memoryless baseline and the long-memory ages (known answers), a smoke run."""

from __future__ import annotations

import json

import pytest

from experiments import ablations
from svlm_jax.synth import Fact, SecondTruth, memory_ages, score_commentary, summarize_scores


def _truth(second: int, *facts: Fact) -> SecondTruth:
    return SecondTruth(second, facts, ())


def test_memory_ages_count_from_the_last_goal():
    """Lives in svlm_jax.synth; tested here beside the baseline built on it."""
    truths = [
        _truth(0, Fact("kickoff", "Red", side="home")),
        _truth(10, Fact("recap", "", (0, 0))),          # 0-0 since the start
        _truth(30, Fact("goal", "Blue", (0, 1), "away")),  # the score before it: since the start
        _truth(40, Fact("foul", "Blue", side="away")),               # states no score
        _truth(50, Fact("pass", "Red", side="home"), Fact("recap", "", (0, 1))),  # the goal at 30
        _truth(61),
        _truth(75, Fact("goal", "Red", (1, 1), "home")),  # previous goal at 30
        _truth(80, Fact("recap", "", (1, 1))),          # the goal at 75
    ]
    ages = memory_ages(truths)
    assert ages == [None, 10, 30, None, 20, None, 45, 5]
    said = ["Red home kick off.", "Score 0 to 0.", "Goal for Blue away! Score 0 to 1.", "Foul by Blue away.",
            "Red home passes. Score 1 to 0.", "", "Goal for Red home! Score 1 to 1.", "score 1 to 1"]
    summary = summarize_scores(score_commentary(said, truths), ages, long_s=16)
    assert summary["memory_seconds"] == 3 and summary["memory_accuracy"] == 2 / 3  # home and away swapped at 50
    assert summary["score_seconds"] == 5 and summary["score_accuracy"] == 4 / 5
    assert summary["event_accuracy"] == 1.0
    # Scores older than 16 s: seconds 30, 50, 75; remembering nothing gets only 30 (the first goal) right.
    assert ablations.memoryless_baseline(truths, 16) == 1 / 3


def test_accuracy_checks_compare_the_seconds_both_variants_streamed():
    variants = {"ours": {"accuracy": 0.5, "ms_per_token": 1.0, "seconds": 8, "correct_by_second": "11100000"},
                "sliding_overlap": {"accuracy": 0.5, "ms_per_token": 4.0, "seconds": 4, "correct_by_second": "1010"}}
    by_claim = {c["claim"]: c for c in ablations.checks(variants)}
    accuracy = by_claim["our cache is at least as accurate as sliding windows with overlap (within 2 points)"]
    assert accuracy["held"] and accuracy["over_s"] == 4
    assert accuracy["values"] == {"ours": 0.75, "sliding_overlap": 0.5}
    cost = by_claim["our cache is at least 3x cheaper per token than sliding windows with overlap"]
    assert cost["held"] and cost["over_s"] is None and cost["values"] == {"ours": 1.0, "sliding_overlap": 4.0}


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
    assert len(result["variants"]["ours"]["correct_by_second"]) == 20

    # --merge keeps what was measured and adds the new variant; a different match length refuses.
    ablations.main(["--smoke", "--variants", "native", "--out", str(tmp_path), "--merge"])
    merged = json.loads((tmp_path / "ablations.json").read_text())
    assert set(merged["variants"]) == {"ours", "sliding", "native"}
    assert merged["variants"]["ours"]["accuracy"] == result["variants"]["ours"]["accuracy"]
    assert merged["variants"]["ours"]["commit"] == result["commit"]
    assert {"ours", "native"} in [set(c["values"]) for c in merged["checks"]]
    with pytest.raises(SystemExit, match="seed"):
        ablations.main(["--variants", "native", "--minutes", "1", "--out", str(tmp_path), "--merge"])
