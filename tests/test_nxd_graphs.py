"""The plain-PyTorch half of the nxd backend (backends/nxd_graphs.py), on CPU: the wrapper NxD
traces computes exactly what each planned graph computes and leaves its state rebound (the update
NxD aliases), one weight dict serves every graph (weights and read-only tables, no state), and
every call a runner makes routes to the planned graph of its kind, variant and bucket.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
from itertools import chain

import pytest
import torch

from neuron_peagle.graphs.interface import GRAPH_KINDS, PREFILL_KINDS
from neuron_peagle.backends.nxd_graphs import INPUT_NAMES, GraphRouter, NxdBundle, NxdGraph
from neuron_peagle.errors import ArtifactError
from neuron_peagle.runtime.batch import pad_prompt
from neuron_peagle.runtime.engine import SamplingParams
from neuron_peagle.runtime.step_parts import TimedStep
from neuron_peagle.state_writes import StateWrites, use_state_writes
from test_datastore import small_model_with_datastore  # noqa: F401  (a fixture)
from spec_helpers import make_engine, nxd_plan

# The nxd backend (NxDModel, trn1) lives in the torch-xla environment, and so do its tests.
pytestmark = pytest.mark.xla

SHAPES = dict(mode="parallel", num_speculative_tokens=3, batch_size=2, max_length=96, prefill_buckets=(16, 32))
SHORT = [[5, 6, 7], [8, 9, 10, 11, 12]]  # bucket 16
LONG = [list(range(20, 45)), list(range(50, 80))]  # bucket 32


def planned(model_dir, mode: str = "parallel"):
    engine = make_engine(model_dir, **{**SHAPES, "mode": mode})
    return engine, nxd_plan(engine)


def test_the_shared_signature_takes_every_input_of_every_graph_as_an_optional_keyword():
    """NxDModel keys must share one forward signature: a graph input missing from it could not be
    passed, so adding one to a graph's Inputs must fail here, not on a trn instance."""
    declared = {name for graph in GRAPH_KINDS for name in graph.Inputs._fields}
    assert set(INPUT_NAMES) == declared
    params = [p for name, p in inspect.signature(NxdGraph.forward).parameters.items() if name != "self"]
    assert all(p.default is None and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


@pytest.mark.parametrize("mode", ["plain", "parallel"])
def test_the_traced_wrapper_computes_the_graph_and_rebinds_its_updated_state(tiny_llama_dir, mode):
    """Graph by graph in plan order (so each step graph starts from its prefill's state): the graph
    run as the eager engine runs it and run through NxdGraph from the same state, its state modules in
    StateWrites.REBIND as backends/nxd.py traces it, give the same outputs and the same new state, and
    the wrapper leaves every state buffer rebound to a new tensor."""
    _, specs = planned(tiny_llama_dir, mode)
    bundle = NxdBundle.of(specs)
    for spec in specs:
        if spec.kind in PREFILL_KINDS:  # from zeros, so that every write shows
            for buffer in spec.state_buffers.values():
                buffer.zero_()
        else:  # a step graph may rewrite a slot its prefill wrote with the very same bits (CPUs whose
            # matmuls round one row as they round many): shift the float state so every write shows
            for buffer in spec.state_buffers.values():
                if buffer.is_floating_point():
                    buffer.add_(1.0)
        start = {name: b.clone() for name, b in spec.state_buffers.items()}
        use_state_writes(spec.module, StateWrites.IN_PLACE_INT16)  # as the eager backend prepared it
        with torch.no_grad():
            want = spec.module(*spec.example_inputs)
        want_state = {name: b.clone() for name, b in spec.state_buffers.items()}
        for name, value in start.items():
            spec.module.get_buffer(name).copy_(value)
        before = dict(spec.state_buffers)
        graph = bundle.graphs[spec.name]
        use_state_writes(graph, StateWrites.REBIND)
        with torch.no_grad():
            got = graph(**bundle.example_inputs[spec.name])
        assert isinstance(got, tuple) and len(got) == len(spec.module.Outputs._fields)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), spec.name
        for name, buffer in spec.state_buffers.items():
            assert buffer is not before[name], f"{spec.name}: {name} updated in place, not rebound"
            assert torch.equal(buffer, want_state[name]), f"{spec.name}: {name}"
        assert any(not torch.equal(want_state[n], start[n]) for n in start), spec.name  # the state did change


def test_one_weight_dict_holds_every_tensor_of_every_graph_once(tiny_llama_dir):
    _, specs = planned(tiny_llama_dir)
    bundle = NxdBundle.of(specs)
    checkpoint = bundle.checkpoint
    for graph in bundle.graphs.values():
        state = {id(graph.graph.get_buffer(name)) for name in graph.state_names}
        for name, tensor in chain(graph.named_parameters(remove_duplicate=False),
                                  graph.named_buffers(remove_duplicate=False)):
            if id(tensor) not in state:
                assert torch.equal(checkpoint[name], tensor), name
    step = next(s for s in specs if s.name == "spec_step_greedy")
    assert not {f"graph.{name}" for name in step.state_names} & set(checkpoint)
    # The drafter reads the target's embedding: one tensor under both names, not a copy.
    assert (checkpoint["graph.target.embed_tokens.weight"].data_ptr()
            == checkpoint["graph.proposer.target_embedding.weight"].data_ptr())
    # So does the tied LM head (the tiny model ties it).
    assert (checkpoint["graph.target.lm_head.weight"].data_ptr()
            == checkpoint["graph.target.embed_tokens.weight"].data_ptr())
    # A graph whose weights are other tensors under the same names cannot join the dict.
    stranger = dataclasses.replace(step, name="stranger", module=copy.deepcopy(step.module))
    with pytest.raises(ArtifactError, match=r"graph\.\S+ names two different tensors"):
        NxdBundle.of([*specs, stranger])
    # Nor can a graph that holds less state than the others: the NxDModel has one set for all.
    stateless = dataclasses.replace(step, name="stateless", state_names=step.state_names[:-1])
    with pytest.raises(ArtifactError, match=rf"hold different state \(\['{re.escape(step.state_names[-1])}'\]\)"):
        NxdBundle.of([*specs, stateless])


def test_every_runner_call_routes_to_its_planned_graph(tiny_llama_dir):
    """Each graph module serves several keys (buckets); the router tells them apart by input shape.
    The runners' real calls, greedy and sampling, both buckets, all land on planned names."""
    engine, specs = planned(tiny_llama_dir)
    router = GraphRouter.of(specs)
    routed: list[str] = []
    run = engine.backend.run

    def recording_run(graph, inputs):
        # The eager engine standing in here times its step graphs through TimedStep (runtime.step_parts);
        # on nxd the runner hands over the step graph itself, which is what the router knows.
        routed.append(router.key(graph.graph if isinstance(graph, TimedStep) else graph, inputs))
        return run(graph, inputs)

    engine.backend.run = recording_run
    engine.generate(SHORT + LONG, SamplingParams(max_new_tokens=6, ignore_eos=True))
    engine.generate(LONG, SamplingParams(max_new_tokens=6, temperature=0.9, seed=1, ignore_eos=True))
    assert set(routed) == {"spec_prefill_b16_greedy", "spec_prefill_b32_greedy", "spec_step_greedy",
                           "spec_prefill_b32_sampling", "spec_step_sampling"}
    # One prefill per request, into its slot.
    assert routed[0] == "spec_prefill_b16_greedy" and routed.count("spec_prefill_b32_greedy") == len(LONG)

    prefill = engine.runner.graphs[True][0]
    example = next(s.example_inputs for s in specs if s.name == "spec_prefill_b16_greedy")
    ids, lengths = pad_prompt([1] * 40, 48)  # a bucket that was never built
    with pytest.raises(ArtifactError, match=r"no compiled graph takes SpecPrefillGraph inputs of shapes \[\(1, 48\)"):
        router.key(prefill, example._replace(input_ids=ids, lengths=lengths))
    with pytest.raises(ArtifactError, match="could not tell them apart"):
        GraphRouter.of([*specs, dataclasses.replace(specs[0], name="twin")])


@pytest.mark.parametrize("engine_kind", ["speculative", "plain"])
def test_the_weight_dict_holds_the_read_only_tables_and_no_state(small_model_with_datastore, tiny_llama_dir,
                                                                 engine_kind):
    """NxD makes the state buffers itself, zeroed on the device: a copy of them (KV caches above all)
    in the weight dict would only take HBM. Every read-only table is a weight and must be there: the
    rotary tables, the datastore's hash table, the drafter's d2t, the precomputed mask row."""
    if engine_kind == "speculative":
        model_dir, drafter_dir = small_model_with_datastore
        engine = make_engine(model_dir, drafter_dir, short_draft_tokens=2, lookup_ngram=2, datastore=True,
                                        **SHAPES)
    else:
        engine = make_engine(tiny_llama_dir, **{**SHAPES, "mode": "plain"})
    specs = nxd_plan(engine)
    checkpoint = NxdBundle.of(specs).checkpoint
    state = {b.untyped_storage().data_ptr(): f"{s.name}: {n}" for s in specs for n, b in s.state_buffers.items()}
    assert not {name: state[t.untyped_storage().data_ptr()] for name, t in checkpoint.items()
                if t.untyped_storage().data_ptr() in state}
    assert not {f"graph.{name}" for spec in specs for name in spec.state_names} & set(checkpoint)
    tables = {f"graph.{name}" for spec in specs for name, _ in spec.module.named_buffers()
              if name not in spec.state_names}
    assert tables <= set(checkpoint)
    expected = {"graph.target.rotary.cos", "graph.target.rotary.sin"}
    if engine_kind == "speculative":
        datastore = "graph.proposer.datastore."
        expected |= {datastore + "key_columns", datastore + "table.slot_keys", datastore + "table.slot_next",
                     datastore + "table.hash_weights", datastore + "table.probe_offsets",
                     "graph.proposer.inner.drafter.d2t", "graph.proposer.inner.fc_mask_row",
                     "graph.proposer.inner.drafter.rotary.cos"}
    assert expected <= tables
