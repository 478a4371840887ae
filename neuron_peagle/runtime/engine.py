"""The public Python API: `Engine.from_pretrained(...)` and `engine.generate(prompts, SamplingParams(...))`.

The engine owns the tokenizer, validates every request before any work starts (so a bad prompt in a
list never costs the others their output), batches requests to the built batch size, and hands each
batch to the host loop with the decoder of the chosen mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from neuron_peagle.backends import get_backend
from neuron_peagle.config import BuildConfig
from neuron_peagle.default_model import require_default_model
from neuron_peagle.errors import ConfigError, PromptError
from neuron_peagle.models.target import TargetModel
from neuron_peagle.runtime.host_loop import run_batch
from neuron_peagle.runtime.plain_decoder import PlainDecoder
from neuron_peagle.runtime.stats import RequestStats
from neuron_peagle.tokenizer import load_tokenizer


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None = the model's end-of-sequence tokens
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before the first one found
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    stats: RequestStats = field(default_factory=RequestStats)


# Streaming callback: (request index, newly committed token ids).
TokenCallback = Callable[[int, list[int]], None]


class Engine:
    def __init__(self, model_dir: Path, target: TargetModel, tokenizer, build: BuildConfig) -> None:
        self.model_dir = model_dir
        self.target = target
        self.tokenizer = tokenizer
        self.build = build
        self.backend = get_backend(build.backend)
        self.decoder = PlainDecoder(target, build, self.backend)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None = None, *, batch_size: int = 1,
                        max_length: int = 1024, prefill_buckets: Sequence[int] = (128, 512),
                        dtype: str = "float32", backend: str = "eager") -> "Engine":
        """Load a Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)."""
        build = BuildConfig(batch_size=batch_size, max_length=max_length,
                            prefill_buckets=tuple(prefill_buckets), dtype=dtype, backend=backend)
        path = Path(model_dir) if model_dir is not None else require_default_model()
        target = TargetModel.from_pretrained(path, build.max_length, build.torch_dtype)
        return cls(path, target, load_tokenizer(path), build)

    # ---- requests ------------------------------------------------------------------------------

    def encode(self, prompt: str, chat_template: bool = True) -> list[int]:
        if chat_template and getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams, index: int = 0) -> None:
        largest = self.build.prefill_buckets[-1]
        if len(prompt_ids) == 0:
            raise PromptError(f"prompt {index} is empty")
        if len(prompt_ids) > largest:
            raise PromptError(
                f"prompt {index} has {len(prompt_ids)} tokens, more than the largest prefill bucket "
                f"({largest}); build with a larger bucket or shorten the prompt"
            )
        if len(prompt_ids) + params.max_new_tokens > self.build.max_length:
            raise PromptError(
                f"prompt {index}: {len(prompt_ids)} prompt tokens + max_new_tokens "
                f"{params.max_new_tokens} exceed max_length {self.build.max_length}"
            )
        vocab = self.target.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise PromptError(f"prompt {index} has token ids outside the vocabulary [0, {vocab})")

    def stop_token_ids(self, params: SamplingParams) -> set[int]:
        if params.ignore_eos:
            return set()
        if params.stop_token_ids is not None:
            return set(params.stop_token_ids)
        ids = set(self.target.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | None = None, *, chat_template: bool = True,
                 on_tokens: TokenCallback | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, or token ids used as they are)."""
        params = params or SamplingParams()
        if isinstance(prompts, str):
            prompts = [prompts]
        texts: list[str | None] = []
        all_ids: list[list[int]] = []
        for prompt in prompts:
            if isinstance(prompt, str):
                texts.append(prompt)
                all_ids.append(self.encode(prompt, chat_template) if prompt else [])
            else:
                texts.append(None)
                all_ids.append([int(t) for t in prompt])
        for i, ids in enumerate(all_ids):
            self.validate(ids, params, i)

        stop_ids = self.stop_token_ids(params)
        outputs: list[RequestOutput] = []
        batch = self.build.batch_size
        for first in range(0, len(all_ids), batch):
            group = all_ids[first:first + batch]
            rows = run_batch(self.decoder, group, [params.max_new_tokens] * len(group), stop_ids,
                             self._commit_callback(first, params, on_tokens))
            for offset, row in enumerate(rows):
                text = self._final_text(row.output_ids, params)
                outputs.append(RequestOutput(texts[first + offset], group[offset], row.output_ids,
                                             text, row.stats))
        return outputs

    # ---- text ----------------------------------------------------------------------------------

    def _commit_callback(self, first: int, params: SamplingParams, on_tokens: TokenCallback | None):
        seen: dict[int, list[int]] = {}

        def on_commit(row: int, tokens: list[int]) -> bool:
            if on_tokens is not None:
                on_tokens(first + row, tokens)
            if not params.stop:
                return False
            seen.setdefault(row, []).extend(tokens)
            text = self.tokenizer.decode(seen[row], skip_special_tokens=True)
            return any(s in text for s in params.stop)

        return on_commit

    def _final_text(self, output_ids: list[int], params: SamplingParams) -> str:
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in params.stop if s in text]
        return text[: min(cuts)] if cuts else text
