"""The public Python API: `Engine.from_pretrained(...)` and `engine.generate(prompts, SamplingParams(...))`.

The engine owns the tokenizer, validates every request before any work starts (so a bad prompt in a
list never costs the others their output), and hands the requests to the host loop, which keeps the
built batch size's slots busy with them, with the runner of the chosen mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from neuron_peagle import checks, memory
from neuron_peagle.backends import Backend, get_backend
from neuron_peagle.capabilities import BACKENDS, backends_that, capabilities_of
from neuron_peagle.config import BuildConfig, ModelConfig
from neuron_peagle.default_model import is_default_model, require_default_model
from neuron_peagle.errors import ConfigError
from neuron_peagle.models.target import TargetModel
from neuron_peagle.parallel import TensorParallel, agree_on_max
from neuron_peagle.runtime.drafter_choice import DrafterChoice, choose_drafter
from neuron_peagle.runtime.host_loop import Request, Runner, StepCallback, run_requests
from neuron_peagle.runtime.plain_runner import PlainRunner
from neuron_peagle.runtime.requests import CheckedPrompts, RequestLimits, check_requests, prompt_inputs
from neuron_peagle.runtime.spec_runner import SpecRunner
from neuron_peagle.runtime.stats import RequestStats
from neuron_peagle.speculation import SpeculationConfig
from neuron_peagle.tokenizer import encode_prompt, load_tokenizer

PLAIN = SpeculationConfig(mode="plain").resolved(False)


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
        checks.integer("max_new_tokens", self.max_new_tokens, minimum=1)
        checks.real("temperature", self.temperature, minimum=0)
        checks.integer("top_k", self.top_k, minimum=0, maximum=2**63 - 1)
        checks.real("top_p", self.top_p, above=0, maximum=1)
        if self.seed is not None:
            checks.integer("seed", self.seed, minimum=0, maximum=2**63 - 1)
        if self.stop_token_ids is not None:
            ids = (self.stop_token_ids,) if isinstance(self.stop_token_ids, int) else self.stop_token_ids
            object.__setattr__(self, "stop_token_ids",
                               tuple(checks.integer("stop_token_ids", t, minimum=0) for t in _sequence("stop_token_ids", ids)))
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        object.__setattr__(self, "stop", tuple(_stop_string(s) for s in _sequence("stop", stop)))
        checks.flag("ignore_eos", self.ignore_eos)


def per_request(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    """One SamplingParams per request: `params` for all (default: SamplingParams()), or one each."""
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    if isinstance(params, (str, bytes)) or not isinstance(params, Sequence):
        raise ConfigError(f"params must be a SamplingParams or one per prompt, got {type(params).__name__}")
    if len(params) != count:
        raise ConfigError(f"params: one SamplingParams per prompt: {count} prompts, {len(params)} params")
    for number, p in enumerate(params, start=1):
        if not isinstance(p, SamplingParams):
            raise ConfigError(f"params {number} must be a SamplingParams, got {type(p).__name__}")
    return list(params)


def _sequence(field_name: str, value) -> Sequence:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{field_name} must be a list, got {value!r}")
    return value


def _stop_string(text) -> str:
    if not isinstance(text, str) or not text:
        raise ConfigError(f"stop strings must be non-empty text, got {text!r}")
    problem = checks.utf8_problem(text)
    if problem:
        raise ConfigError(f"stop string {text!r}: {problem}")
    return text


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    stats: RequestStats = field(default_factory=RequestStats)


# Streaming callback: (request index, newly committed token ids).
TokenCallback = Callable[[int, list[int]], None]
# Finished-request callback: (request index, its output), in input order.
OutputCallback = Callable[[int, RequestOutput], None]


class GenerationInterrupted(KeyboardInterrupt):
    """Generation stopped by KeyboardInterrupt; `outputs` maps request index -> output for every request
    finished before it (in input order or not), `total` is how many were asked for."""

    def __init__(self, outputs: dict[int, RequestOutput], total: int) -> None:
        super().__init__(f"interrupted: {len(outputs)} of {total} requests finished")
        self.outputs = outputs
        self.total = total


class _InOrder:
    """Collects finished outputs and passes them on in input order, each as soon as it can be."""

    def __init__(self, on_output: OutputCallback | None) -> None:
        self.on_output = on_output
        self.outputs: dict[int, RequestOutput] = {}
        self.passed = 0

    def add(self, index: int, output: RequestOutput) -> None:
        self.outputs[index] = output
        while self.passed in self.outputs:
            if self.on_output is not None:
                self.on_output(self.passed, self.outputs[self.passed])
            self.passed += 1


class Engine:
    """Generation with one target model and, in the speculative modes, one drafter.

    Modes: "parallel" (P-EAGLE: all K drafts from one drafter pass), "sequential" (EAGLE-style:
    K drafter passes), "plain" (no drafter; the reference). Output is the same in every mode for
    greedy decoding, and identically distributed when sampling.
    """

    def __init__(self, model_dir: Path, target: TargetModel, tokenizer, build: BuildConfig, runner: Runner,
                 speculation: SpeculationConfig = PLAIN, drafter: DrafterChoice | None = None, rank: int = 0) -> None:
        self.model_dir = model_dir
        self.rank = rank  # under tensor parallelism, this process's rank (every rank returns the same outputs)
        self.target = target
        self.tokenizer = tokenizer
        self.build = build
        self.runner = runner
        self.backend = runner.backend
        self.speculation = speculation  # resolved: every value concrete
        self.drafter = drafter
        self.artifacts = None  # backends.artifacts.LoadReport when loaded by from_compiled

    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None = None, drafter_dir: str | Path | None = None,
                        speculation: SpeculationConfig | dict | None = None, *, batch_size: int = 1,
                        max_length: int = 1024, prefill_buckets: Sequence[int] = (128, 512), dtype: str = "float32",
                        backend: str = "eager", kernels: str = "auto", tp_degree: int = 1) -> "Engine":
        """Load a Hugging Face target directory (default: the embedded SmolLM2-135M-Instruct) and a
        speculators-format drafter (default: the project's drafter for the default model).

        `speculation` (a SpeculationConfig, or a dict of its fields; default: SpeculationConfig(), the
        command line's defaults) says how to draft: P-EAGLE, sequential or plain, K, context lookup, the
        datastore, the K it may choose per step. The rest are the graphs' shapes and how they run (BuildConfig); `kernels`
        picks the draft-pass kernels' implementation ("auto": NKI on neuron, else PyTorch).
        `tp_degree=n` shards the target over n processes, one rank each (neuron_peagle.parallel: heads, width
        and experts; eager, inductor and neuron backends; run under `torchrun --nproc-per-node n`): every rank returns
        the same outputs."""
        build = BuildConfig(batch_size=batch_size, max_length=max_length, prefill_buckets=prefill_buckets, dtype=dtype,
                            backend=backend, kernels=kernels)
        return cls.from_build(model_dir, drafter_dir, speculation, build, tp_degree=tp_degree)

    @classmethod
    def from_build(cls, model_dir: str | Path | None, drafter_dir: str | Path | None,
                   speculation: SpeculationConfig | dict | None, build: BuildConfig, *, tp_degree: int = 1,
                   backend: Backend | None = None) -> "Engine":
        """`from_pretrained` with the shapes as one BuildConfig; on `backend` (default: a new one of
        `build.backend`), e.g. one whose compiler caches point at artifacts (`from_compiled`, compile.build)."""
        speculation = SpeculationConfig.of(speculation)
        speculation.check_fits(build.max_length)
        checks.integer("tp_degree", tp_degree, minimum=1)
        path = Path(model_dir) if model_dir is not None else require_default_model()
        model_config = ModelConfig.from_dir(path)
        choice = None if speculation.plain else choose_drafter(
            path, drafter_dir, is_default_target=model_dir is None or is_default_model(path), target_config=model_config)
        capabilities = capabilities_of(build.backend)
        speculation = speculation.resolved(choice is not None and choice.has_datastore, build.batch_size,
                                           capabilities.k_choice_at_batch_1)
        if tp_degree != 1:
            if not capabilities.shards_at_run_time:
                raise ConfigError(f"tensor parallelism (tp_degree {tp_degree}) runs on backends "
                                  f"{', '.join(backends_that('shards_at_run_time'))}, not on {build.backend!r}; on "
                                  "trn1 build sharded graphs with `python -m compile.build --backend "
                                  f"{' or '.join(backends_that('shards_ahead_of_time'))} --tp-degree N`")
        plan = TensorParallel(tp_degree, 0, capabilities.process_group_device)
        plan.check(model_config)
        # Each rank holds its share; on one host, tp_degree of them at once.
        memory.check_fits(model_config, build, choice.config if choice is not None else None, plan, ranks_here=tp_degree)
        tp = TensorParallel.from_process_group(tp_degree, capabilities.process_group_device)
        graphs_backend = backend if backend is not None else get_backend(build.backend)
        if speculation.plain:
            target = TargetModel.from_pretrained(path, build.max_length, build.torch_dtype, config=model_config,
                                                 shard=tp.shard)
            return cls(path, target, load_tokenizer(path), build, PlainRunner(target, build, graphs_backend), speculation,
                       rank=tp.rank)
        target = TargetModel.from_pretrained(path, build.max_length, build.torch_dtype, config=model_config,
                                             feature_layers=choice.config.feature_layers, shard=tp.shard)
        drafter = choice.load(target, build)
        from neuron_peagle.graphs.proposers import DrafterProposer

        k = speculation.num_speculative_tokens
        datastore = choice.load_datastore(target) if speculation.lookup_ngram and speculation.datastore else None

        def make_proposer(rows: int):
            """The proposer of `rows` slots (the batch's, and a prefill's one-row twin: graphs/slots.py)."""
            proposer = DrafterProposer(drafter, target, rows, parallel=speculation.mode == "parallel",
                                       kernels=build.kernels, lnc=build.lnc)
            if speculation.lookup_ngram:
                from neuron_peagle.graphs.lookup import LookupProposer

                proposer = LookupProposer(proposer, rows, build.max_length, k, speculation.lookup_ngram, datastore)
            return proposer

        runner = SpecRunner(target, make_proposer, build, graphs_backend, speculation.step_ks,
                            functools.partial(agree_on_max, tp=tp))
        return cls(path, target, load_tokenizer(path), build, runner, speculation, choice, rank=tp.rank)

    @classmethod
    def from_compiled(cls, artifact_dir: str | Path, **expected) -> "Engine":
        """An engine on the graphs `python -m compile.build` compiled into `artifact_dir`.

        Refuses (ArtifactError) artifacts built with other package versions, other weights, or for
        other shapes than `expected` asks (fields of `runtime.artifacts.ArtifactRequest`, e.g.
        batch_size=4; model_dir / drafter_dir say where the weights are now). Every graph is warmed
        before this returns, so generation compiles nothing; `engine.artifacts` says how each was
        loaded."""
        from neuron_peagle.graphs.interface import plan
        from neuron_peagle.runtime.artifacts import ArtifactRequest, open_artifacts

        directory = Path(artifact_dir)
        manifest, backend, model_dir, drafter_dir = open_artifacts(directory, ArtifactRequest(**expected))
        engine = cls.from_build(model_dir, drafter_dir, manifest.speculation, manifest.build, backend=backend)
        engine.artifacts = backend.load_artifacts(directory, plan(engine.runner), manifest)
        return engine

    def warm(self, greedy: bool | None = None, buckets: Sequence[int] | None = None) -> list[str]:
        """Compile, or load from the compile cache, the graphs generation will run, before it runs, so
        that no decode step waits for a compiler (and per-token times measure decoding only). All
        planned graphs by default; `greedy` picks one variant, `buckets` the prefill buckets. Nothing
        to do where nothing compiles. Returns the names of the graphs warmed."""
        if not self.backend.capabilities.compiles:
            return []
        from neuron_peagle.graphs.interface import plan

        warmed = []
        for graph in plan(self.runner):
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

    @property
    def limits(self) -> RequestLimits:
        """What every request must fit (runtime.requests)."""
        return RequestLimits(self.build, self.speculation.num_speculative_tokens, self.target.config.vocab_size)

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
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *, chat_template: bool = True,
                 on_tokens: TokenCallback | None = None, on_step: StepCallback | None = None,
                 on_output: OutputCallback | None = None, overlap_host: bool | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, or token ids used as they are), with one SamplingParams for all
        or one per prompt (its own length, temperature, top-k/p, seed, stop tokens and strings). Every prompt
        is checked before any work starts. The requests share the build's `batch_size` slots: each enters
        one as soon as one is free, in input order (continuous batching). `on_tokens(request, tokens)`
        streams each request's committed tokens; `on_step(StepRecord)` sees every decode step;
        `on_output(request, output)` gets each request's output as soon as it and every request before it
        are finished (input order, counted from 0). Interrupted (KeyboardInterrupt, e.g. Ctrl-C), it raises
        GenerationInterrupted, which holds every output finished by then. `overlap_host`: read step n
        on a reader thread while step n+1 runs (runtime.host_loop; same tokens, one step of lag); None: the
        backend's default (on for neuron, off on CPU, where it measured slower)."""
        checks.flag("chat_template", chat_template)
        host_overlap = self.backend.capabilities.host_overlap
        overlap = host_overlap == "on" if overlap_host is None else checks.flag("overlap_host", overlap_host)
        if overlap and host_overlap == "off":
            raise ConfigError(f"overlap_host: backend {self.backend.name!r} traces its graphs on one thread, untried "
                              "beside a reader thread; " + ", ".join(
                                  repr(n) for n, c in BACKENDS.items() if c.host_overlap != "off") + " overlap")
        for name, callback in (("on_tokens", on_tokens), ("on_step", on_step), ("on_output", on_output)):
            if callback is not None and not callable(callback):
                raise ConfigError(f"{name} must be a function or None, got {callback!r}")
        inputs = prompts if isinstance(prompts, CheckedPrompts) else prompt_inputs(prompts)
        requests = per_request(params, len(inputs))
        lengths, stops = [p.max_new_tokens for p in requests], [p.stop_token_ids for p in requests]
        checked = isinstance(prompts, CheckedPrompts) and prompts.checked_for(self.limits, lengths, stops)
        all_ids = [(self.encode(p, chat_template) if p else []) if isinstance(p, str) else p for p in inputs]
        if not checked:
            check_requests(all_ids, lengths, stops, self.limits)

        finished = _InOrder(on_output)
        batch = [Request(ids, p.max_new_tokens, self.stop_token_ids(p), p) for ids, p in zip(all_ids, requests)]

        def on_finish(index: int, state) -> None:
            text = inputs[index] if isinstance(inputs[index], str) else None
            finished.add(index, RequestOutput(text, all_ids[index], state.output_ids,
                                              self._final_text(state.output_ids, requests[index]), state.stats))

        try:
            run_requests(self.runner, batch, self._commit_callback(requests, on_tokens), on_step, on_finish,
                         overlap=overlap)
        except KeyboardInterrupt:
            raise GenerationInterrupted(dict(finished.outputs), len(all_ids)) from None
        return [finished.outputs[i] for i in range(len(all_ids))]

    # ---- text ----------------------------------------------------------------------------------

    def _commit_callback(self, params: Sequence[SamplingParams], on_tokens: TokenCallback | None):
        """Per request: streams its tokens, and says when one of its stop strings has appeared."""
        seen: dict[int, list[int]] = {}

        def on_commit(index: int, tokens: list[int]) -> bool:
            if on_tokens is not None:
                on_tokens(index, tokens)
            stop = params[index].stop
            if not stop:
                return False
            seen.setdefault(index, []).extend(tokens)
            text = self.tokenizer.decode(seen[index], skip_special_tokens=True)
            return any(s in text for s in stop)

        return on_commit

    def _final_text(self, output_ids: list[int], params: SamplingParams) -> str:
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in params.stop if s in text]
        return text[: min(cuts)] if cuts else text
