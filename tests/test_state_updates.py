"""State updates (neuron_peagle.graphs.state): under `functional_state`, the mode the nxd backend
traces in, no planned graph writes a state buffer in place (neuronx-distributed aliases a buffer
only when the graph rebinds it to an out-of-place result; an in-place write could be lost on the
device), and the rebound state equals, bit for bit, what the in-place updates of eager write.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from neuron_peagle.graphs.interface import PREFILL_KINDS, PlannedGraph, plan
from neuron_peagle.graphs.state import assign_state, functional_state, is_functional, replace_state
from neuron_peagle.runtime.engine import SamplingParams
from test_datastore import small_model_with_datastore  # noqa: F401  (a fixture)
from spec_helpers import make_engine

SHAPES = dict(batch_size=2, max_length=96, prefill_buckets=(16, 32))


def written_tensors(func, args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensor arguments an aten op writes in place (annotated `Tensor(a!)` in its schema)."""
    schema = func._schema
    values = {**dict(zip((a.name for a in schema.arguments), args)), **kwargs}
    return [values[a.name] for a in schema.arguments
            if a.alias_info is not None and a.alias_info.is_write and isinstance(values.get(a.name), Tensor)]


class StateWrites(TorchDispatchMode):
    """Records every aten op that writes in place into the storage of a state buffer, as the module
    holds its buffers when the op runs (a rebound buffer counts from then on; views count)."""

    def __init__(self, module: nn.Module, state_names: tuple[str, ...]) -> None:
        super().__init__()
        self.module, self.state_names = module, state_names
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.is_mutable:
            storages = {self.module.get_buffer(name).untyped_storage().data_ptr(): name
                        for name in self.state_names}
            for tensor in written_tensors(func, args, kwargs):
                name = storages.get(tensor.untyped_storage().data_ptr())
                if name is not None:
                    self.ops.append(f"{func} on {name}")
        return func(*args, **kwargs)


def varied_inputs(spec: PlannedGraph, vocab_size: int, generator: torch.Generator) -> NamedTuple:
    """The planned example inputs, with random prompts and lengths for a prefill graph (the planned
    ones are all zeros: every write would look alike)."""
    inputs = spec.example_inputs
    if spec.kind not in PREFILL_KINDS:
        return inputs
    batch, bucket = inputs.input_ids.shape
    ids = torch.randint(0, vocab_size, (batch, bucket), generator=generator)
    return inputs._replace(input_ids=ids, lengths=torch.randint(2, bucket + 1, (batch,), generator=generator))


def snapshot(spec: PlannedGraph) -> dict[str, Tensor]:
    return {name: buffer.clone() for name, buffer in spec.state_buffers.items()}


def run(spec: PlannedGraph, inputs: NamedTuple, functional: bool) -> tuple[tuple[Tensor, ...], list[str]]:
    """The graph's outputs and the in-place state writes it made, in the mode asked for."""
    with torch.no_grad(), StateWrites(spec.module, spec.state_names) as writes:
        with functional_state(spec.module) if functional else nullcontext():
            outputs = tuple(spec.module(*inputs))
    return outputs, writes.ops


def check_functional_updates(specs: list[PlannedGraph], vocab_size: int) -> None:
    """Graph by graph in plan order (a step graph starts from its prefill's state): in place the
    recorder sees the writes; functionally it sees none, the outputs and the new state are the same,
    and only declared state buffers were rebound."""
    generator = torch.Generator().manual_seed(0)
    for spec in specs:
        inputs = varied_inputs(spec, vocab_size, generator)
        start = snapshot(spec)
        want, eager_writes = run(spec, inputs, functional=False)
        assert any("cache.key_0" in op for op in eager_writes), f"{spec.name}: the recorder saw {eager_writes}"
        want_state = snapshot(spec)
        assert any(not torch.equal(want_state[n], start[n]) for n in start), spec.name  # the state did change
        for name, value in start.items():
            spec.module.get_buffer(name).copy_(value)
        buffers = dict(spec.module.named_buffers())
        got, writes = run(spec, inputs, functional=True)
        assert writes == [], f"{spec.name} writes state in place under functional_state: {writes}"
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), spec.name
        for name, buffer in spec.state_buffers.items():
            assert torch.equal(buffer, want_state[name]), f"{spec.name}: {name}"
        rebound = {name for name, buffer in spec.module.named_buffers() if buffer is not buffers[name]}
        assert "cache.key_0" in rebound and rebound <= set(spec.state_names), (spec.name, rebound)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plain_graphs_update_state_out_of_place_when_functional(tiny_llama_dir, dtype):
    """bfloat16 too: eager writes its KV cache through an int16 view (models.layers.write_slots)."""
    engine = make_engine(tiny_llama_dir, mode="plain", dtype=dtype, **SHAPES)
    specs = plan(engine.runner)
    assert {spec.kind for spec in specs} == {"prefill", "decode"}
    check_functional_updates(specs, specs[0].module.target.config.vocab_size)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_speculative_graphs_with_lookup_and_datastore_update_state_out_of_place_when_functional(
        small_model_with_datastore, mode):
    model_dir, drafter_dir = small_model_with_datastore
    engine = make_engine(model_dir, drafter_dir, mode=mode, num_speculative_tokens=4,
                                    short_draft_tokens=2, lookup_ngram=2, datastore=True, **SHAPES)
    specs = plan(engine.runner)
    assert {spec.name for spec in specs} >= {"spec_step_greedy", "spec_step_k2_sampling"}
    assert all(spec.module.proposer.datastore is not None for spec in specs)
    assert {"proposer.history", "proposer.copied", "state.last_position"} <= set(specs[0].state_names)
    check_functional_updates(specs, specs[0].module.target.config.vocab_size)


def test_generation_with_functional_updates_equals_in_place(small_model_with_datastore):
    """Whole requests, step after step, greedy and sampled: the rebound state carries over exactly."""
    model_dir, drafter_dir = small_model_with_datastore
    engine = make_engine(model_dir, drafter_dir, num_speculative_tokens=4, short_draft_tokens=2,
                                    lookup_ngram=2, datastore=True, **SHAPES)
    prompts = [[4, 7, 12], [20, 21, 22, 23, 20, 21]]
    requests = [SamplingParams(max_new_tokens=16, ignore_eos=True),
                SamplingParams(max_new_tokens=16, temperature=0.8, seed=3, ignore_eos=True)]
    want = [[o.output_ids for o in engine.generate(prompts, params)] for params in requests]
    graphs = list({id(spec.module): spec.module for spec in plan(engine.runner)}.values())
    cache = graphs[0].cache.key_0
    with functional_state(*graphs):
        got = [[o.output_ids for o in engine.generate(prompts, params)] for params in requests]
    assert got == want
    assert graphs[0].cache.key_0 is not cache  # the updates did rebind


def test_the_mode_is_scoped_and_refuses_what_it_cannot_rebind():
    owner = nn.Module()
    owner.register_buffer("count", torch.zeros(2, dtype=torch.int64))
    original = owner.count
    assign_state(owner, "count", torch.tensor([1, 2]))
    assert owner.count is original and owner.count.tolist() == [1, 2]  # in place
    assert not is_functional()
    with functional_state(owner):
        assert is_functional()
        assign_state(owner, "count", torch.tensor(7))  # broadcast as copy_ does, into a fresh tensor
        assert owner.count is not original and owner.count.tolist() == [7, 7]
        with pytest.raises(RuntimeError, match=r"would change it from \[2\] torch.int64 to \[3\]"):
            replace_state(owner.count, torch.zeros(3, dtype=torch.int64))
        with pytest.raises(RuntimeError, match="no buffer of the modules given to it"):
            replace_state(torch.zeros(2), torch.zeros(2))
        with pytest.raises(AttributeError, match="has no buffer 'missing'"):
            assign_state(owner, "missing", torch.zeros(2))
    assert not is_functional() and original.tolist() == [1, 2]
    with pytest.raises(ValueError, match="needs the graph modules"):
        with functional_state():
            pass
