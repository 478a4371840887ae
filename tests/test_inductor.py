"""The inductor backend: torch.compile(fullgraph=True, dynamic=False), the CPU twin of TorchNeuron.

Every graph compiles whole and exactly once per shape (dynamo's own counters say so, and a
recompilation is an error), and gives the tokens and the state that eager gives.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
from importlib import metadata
from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.utils import counters

from neuron_peagle.runtime.manifest import Manifest
from neuron_peagle.backends import get_backend
from neuron_peagle.backends.compiled_artifacts import compiled_graph_count
from neuron_peagle.speculation import DEFAULT_LOOKUP_NGRAM
from neuron_peagle.errors import BackendUnavailableError
from neuron_peagle.graphs.interface import plan
from neuron_peagle.runtime.engine import Engine, SamplingParams
from conftest import save_tiny_model
from spec_helpers import cycle_ks, fill_table, make_engine, record_ks, table_engine
from test_datastore import small_model_with_datastore  # noqa: F401  (a fixture)

GREEDY = SamplingParams(max_new_tokens=40, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.9, top_k=20, seed=11)
# Every proposer of a step graph at once: drafter, context lookup, datastore, and a step graph per K (4, 2,
# and 0 on slots).
SPEC = dict(num_speculative_tokens=4, max_length=96, prefill_buckets=(16,), lookup_ngram=2, datastore=True,
            short_draft_tokens=2)
PROMPTS = [[4, 7, 12], [20, 21, 22, 23], [5, 7, 13, 5, 7], [30, 31], [9, 8, 7, 6, 5, 4], [40, 2]]
LENGTHS = [40, 9, 25, 3, 30, 14]  # mixed: at batch 4, freed slots are refilled mid-run


def _state(engine: Engine) -> dict[str, Tensor]:
    """Every state buffer the engine's graphs update, by name (the step graph reaches all of them)."""
    graph = plan(engine.runner)[-1]
    return {name: t.detach().clone() for name, t in graph.state_buffers.items()}


@pytest.mark.parametrize("batch_size", [1, 4])
def test_speculative_graphs_compile_once_and_equal_eager(small_model_with_datastore, batch_size):
    model_dir, drafter_dir = small_model_with_datastore
    spec = {**SPEC, "plain_step": batch_size > 1}
    compiled = make_engine(model_dir, drafter_dir, backend="inductor", batch_size=batch_size, **spec)
    eager = make_engine(model_dir, drafter_dir, batch_size=batch_size, **spec)
    ks_built = {4, 2, 0} if batch_size > 1 else {4, 2}
    graphs = 2 * (1 + len(ks_built))
    graphs_before = compiled_graph_count()
    warmed = compiled.warm()
    # prefill and a step graph per K; greedy and sampling: one dynamo graph each (fullgraph: no breaks)
    assert len(warmed) == graphs and compiled.backend.compile_count() == graphs
    assert compiled_graph_count() - graphs_before == graphs

    ks = record_ks(compiled)
    for engine in (compiled, eager):  # the same K per step in both (the cost model would time each its own)
        cycle_ks(engine, [4, 0, 2, 0] if batch_size > 1 else [4, 2, 2])
    for params in (GREEDY, SAMPLED):
        params = [dataclasses.replace(params, max_new_tokens=n) for n in LENGTHS]
        got = compiled.generate(PROMPTS, params)
        want = eager.generate(PROMPTS, params)
        assert [o.output_ids for o in got] == [o.output_ids for o in want]
        # The state the last batch left behind: token state exactly, caches and features to rounding.
        state, reference = _state(compiled), _state(eager)
        assert state.keys() == reference.keys()
        for name in state:
            if state[name].is_floating_point():
                torch.testing.assert_close(state[name], reference[name], rtol=1e-4, atol=1e-4, msg=name)
            else:
                assert torch.equal(state[name], reference[name]), name
    assert set(ks) == ks_built  # every step graph ran
    # Whole generations, greedy and sampled, compiled nothing more.
    assert compiled.backend.compile_count() == graphs and compiled_graph_count() - graphs_before == graphs


def test_plain_graphs_compile_once_per_bucket(tiny_llama_dir):
    kwargs = dict(mode="plain", batch_size=2, max_length=96, prefill_buckets=(16, 32))
    compiled = make_engine(tiny_llama_dir, backend="inductor", **kwargs)
    eager = make_engine(tiny_llama_dir, **kwargs)
    before = compiled_graph_count()
    prompts = [[5, 6, 7], list(range(20, 45)), [8] * 9]  # buckets 16 and 32
    got = compiled.generate(prompts, GREEDY)
    assert compiled.backend.compile_count() == 3  # prefill at 16 and 32, decode
    assert compiled_graph_count() - before == 3
    assert [o.output_ids for o in got] == [o.output_ids for o in eager.generate(prompts, GREEDY)]
    compiled.generate(prompts[::-1], SamplingParams(max_new_tokens=50, ignore_eos=True))
    assert compiled.backend.compile_count() == 3


def test_bf16_speculative_decoding_is_plain_bf16_decoding(tmp_path):
    """In bf16, inductor fuses a K+1-row verify and a one-row decode step differently: a layer whose output
    is a drafter feature is stored (rounded) in the speculative step, fused (float32) into the next norm in
    a plain step. The model rounds each norm's input itself (`models.layers.rounded_float`), so a verify
    row's tokens are the ones a plain step computes and speculative greedy output is plain bf16 decoding's
    token for token. The drafts are plain decoding's own tokens with a tenth corrupted (every verify row
    commits, and rejections happen). The target: 8 layers of the default model's width, with weights large
    enough that its logits tie at bf16's precision; without the rounding (and without inductor's
    `emulate_precision_casts`) 5 of these 6 prompts differ from plain decoding."""
    model_dir = save_tiny_model(tmp_path / "model", vocab_size=256, seed=5, hidden_size=576, intermediate_size=1536,
                                num_attention_heads=9, num_key_value_heads=3, head_dim=64, num_hidden_layers=8,
                                initializer_range=0.3)
    params = SamplingParams(max_new_tokens=80, ignore_eos=True)
    plain = make_engine(model_dir, mode="plain", backend="inductor", dtype="bfloat16", max_length=128,
                        prefill_buckets=(16,))
    answers = [o.output_ids for o in plain.generate(PROMPTS, params)]
    spec = table_engine(model_dir, 7, 1, max_length=128, buckets=(16,), backend="inductor", dtype="bfloat16")
    got = []
    for prompt, answer in zip(PROMPTS, answers):
        fill_table(spec, [prompt], [answer], wrong_fraction=0.1, seed=len(prompt))
        got.append(spec.generate([prompt], params)[0])
    assert statistics.mean(o.stats.acceptance_length for o in got) > 3  # verify rows beyond the first commit
    assert [o.output_ids for o in got] == answers


class _Outputs(NamedTuple):
    y: Tensor


class _Branchy(nn.Module):
    """A graph that branches on a tensor value: not a fixed graph."""

    Outputs = _Outputs

    def forward(self, x: Tensor) -> _Outputs:
        if x.sum() > 0:
            return _Outputs(x + 1)
        return _Outputs(x - 1)


class _Scaled(nn.Module):
    Outputs = _Outputs

    def __init__(self) -> None:
        super().__init__()
        self.scale = 2.0

    def forward(self, x: Tensor) -> _Outputs:
        return _Outputs(x * self.scale)


def test_a_graph_break_is_an_error_not_a_slow_graph():
    backend = get_backend("inductor")
    with pytest.raises(Exception, match="(?i)data-dependent|graph break|generic_jump"):
        backend.run(_Branchy(), (torch.ones(3),))


def test_a_recompilation_is_an_error():
    backend = get_backend("inductor")
    graph = _Scaled()
    assert backend.run(graph, (torch.ones(3),)).y.tolist() == [2.0, 2.0, 2.0]
    graph.scale = 3.0  # what the compiled code was specialized on changed: dynamo would recompile
    recompiles = counters["stats"]["unique_graphs"]
    with pytest.raises(Exception, match="(?i)recompil"):
        backend.run(graph, (torch.ones(3),))
    assert counters["stats"]["unique_graphs"] == recompiles


def test_neuron_backend_without_torchneuron_names_what_to_install(tiny_llama_dir):
    with pytest.raises(BackendUnavailableError, match="torch-neuronx 2.14"):
        make_engine(tiny_llama_dir, mode="plain", max_length=64, prefill_buckets=(16,), backend="neuron")


@pytest.mark.slow
def test_default_model_compiled_peagle_equals_transformers_greedy(prompt_ids, hf_greedy):
    from conftest import NEW_TOKENS

    # The command line's P-EAGLE defaults: the shipped drafter, context lookup, the datastore; float32.
    engine = make_engine(backend="inductor", num_speculative_tokens=7, max_length=256,
                                    prefill_buckets=(128,), lookup_ngram=DEFAULT_LOOKUP_NGRAM, datastore="auto")
    assert engine.speculation.datastore and engine.warm(greedy=True) == ["spec_prefill_b128_greedy", "spec_step_greedy"]
    outputs = engine.generate(prompt_ids[:6], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert engine.backend.compile_count() == 2
    mismatches = [i for i, (o, want) in enumerate(zip(outputs, hf_greedy)) if o.output_ids != want]
    assert not mismatches, f"prompts {mismatches} differ from transformers' greedy output"
    assert sum(o.stats.acceptance_length for o in outputs) / len(outputs) > 1.5  # drafts were accepted


def test_artifacts_load_from_the_compile_cache_in_a_fresh_process(tmp_path, tiny_llama_dir):
    out = tmp_path / "artifacts"
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    build = subprocess.run([sys.executable, "-m", "compile.build", "--backend", "inductor", "--out", str(out),
                            "--model", str(tiny_llama_dir), "--mode", "plain", "--max-length", "64", "--prefill-buckets", "16"],
                           env=env, capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stderr[-3000:]
    manifest = Manifest.load(out)
    assert manifest.backend == "inductor" and manifest.versions == {"torch": metadata.version("torch")}
    assert sorted(g.name for g in manifest.graphs) == ["decode_greedy", "decode_sampling", "prefill_b16_greedy",
                                                       "prefill_b16_sampling"]
    assert (out / "portable_cache.bin").stat().st_size > 0 and any((out / "compile_cache").iterdir())
    assert list(manifest.checksums) == ["portable_cache.bin"]  # compile_cache/ is the compiler's own

    run = subprocess.run([sys.executable, "-m", "neuron_peagle.cli", "generate", "--artifacts", str(out),
                          "--no-chat-template", "--max-new-tokens", "12", "Once upon a time"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"4 graphs from {out} (compile cache in {out / 'compile_cache'}): 4 loaded from the compile cache" \
        in run.stdout
    eager = make_engine(tiny_llama_dir, mode="plain", max_length=64, prefill_buckets=(16,))
    want = eager.generate(["Once upon a time"], SamplingParams(max_new_tokens=12), chat_template=False)[0].text
    assert want in run.stdout
