"""K chosen by measured cost: before each step, the K that commits the most tokens per second.

The engine compiles a step graph per K it may run (SpecRunner.step_ks: the long K, the short K, and
K = 0, plain decoding on the speculative state; by default above batch 1, and at batch 1 on the CPU
backends). Two measurements drive the choice:
- the seconds of one step per K, timed on the engine's own graphs before the first request
  (`SpecRunner.calibrate`). A fixed-shape step costs the same whatever its slots hold, so the time
  does not depend on how many slots are occupied; the tokens do.
- running acceptance per draft position: alpha_j, the chance draft j is accepted once drafts 1..j-1
  were, counted over the occupied slots of every step that drafted (decayed, so the estimate follows
  the requests of the moment), kept apart for drafts context lookup copied and drafts the drafter made.

For a slot whose next `known` drafts are copies, a step of K commits in expectation
    E(K) = 1 + sum_{i=1..K} prod_{j<=i} alpha_j     (alpha_j of copies for j <= known),
and the step's worth is the sum of E(K) over the occupied slots divided by its seconds. Where no step
has drafted for a while (K = 0 won every time), one step drafts with the best K > 0, so the acceptance
it would need to win again is measured, not assumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# Prior acceptance per position, worth PRIOR_WEIGHT observations: the drafter's, and a copied span's.
PRIOR = {False: 0.6, True: 0.8}
PRIOR_WEIGHT = 2.0
# Each step's observations weigh 1; older ones fade by DECAY per step (about the last 200 steps count).
DECAY = 0.995
# After this many steps in a row without a draft, one step drafts to refresh the acceptance.
PROBE_EVERY = 64


@dataclass(frozen=True)
class KChoice:
    """One step's choice and what it was made from (step records, profiler sessions)."""

    k: int
    occupied: int  # slots holding a request
    expected_tokens: dict[int, float]  # per K: tokens the occupied slots commit in expectation
    step_seconds: dict[int, float]  # per K: measured seconds of one step
    probe: bool = False  # chosen to measure acceptance, not by its worth

    def to_dict(self) -> dict:
        return {"k": self.k, "occupied": self.occupied, "probe": self.probe,
                "expected_tokens": {str(k): round(v, 4) for k, v in self.expected_tokens.items()},
                "step_seconds": {str(k): round(v, 6) for k, v in self.step_seconds.items()}}


@dataclass
class Acceptance:
    """Decayed counts per draft position (index j-1 for draft j), for copies and for drafter drafts."""

    positions: int
    tested: dict[bool, list[float]] = field(default_factory=dict)
    accepted: dict[bool, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for copied in (False, True):
            self.tested[copied] = [0.0] * self.positions
            self.accepted[copied] = [0.0] * self.positions

    def rate(self, position: int, copied: bool) -> float:
        """alpha of draft `position` (1-based)."""
        tested = self.tested[copied][position - 1]
        return (self.accepted[copied][position - 1] + PRIOR[copied] * PRIOR_WEIGHT) / (tested + PRIOR_WEIGHT)

    def expected(self, k: int, known: int) -> float:
        """E(K) for a slot whose first `known` drafts are copies."""
        total, reach = 1.0, 1.0
        for position in range(1, k + 1):
            reach *= self.rate(position, position <= known)
            total += reach
        return total

    def observe(self, k: int, known: Sequence[int], accepted: Sequence[int]) -> None:
        """One step of K over the occupied slots: their copied-draft counts and accepted drafts."""
        for counts in (*self.tested.values(), *self.accepted.values()):
            counts[:] = [c * DECAY for c in counts]
        for row_known, row_accepted in zip(known, accepted):
            for position in range(1, min(k, row_accepted + 1) + 1):  # tested: every draft up to the first miss
                copied = position <= row_known
                self.tested[copied][position - 1] += 1.0
                if position <= row_accepted:
                    self.accepted[copied][position - 1] += 1.0


class KChooser:
    """Picks each step's K among `ks` (every compiled step graph's K) by expected tokens per second."""

    def __init__(self, ks: Sequence[int]) -> None:
        self.ks = tuple(sorted(set(ks), reverse=True))
        self.acceptance = Acceptance(max(self.ks))
        self.chooses = len(self.ks) > 1  # else every step runs the one K
        self.step_seconds: dict[int, float] = {}
        self._since_draft = 0

    def choose(self, known: Sequence[int]) -> KChoice:
        """known: per occupied slot, how many leading drafts of its next step are copies."""
        expected = {k: sum(self.acceptance.expected(k, n) for n in known) for k in self.ks}
        if not self.chooses or not self.step_seconds:
            return KChoice(self.ks[0], len(known), expected, dict(self.step_seconds))
        worth = {k: expected[k] / self.step_seconds[k] for k in self.ks}
        best = max(self.ks, key=lambda k: (worth[k], k))
        probe = best == 0 and self._since_draft >= PROBE_EVERY
        if probe:
            best = max((k for k in self.ks if k), key=lambda k: (worth[k], k))
        return KChoice(best, len(known), expected, dict(self.step_seconds), probe)

    def observe(self, k: int, known: Sequence[int], accepted: Sequence[int]) -> None:
        self._since_draft = 0 if k else self._since_draft + 1
        if k:
            self.acceptance.observe(k, known, accepted)
