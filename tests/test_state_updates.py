"""State writes (neuron_peagle.state_writes): with its state modules in `StateWrites.REBIND`, the choice
the nxd backend traces with, no planned graph writes a state buffer in place (neuronx-distributed
aliases a buffer only when the graph rebinds it to an out-of-place result; an in-place write could be
lost on the device), and the rebound state equals, bit for bit, what the in-place writes of eager
(`StateWrites.IN_PLACE_INT16`) write.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from neuron_peagle.graphs.interface import PREFILL_KINDS, PlannedGraph, plan
from neuron_peagle.kv_cache import KVCache
from neuron_peagle.runtime.engine import SamplingParams
from neuron_peagle.state_writes import StateModule, StateWrites, use_state_writes
from test_datastore import small_model_with_datastore  # noqa: F401  (a fixture)
from spec_helpers import cycle_ks, make_engine

SHAPES = dict(batch_size=2, max_length=96, prefill_buckets=(16, 32))


def written_tensors(func, args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensor arguments an aten op writes in place (annotated `Tensor(a!)` in its schema)."""
    schema = func._schema
    values = {**dict(zip((a.name for a in schema.arguments), args)), **kwargs}
    return [values[a.name] for a in schema.arguments
            if a.alias_info is not None and a.alias_info.is_write and isinstance(values.get(a.name), Tensor)]


class InPlaceWrites(TorchDispatchMode):
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


def run(spec: PlannedGraph, inputs: NamedTuple, writes: StateWrites) -> tuple[tuple[Tensor, ...], list[str]]:
    """The graph's outputs and the in-place state writes it made, its state modules writing as asked."""
    use_state_writes(spec.module, writes)
    with torch.no_grad(), InPlaceWrites(spec.module, spec.state_names) as recorded:
        outputs = tuple(spec.module(*inputs))
    return outputs, recorded.ops


def check_rebound_updates(specs: list[PlannedGraph], vocab_size: int) -> None:
    """Graph by graph in plan order (a step graph starts from its prefill's state): in place (as the
    eager backend prepared the modules) the recorder sees the writes; rebinding it sees none, the
    outputs and the new state are the same, and only declared state buffers were rebound."""
    generator = torch.Generator().manual_seed(0)
    for spec in specs:
        inputs = varied_inputs(spec, vocab_size, generator)
        start = snapshot(spec)
        want, eager_writes = run(spec, inputs, StateWrites.IN_PLACE_INT16)
        assert any("cache.key_0" in op for op in eager_writes), f"{spec.name}: the recorder saw {eager_writes}"
        want_state = snapshot(spec)
        assert any(not torch.equal(want_state[n], start[n]) for n in start), spec.name  # the state did change
        for name, value in start.items():
            spec.module.get_buffer(name).copy_(value)
        buffers = dict(spec.module.named_buffers())
        got, writes = run(spec, inputs, StateWrites.REBIND)
        assert writes == [], f"{spec.name} writes state in place in StateWrites.REBIND: {writes}"
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), spec.name
        for name, buffer in spec.state_buffers.items():
            assert torch.equal(buffer, want_state[name]), f"{spec.name}: {name}"
        rebound = {name for name, buffer in spec.module.named_buffers() if buffer is not buffers[name]}
        assert "cache.key_0" in rebound and rebound <= set(spec.state_names), (spec.name, rebound)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plain_graphs_update_state_out_of_place_when_rebinding(tiny_llama_dir, dtype):
    """bfloat16 too: eager writes its KV cache through an int16 view (StateWrites.IN_PLACE_INT16)."""
    engine = make_engine(tiny_llama_dir, mode="plain", dtype=dtype, **SHAPES)
    specs = plan(engine.runner)
    assert all(m.writes is StateWrites.IN_PLACE_INT16 for spec in specs for m in state_modules(spec.module))
    assert {spec.kind for spec in specs} == {"prefill", "decode"}
    check_rebound_updates(specs, specs[0].module.target.config.vocab_size)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_speculative_graphs_with_lookup_and_datastore_update_state_out_of_place_when_rebinding(
        small_model_with_datastore, mode):
    model_dir, drafter_dir = small_model_with_datastore
    engine = make_engine(model_dir, drafter_dir, mode=mode, num_speculative_tokens=4,
                                    short_draft_tokens=2, lookup_ngram=2, datastore=True, **SHAPES)
    specs = plan(engine.runner)
    assert {spec.name for spec in specs} >= {"spec_step_greedy", "spec_step_k2_sampling"}
    assert all(spec.module.proposer.datastore is not None for spec in specs)
    assert {"proposer.history", "proposer.copied", "state.last_position"} <= set(specs[0].state_names)
    check_rebound_updates(specs, specs[0].module.target.config.vocab_size)


def test_generation_with_rebound_updates_equals_in_place(small_model_with_datastore):
    """Whole requests, step after step, greedy and sampled: the rebound state carries over exactly."""
    model_dir, drafter_dir = small_model_with_datastore
    engine = make_engine(model_dir, drafter_dir, num_speculative_tokens=4, short_draft_tokens=2,
                                    lookup_ngram=2, datastore=True, **SHAPES)
    prompts = [[4, 7, 12], [20, 21, 22, 23, 20, 21]]
    requests = [SamplingParams(max_new_tokens=16, ignore_eos=True),
                SamplingParams(max_new_tokens=16, temperature=0.8, seed=3, ignore_eos=True)]

    def run() -> list:
        outputs = []
        for params in requests:
            cycle_ks(engine, [4, 2, 2])  # the same K per step in both passes (the chooser learns as it goes)
            outputs.append([o.output_ids for o in engine.generate(prompts, params)])
        return outputs

    want = run()
    graphs = list({id(spec.module): spec.module for spec in plan(engine.runner)}.values())
    cache = graphs[0].cache.key_0
    for graph in graphs:
        use_state_writes(graph, StateWrites.REBIND)
    got = run()
    assert got == want
    assert graphs[0].cache.key_0 is not cache  # the updates did rebind


class Counter(StateModule):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(2, dtype=torch.int64))


def test_the_choice_is_per_module_and_rebinding_refuses_what_it_cannot_rebind():
    owner, other = Counter(), Counter()
    original = owner.count
    owner.assign("count", torch.tensor([1, 2]))
    assert owner.count is original and owner.count.tolist() == [1, 2]  # in place, the default
    parent = nn.Module()
    parent.owner = owner
    use_state_writes(parent, StateWrites.REBIND)
    assert owner.writes is StateWrites.REBIND and other.writes is StateWrites.IN_PLACE  # only inside `parent`
    owner.assign("count", torch.tensor(7))  # broadcast as copy_ does, into a fresh tensor
    assert owner.count is not original and owner.count.tolist() == [7, 7]
    with pytest.raises(RuntimeError, match=r"would change it from \[2\] torch.int64 to \[3\]"):
        owner._rebind("count", torch.zeros(3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"would change it from \[2\] torch.int64 to \[2\] torch.float32"):
        owner._rebind("count", torch.zeros(2))
    with pytest.raises(AttributeError, match="has no buffer 'missing'"):
        owner.assign("missing", torch.zeros(2))
    assert original.tolist() == [1, 2]  # rebinding never wrote the old tensor
    other.assign("count", torch.tensor([3, 4]))
    assert other.count.tolist() == [3, 4]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64])
def test_every_choice_writes_the_same_bits(dtype):
    """assign, scatter and write_slice, in each of the three ways, leave the same bits (NaN-safe)."""
    generator = torch.Generator().manual_seed(0)
    start = (torch.randn(3, 5, 8, generator=generator) * 50).to(dtype)
    index = torch.stack([torch.randperm(8, generator=generator)[:4] for _ in range(15)]).view(3, 5, 4)
    # float32 in, cast to the buffer's dtype
    src, rows, column = (torch.randn(shape, generator=generator) * 50 for shape in ((3, 5, 4), (3, 2, 8), (3, 5, 1)))
    results = {}
    for writes in StateWrites:
        module = StateModule()
        module.register_buffer("state", start.clone())
        use_state_writes(module, writes)
        module.scatter("state", 2, index, src)
        module.write_slice("state", 1, 2, rows)
        module.assign("state", torch.where(index.sum(-1, keepdim=True) > 12, module.state, column.to(dtype)))
        results[writes] = module.state
    want = results[StateWrites.IN_PLACE]
    assert want.dtype == dtype and not torch.equal(want, start)
    for writes, got in results.items():
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), writes


def state_modules(module: nn.Module) -> list[StateModule]:
    return [m for m in module.modules() if isinstance(m, StateModule)]


class Scatters(TorchDispatchMode):
    """The dtypes of the tensors aten.scatter_ writes."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.scatter_:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_eager_kv_writes_take_the_int16_view_for_16_bit_caches(dtype):
    """The eager speed-up (StateWrites.IN_PLACE_INT16): a 16-bit cache is scattered as int16, a float32
    one as it is; plain in-place writes scatter the cache's own dtype. The same bits either way."""
    generator = torch.Generator().manual_seed(0)
    cache = KVCache(1, 3, 2, 40, 8, dtype)
    positions = torch.stack([torch.randperm(40, generator=generator)[:4] for _ in range(3)])  # [B, T]
    keys, values = torch.randn(2, 3, 2, 4, 8, generator=generator)  # float32 in, cast to the cache's dtype
    written = {}
    for writes in (StateWrites.IN_PLACE_INT16, StateWrites.IN_PLACE):
        cache.key_0.zero_(), cache.value_0.zero_()
        use_state_writes(cache, writes)
        with Scatters() as seen:
            cache.write(0, positions, keys, values)
        int16 = writes is StateWrites.IN_PLACE_INT16 and dtype != torch.float32
        assert seen.dtypes == [torch.int16 if int16 else dtype] * 2, (writes, seen.dtypes)
        written[writes] = [b.clone() for b in cache.layer(0)]
    for got, want in zip(*written.values()):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_the_eager_backend_writes_16_bit_caches_through_int16(tiny_llama_dir):
    """What keeps eager bf16 decoding fast: the eager engine's state modules take IN_PLACE_INT16, and
    a decode step scatters its bf16 KV cache as int16."""
    engine = make_engine(tiny_llama_dir, mode="plain", dtype="bfloat16", **SHAPES)
    decode = next(spec for spec in plan(engine.runner) if spec.kind == "decode")
    assert [m.writes for m in state_modules(decode.module)] == [StateWrites.IN_PLACE_INT16]
    with torch.no_grad(), Scatters() as seen:
        decode.module(*decode.example_inputs)
    assert seen.dtypes == [torch.int16] * 2 * engine.target.config.num_hidden_layers
