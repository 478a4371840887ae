"""How an engine speculates: one config, one set of defaults, shared by the API, the command line and
the build (`python -m compile.build`). BuildConfig holds the graphs' shapes; this holds the method.

    SpeculationConfig()                                  P-EAGLE, K=7, context lookup, datastore where
                                                         the drafter has one, K chosen per step by cost
    SpeculationConfig(mode="sequential")                 EAGLE-style drafting (K drafter passes)
    SpeculationConfig(mode="plain")                      no speculation: the reference
    SpeculationConfig(lookup_ngram=0, datastore=False)   the drafter alone

The defaults are the command line's, measured on held-out prompts (BENCHMARKS.md). `resolved()` turns
"auto" and unset values into what they mean for a drafter, and is what a build records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from neuron_peagle import checks
from neuron_peagle.errors import ConfigError

MODES = ("parallel", "sequential", "plain")
# Context lookup's longest n-gram: on held-out prompts, 5 backing off to 2 accepted the most; 8 gained
# nothing, and single tokens match by chance too often (docs/benchmark-history.md).
DEFAULT_LOOKUP_NGRAM = 5
# The short K, a second step graph the engine may choose: the drafter's own drafts past the third are
# rarely accepted, while a copied span often is, whole (docs/benchmark-history.md); and where a step's
# rows are many, a shorter verify costs much less.
DEFAULT_SHORT_DRAFT_TOKENS = 3


@dataclass(frozen=True)
class SpeculationConfig:
    """- mode: "parallel" (P-EAGLE: all K drafts from one drafter pass), "sequential" (EAGLE-style: K
      drafter passes) or "plain" (no drafter).
    - num_speculative_tokens: K, the drafts per step.
    - lookup_ngram: context lookup (graphs/lookup.py) replaces drafts by tokens copied from earlier in the
      sequence wherever its last n tokens (backing off to 2) occurred before; 0: the drafter alone; unset:
      DEFAULT_LOOKUP_NGRAM, or 0 in plain mode (which refuses any other value).
    - datastore: with lookup, drafts 2..K may come from the drafter directory's n-gram datastore of the
      target's answers (graphs/datastore_lookup.py); "auto": where the drafter has one.
    - short_draft_tokens: a second step graph drafting this many; the engine picks, before each step, the
      K (of K, the short K and K = 0 where compiled) that commits the most tokens per second, from its
      measured step times and running acceptance (runtime/k_choice.py); 0: none; None: the default for
      the configuration (DEFAULT_SHORT_DRAFT_TOKENS where K is longer, and K is chosen by cost: at batch
      sizes above 1, at batch 1 on backends whose step cost grows with its rows (the CPU backends:
      Capabilities.k_choice_at_batch_1), or where lookup is on without a datastore).
    - plain_step: a K = 0 step graph (plain decoding on the speculative state) the engine may choose where
      drafting does not pay, e.g. a large batch on a compute-bound machine; "auto": where K is chosen by
      cost (above batch 1, and at batch 1 on the CPU backends).
    """

    mode: str = "parallel"
    num_speculative_tokens: int = 7
    lookup_ngram: int | None = None  # None: DEFAULT_LOOKUP_NGRAM when speculating, 0 in plain mode
    datastore: bool | str = "auto"
    short_draft_tokens: int | None = None
    plain_step: bool | str = "auto"

    def __post_init__(self) -> None:
        checks.choice("mode", self.mode, MODES)
        if self.lookup_ngram is None:
            object.__setattr__(self, "lookup_ngram", 0 if self.plain else DEFAULT_LOOKUP_NGRAM)
        checks.integer("num_speculative_tokens", self.num_speculative_tokens, minimum=0 if self.plain else 1)
        checks.integer("lookup_ngram", self.lookup_ngram, minimum=0)
        if self.plain and self.lookup_ngram:
            raise ConfigError("lookup_ngram needs a speculative mode: plain decoding drafts nothing")
        if not (isinstance(self.datastore, bool) or self.datastore == "auto"):
            raise ConfigError(f"datastore must be True, False or 'auto', got {self.datastore!r}")
        if self.short_draft_tokens is not None:
            checks.integer("short_draft_tokens", self.short_draft_tokens, minimum=0)
        if self.datastore is True and not self.lookup_ngram:
            raise ConfigError("datastore needs context lookup (its continuations are drafted by the lookup); "
                              "set lookup_ngram too")
        if not (isinstance(self.plain_step, bool) or self.plain_step == "auto"):
            raise ConfigError(f"plain_step must be True, False or 'auto', got {self.plain_step!r}")
        if not self.plain and self.short_draft_tokens and not self.short_draft_tokens < self.num_speculative_tokens:
            raise ConfigError(f"short_draft_tokens (a second K) must be below num_speculative_tokens "
                              f"{self.num_speculative_tokens}, got {self.short_draft_tokens}")

    @property
    def plain(self) -> bool:
        return self.mode == "plain"

    def check_fits(self, max_length: int) -> None:
        """The settings fit a cache of `max_length` slots: a lookup n-gram shorter than the cache, and a
        step's K+1 slots with room for a prompt."""
        if self.plain:
            return
        if self.lookup_ngram >= max_length:
            raise ConfigError(f"lookup_ngram {self.lookup_ngram} must be below max_length {max_length}: the n-gram "
                              "is looked up in the sequence, which the cache holds")
        if self.num_speculative_tokens + 1 >= max_length:
            raise ConfigError(f"num_speculative_tokens {self.num_speculative_tokens} leaves no room in max_length "
                              f"{max_length}: a step writes K+1 cache slots past the sequence")

    def resolved(self, drafter_has_datastore: bool, batch_size: int = 1,
                 k_choice_at_batch_1: bool = False) -> "SpeculationConfig":
        """Every value concrete: plain decoding drafts nothing (K 0, no lookup); an "auto" datastore is on
        where lookup is and the drafter has one; an unset short K and an "auto" plain step are the
        configuration's defaults for `batch_size` slots on a backend that does or does not choose K at
        batch 1 (`Capabilities.k_choice_at_batch_1`)."""
        if self.plain:
            return SpeculationConfig("plain", 0, 0, False, 0, False)
        datastore = self.datastore
        if datastore == "auto":
            datastore = bool(self.lookup_ngram) and drafter_has_datastore
        chooses = batch_size > 1 or k_choice_at_batch_1
        short = self.short_draft_tokens
        if short is None:
            wanted = chooses or (self.lookup_ngram and not datastore)
            short = DEFAULT_SHORT_DRAFT_TOKENS if wanted and self.num_speculative_tokens > DEFAULT_SHORT_DRAFT_TOKENS else 0
        plain_step = chooses if self.plain_step == "auto" else self.plain_step
        return dataclasses.replace(self, datastore=datastore, short_draft_tokens=short, plain_step=plain_step)

    @property
    def step_ks(self) -> tuple[int, ...]:
        """The K of every step graph (resolved settings), longest first: K, the short K, 0."""
        return ((self.num_speculative_tokens,) + ((self.short_draft_tokens,) if self.short_draft_tokens else ())
                + ((0,) if self.plain_step is True else ()))

    def describe(self) -> str:
        """One line for people: the method, K and what drafts besides the drafter."""
        if self.plain:
            return "plain decoding"
        text = f"{'P-EAGLE' if self.mode == 'parallel' else 'sequential drafting'}, K={self.num_speculative_tokens}"
        if self.lookup_ngram:
            text += f", context lookup of up to {self.lookup_ngram}-grams"
        if self.short_draft_tokens or self.plain_step is True:
            text += f", K of {{{', '.join(map(str, self.step_ks))}}} chosen per step by cost"
        if self.datastore is True:
            text += ", the drafter's n-gram datastore"
        return text

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SpeculationConfig":
        return checks.dataclass_from_dict(cls, data, "speculation settings")

    @classmethod
    def of(cls, value: "SpeculationConfig | dict[str, Any] | None") -> "SpeculationConfig":
        """A config from itself, a dict of its fields, or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, dict):
            return cls.from_dict(value)
        if not isinstance(value, cls):
            raise ConfigError(f"speculation must be a SpeculationConfig or a dict of its fields, got "
                              f"{type(value).__name__}")
        return value
