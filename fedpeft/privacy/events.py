"""Privacy events as immutable values, after dp_accounting's ``dp_event.py``: one ``DpSgdEvent``
is ``steps`` DP-SGD steps, each a Poisson sample at rate ``sample_rate`` with Gaussian noise of
multiplier ``noise_multiplier``. A site's history is a list of them; each use says what it means.

It is a NamedTuple so it *is* the ``(sigma, q, steps)`` entry Opacus' accountants keep and the
JSON on disk holds (privacy states, written before this type existed, load unchanged)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import dp_accounting


class DpSgdEvent(NamedTuple):
    noise_multiplier: float  # sigma: noise std / clipping norm
    sample_rate: float  # q: Poisson sampling probability of each record per step
    steps: int

    @classmethod
    def of(cls, entry: Sequence[float]) -> DpSgdEvent:
        """From an Opacus history entry or a JSON triple, with its types checked."""
        sigma, q, steps = entry
        return cls(float(sigma), float(q), int(steps))

    def to_dp_event(self) -> dp_accounting.DpEvent:
        """The same event in dp_accounting's vocabulary (what the audit's accountants compose)."""
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(self.sample_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)),
            self.steps)


def history_of(entries: Iterable[Sequence[float]]) -> list[DpSgdEvent]:
    return [DpSgdEvent.of(e) for e in entries]


def composed(history: Iterable[DpSgdEvent]) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent([e.to_dp_event() for e in history if e.steps > 0])
