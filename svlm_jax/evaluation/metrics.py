"""Per-second numbers of a streamed commentary that need no judge.

The inputs are aligned lists, one entry per second of the evaluated stream: the model's commentary
text, the reference's text of the same second (`reference_by_second`), the wall time the second took.

  latency      seconds of wall time per second of video (reading, preprocessing and the model's
               round), the first (which compiles) apart; the real-time factor is the mean after
               the first (`svlm stream`'s definition, cli.StreamTimes): below 1 keeps up with live video
  silence      share of seconds whose commentary has no word
  words/s      words said per second of video
  agreement    model words matched to reference words of the same spelling (case-folded, without
               punctuation: `words_of`) in the same second, or at most `tolerance_s` seconds apart;
               each reference word matches at most once. precision = matched / model words,
               recall = matched / reference words, F1 their harmonic mean; None when undefined.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Sequence

import numpy as np

WORD = re.compile(r"\w+")


def words_of(text: str) -> list[str]:
    """The words of a text as compared: case-folded letter/digit runs (punctuation and " ..." drop out)."""
    return WORD.findall(text.casefold())


@dataclasses.dataclass(frozen=True)
class Agreement:
    tolerance_s: int
    matched: int
    model_words: int
    reference_words: int

    @property
    def precision(self) -> float | None:
        return self.matched / self.model_words if self.model_words else None

    @property
    def recall(self) -> float | None:
        return self.matched / self.reference_words if self.reference_words else None

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        if p is None or r is None:
            return None
        return 2 * p * r / (p + r) if p + r else 0.0

    def record(self) -> dict:
        return {**dataclasses.asdict(self), "precision": self.precision, "recall": self.recall, "f1": self.f1}


def word_agreement(model_texts: Sequence[str], reference_texts: Sequence[str], tolerance_s: int) -> Agreement:
    """The largest matching of model words to equal reference words at most `tolerance_s` seconds
    apart. Per spelling, each model word (in time order) takes the earliest reference word still
    free within reach: with reaches of equal width this greedy choice is a maximum matching."""
    if len(model_texts) != len(reference_texts):
        raise ValueError(f"{len(model_texts)} model seconds for {len(reference_texts)} reference seconds")
    free = [collections.Counter(words_of(text)) for text in reference_texts]
    matched = n_model = 0
    for s, text in enumerate(model_texts):
        for word in words_of(text):
            n_model += 1
            for t in range(max(0, s - tolerance_s), min(len(free), s + tolerance_s + 1)):
                if free[t][word]:
                    free[t][word] -= 1
                    matched += 1
                    break
    n_reference = sum(len(words_of(text)) for text in reference_texts)
    return Agreement(tolerance_s, matched, n_model, n_reference)


def silence_ratio(texts: Sequence[str]) -> float | None:
    return sum(not words_of(text) for text in texts) / len(texts) if texts else None


def words_per_second(texts: Sequence[str]) -> float | None:
    return sum(len(words_of(text)) for text in texts) / len(texts) if texts else None


def latency_summary(latencies_s: Sequence[float], real_time_factor: float | None) -> dict:
    """The first second (it compiles) and the others' mean, median, 95th percentile and maximum."""
    steady = np.asarray(latencies_s[1:] or latencies_s, np.float64)
    if not len(steady):
        return {"seconds": 0}
    return {"seconds": len(latencies_s), "first_s": float(latencies_s[0]), "mean_s": float(steady.mean()),
            "p50_s": float(np.percentile(steady, 50)), "p95_s": float(np.percentile(steady, 95)),
            "max_s": float(steady.max()), "real_time_factor": real_time_factor}


def commentary_metrics(model_texts: Sequence[str], reference_texts: Sequence[str] | None,
                       tolerances_s: Sequence[int] = (0, 1)) -> dict:
    """Silence and words per second of the model (and the reference), and their word agreement at
    each tolerance (0: inside the second)."""
    out = {"seconds": len(model_texts), "silence_ratio": silence_ratio(model_texts),
           "words_per_second": words_per_second(model_texts)}
    if reference_texts is not None:
        out["reference_silence_ratio"] = silence_ratio(reference_texts)
        out["reference_words_per_second"] = words_per_second(reference_texts)
        out["agreement"] = {f"within_{t}s": word_agreement(model_texts, reference_texts, t).record()
                            for t in tolerances_s}
    return out

