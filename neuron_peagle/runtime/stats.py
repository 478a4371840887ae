"""Per-request statistics of a generation."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestStats:
    num_prompt_tokens: int = 0
    num_new_tokens: int = 0
    prefill_time_s: float = 0.0
    # Wall time of the decode steps this request took part in (shared by the rows of its batch).
    decode_time_s: float = 0.0
    # Of decode_time_s, the parts spent drafting, verifying and accepting inside the step graph
    # (measured on the eager backend only; a compiled graph is one opaque call). The rest is host.
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    accept_time_s: float = 0.0
    num_steps: int = 0
    # Tokens committed by decode steps (the first token comes from prefill and is not counted).
    num_decoded_tokens: int = 0
    num_speculative_tokens: int = 0  # K; 0 for plain decoding
    # Sum over steps of the tokens the step graph committed (accepted drafts + 1), before any
    # truncation by a stop token or the length limit.
    committed_by_steps: int = 0
    # accepted_per_position[j]: steps in which draft j+1 was accepted.
    accepted_per_position: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "stop" (stop token or string), "length" (max_new_tokens)

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of decoding, prefill excluded."""
        return self.num_decoded_tokens / self.decode_time_s if self.decode_time_s > 0 else 0.0

    @property
    def acceptance_length(self) -> float:
        """Mean tokens committed per step, the target's own token included (1.0 for plain decoding)."""
        return self.committed_by_steps / self.num_steps if self.num_steps else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        """Fraction of steps in which draft j+1 was accepted, j = 0..K-1."""
        return [a / self.num_steps if self.num_steps else 0.0 for a in self.accepted_per_position]

    @property
    def host_time_s(self) -> float:
        parts = self.draft_time_s + self.verify_time_s + self.accept_time_s
        return max(0.0, self.decode_time_s - parts) if parts else 0.0

    def record_step(self, committed: int) -> None:
        self.num_steps += 1
        self.committed_by_steps += committed
        if self.num_speculative_tokens:
            if not self.accepted_per_position:
                self.accepted_per_position = [0] * self.num_speculative_tokens
            for j in range(committed - 1):
                self.accepted_per_position[j] += 1

    def to_dict(self) -> dict:
        return {
            "num_prompt_tokens": self.num_prompt_tokens, "num_new_tokens": self.num_new_tokens,
            "finish_reason": self.finish_reason, "tokens_per_s": self.tokens_per_s,
            "prefill_time_s": self.prefill_time_s, "decode_time_s": self.decode_time_s,
            "draft_time_s": self.draft_time_s, "verify_time_s": self.verify_time_s,
            "accept_time_s": self.accept_time_s, "host_time_s": self.host_time_s,
            "num_steps": self.num_steps, "num_speculative_tokens": self.num_speculative_tokens,
            "acceptance_length": self.acceptance_length,
            "acceptance_per_position": self.acceptance_per_position,
        }
