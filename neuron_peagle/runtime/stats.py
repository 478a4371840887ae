"""Per-request statistics of a generation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class RequestStats:
    num_prompt_tokens: int = 0
    num_new_tokens: int = 0
    prefill_time_s: float = 0.0
    # Wall time of the decode steps this request took part in (shared by the rows of its batch).
    decode_time_s: float = 0.0
    num_steps: int = 0
    # Tokens committed by decode steps (the first token comes from prefill and is not counted).
    num_decoded_tokens: int = 0
    finish_reason: str = ""  # "stop" (stop token or string), "length" (max_new_tokens or max_length)
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of decoding, prefill excluded."""
        return self.num_decoded_tokens / self.decode_time_s if self.decode_time_s > 0 else 0.0

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.update(data.pop("extra"))
        data["tokens_per_s"] = self.tokens_per_s
        return data
