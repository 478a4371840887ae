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
from neuron_peagle.parallel import TensorParallel
from neuron_peagle.runtime.batch import BatchSampling
from neuron_peagle.runtime.drafter_choice import DrafterChoice, choose_drafter, resolve_speculation
from neuron_peagle.runtime.host_loop import Decoder, StepCallback, run_batch
from neuron_peagle.runtime.plain_decoder import PlainDecoder
from neuron_peagle.runtime.spec_decoder import SpecDecoder
from neuron_peagle.runtime.stats import RequestStats
from neuron_peagle.tokenizer import encode_prompt, load_tokenizer

MODES = ("plain", "sequential", "parallel")


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
    """Generation with one target model and, in the speculative modes, one drafter.

    Modes: "parallel" (P-EAGLE: all K drafts from one drafter pass), "sequential" (EAGLE-style:
    K drafter passes), "plain" (no drafter; the reference). Output is the same in every mode for
    greedy decoding, and identically distributed when sampling.
    """

    def __init__(self, model_dir: Path, target: TargetModel, tokenizer, build: BuildConfig, decoder: Decoder,
                 mode: str = "plain", num_speculative_tokens: int = 0, drafter: DrafterChoice | None = None) -> None:
        self.model_dir = model_dir
        self.target = target
        self.tokenizer = tokenizer
        self.build = build
        self.decoder = decoder
        self.backend = decoder.backend
        self.mode = mode
        self.num_speculative_tokens = num_speculative_tokens
        self.drafter = drafter

    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None = None, drafter_dir: str | Path | None = None, *,
                        mode: str = "parallel", num_speculative_tokens: int = 7,
                        parallel_drafting: bool | None = None, batch_size: int = 1, max_length: int = 1024,
                        prefill_buckets: Sequence[int] = (128, 512), dtype: str = "float32",
                        backend: str = "eager", kernels: str = "auto", lookup_ngram: int = 0,
                        short_draft_tokens: int | None = 0, datastore: bool | str = False,
                        tp_degree: int = 1) -> "Engine":
        """Load a Hugging Face target directory (default: the embedded SmolLM2-135M-Instruct) and a
        speculators-format drafter (default: the project's drafter for the default model).

        `parallel_drafting=False` is the vLLM-style spelling of mode="sequential". `kernels` picks the
        draft-pass kernels' implementation (BuildConfig.kernels; "auto": NKI on neuron, else PyTorch).
        `lookup_ngram=n` (speculative modes) replaces drafts by tokens copied from earlier in the
        sequence wherever its last n tokens occurred before (neuron_peagle.graphs.lookup).
        `short_draft_tokens=k` (with lookup; adaptive K) drafts only k tokens in steps where the lookup
        found nothing to copy, num_speculative_tokens where it did (runtime.spec_decoder); None: the
        command line's default for the configuration (config.default_short_draft_tokens).
        `datastore=True` (with lookup) also drafts from the drafter directory's n-gram datastore of the
        target's answers (`datastore.safetensors`; graphs.datastore); "auto": where the drafter has one.
        `tp_degree=n` shards the target over n processes, one rank each (neuron_peagle.parallel; eager
        backend; run under `torchrun --nproc-per-node n`): every rank returns the same outputs."""
        if parallel_drafting is not None and mode != "plain":
            mode = "parallel" if parallel_drafting else "sequential"
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "plain" and num_speculative_tokens < 1:
            raise ConfigError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        path = Path(model_dir) if model_dir is not None else require_default_model()
        choice = None if mode == "plain" else choose_drafter(path, drafter_dir, is_default_target=model_dir is None)
        short_draft_tokens, datastore = resolve_speculation(lookup_ngram, num_speculative_tokens, short_draft_tokens,
                                                            datastore, choice)
        build = BuildConfig(batch_size=batch_size, max_length=max_length,
                            prefill_buckets=tuple(prefill_buckets), dtype=dtype, backend=backend, kernels=kernels,
                            lookup_ngram=lookup_ngram, short_draft_tokens=short_draft_tokens,
                            datastore=datastore)
        if tp_degree != 1 and build.backend != "eager":
            raise ConfigError(f"tensor parallelism (tp_degree {tp_degree}) runs on the eager backend so far, "
                              f"not on {build.backend!r}")
        tp = TensorParallel.from_process_group(tp_degree)
        runner = get_backend(build.backend)
        if mode == "plain":
            if build.lookup_ngram:
                raise ConfigError("lookup_ngram needs a speculative mode: plain decoding drafts nothing")
            target = TargetModel.from_pretrained(path, build.max_length, build.torch_dtype, tp=tp)
            return cls(path, target, load_tokenizer(path), build, PlainDecoder(target, build, runner))
        target = TargetModel.from_pretrained(path, build.max_length, build.torch_dtype,
                                             feature_layers=choice.config.feature_layers, tp=tp)
        drafter = choice.load(target, build)
        from neuron_peagle.graphs.proposers import DrafterProposer

        proposer = DrafterProposer(drafter, target, build.batch_size, parallel=mode == "parallel",
                                   kernels=build.kernels)
        if build.lookup_ngram:
            from neuron_peagle.graphs.lookup import LookupProposer

            proposer = LookupProposer(proposer, build.batch_size, build.max_length, num_speculative_tokens,
                                      build.lookup_ngram, choice.load_datastore(target) if build.datastore else None)
        decoder = SpecDecoder(target, proposer, build, runner, num_speculative_tokens)
        return cls(path, target, load_tokenizer(path), build, decoder, mode, num_speculative_tokens, choice)

    @classmethod
    def from_compiled(cls, artifact_dir: str | Path, **expected) -> "Engine":
        """An engine on the graphs `python -m compile.build` compiled into `artifact_dir`.

        Refuses (ArtifactError) artifacts built with other package versions, other weights, or for
        other shapes than `expected` asks (fields of `runtime.artifacts.ArtifactRequest`, e.g.
        batch_size=4; model_dir / drafter_dir say where the weights are now). Every graph is warmed
        before this returns, so generation compiles nothing; `engine.artifacts` says how each was
        loaded."""
        from neuron_peagle.runtime.artifacts import ArtifactRequest, load_engine

        return load_engine(cls, Path(artifact_dir), ArtifactRequest(**expected))

    def warm(self, greedy: bool | None = None, buckets: Sequence[int] | None = None) -> list[str]:
        """Compile, or load from the compile cache, the graphs generation will run, before it runs, so
        that no decode step waits for a compiler (and per-token times measure decoding only). All
        planned graphs by default; `greedy` picks one variant, `buckets` the prefill buckets. Nothing
        to do on eager. Returns the names of the graphs warmed."""
        if self.backend.name == "eager":
            return []
        from neuron_peagle.graphs.interface import plan

        warmed = []
        for graph in plan(self.decoder):
            if greedy is not None and graph.greedy != greedy:
                continue
            if graph.bucket is not None and buckets is not None and graph.bucket not in buckets:
                continue
            self.backend.run(graph.module, graph.example_inputs)
            warmed.append(graph.name)
        return warmed

    # ---- requests ------------------------------------------------------------------------------

    def encode(self, prompt: str, chat_template: bool = True) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, chat_template)

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams, index: int = 0) -> None:
        largest = self.build.prefill_buckets[-1]
        if len(prompt_ids) == 0:
            raise PromptError(f"prompt {index} is empty")
        if len(prompt_ids) > largest:
            raise PromptError(
                f"prompt {index} has {len(prompt_ids)} tokens, more than the largest prefill bucket "
                f"({largest}); build with a larger bucket or shorten the prompt"
            )
        # A speculative step writes K+1 cache entries past the last committed token, and the
        # drafter keeps one trash slot at the end of its cache.
        room = self.build.max_length - (self.num_speculative_tokens + 1 if self.num_speculative_tokens else 0)
        if len(prompt_ids) + params.max_new_tokens > room:
            extra = (f" (less {self.num_speculative_tokens + 1} slots that speculative steps need)"
                     if self.num_speculative_tokens else "")
            raise PromptError(
                f"prompt {index}: {len(prompt_ids)} prompt tokens + max_new_tokens "
                f"{params.max_new_tokens} exceed max_length {self.build.max_length}{extra}"
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
                 on_tokens: TokenCallback | None = None, on_step: StepCallback | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, or token ids used as they are). `on_tokens(request, tokens)`
        streams each request's committed tokens; `on_step(StepRecord)` sees every decode step."""
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
            sampling = BatchSampling.from_params([params] * len(group), batch)
            rows = run_batch(self.decoder, group, [params.max_new_tokens] * len(group), stop_ids, sampling,
                             self._commit_callback(first, params, on_tokens), on_step)
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
