"""Compiled artifacts (compile/): the build writes a manifest, the HLO and its audit for every graph,
rebuilds only what changed, and `Engine.from_compiled` refuses stale artifacts, then generates the
eager engine's tokens without compiling anything during generation.

Builds run in a subprocess, as they must (torch-xla's persistent cache is fixed at a process's first
compilation); loading runs in this process. The xla and nxd builds and loads are marked `xla`: they run
in the torch-xla environment (.venv-xla); the plan, the audit of HLO text and the build's argument
checks run in the main environment too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

import neuron_peagle.backends.hlo_audit as audit
from compile.build import BuildRequest, build_artifacts, main as build_main
from neuron_peagle.runtime.manifest import FORMAT_VERSION, LOG_NAME, MANIFEST_NAME, Manifest, WeightsInfo, sealed
from neuron_peagle.backends.artifacts import NEURON_COMPILER_FLAGS, neuron_compiler_args
from neuron_peagle.graphs.interface import plan
from neuron_peagle.backends.nxd import INSTALL_HINT
from neuron_peagle.cli import main as cli_main
from neuron_peagle.config import BuildConfig
from neuron_peagle.errors import ArtifactError, BackendUnavailableError, ConfigError
from neuron_peagle.runtime.engine import Engine, SamplingParams
from neuron_peagle.speculation import SpeculationConfig
from spec_helpers import DRAFTER_ALONE, cycle_ks, make_engine, nxd_plan, record_ks

REPO = Path(__file__).resolve().parent.parent
PLAIN = SpeculationConfig(mode="plain")
SHAPES = dict(mode="parallel", num_speculative_tokens=3, batch_size=2, max_length=96, prefill_buckets=(16, 32),
              lookup_ngram=3, short_draft_tokens=2, plain_step=True)
BUILD_ARGS = ["--mode", "parallel", "-k", "3", "--batch-size", "2", "--max-length", "96", "--lookup-ngram", "3",
              "--short-draft-tokens", "2"]
# A step graph per K the engine may choose: K=3, the short K=2 and (batch 2) K=0.
GRAPHS = {f"spec_prefill_b{b}_{v}" for b in (16, 32) for v in ("greedy", "sampling")} | {
    f"spec_step_{k}{v}" for k in ("", "k2_", "k0_") for v in ("greedy", "sampling")}
SHORT = [[5, 6, 7], [8, 9, 10, 11, 12]]  # bucket 16
LONG = [list(range(20, 45)), list(range(50, 80))]  # bucket 32


def run_build(model_dir: Path, out: Path, buckets: str = "16,32") -> dict:
    """Build in a fresh process; returns the build's summary record from the compile log."""
    cmd = [sys.executable, "-m", "compile.build", "--backend", "xla", "--model", str(model_dir), "--out", str(out),
           *BUILD_ARGS, "--prefill-buckets", buckets]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900,
                            env={**os.environ, "PJRT_DEVICE": "CPU"})
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    return [r for r in records if r["event"] == "build"][-1]


@pytest.fixture(scope="module")
def built(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifacts")
    summary = run_build(tiny_llama_dir, out)
    assert set(summary["compiled"]) == GRAPHS and summary["up_to_date"] == []
    return out


@pytest.fixture(scope="module")
def compiled_engine(built) -> Engine:
    return Engine.from_compiled(built)


# ---- the build ----------------------------------------------------------------------------------

@pytest.mark.xla
def test_build_writes_manifest_hlo_and_audit_for_every_graph(built, tiny_llama_dir):
    manifest = Manifest.load(built)
    assert {g.name for g in manifest.graphs} == GRAPHS
    assert manifest.versions == {"torch": metadata.version("torch"), "torch-xla": metadata.version("torch-xla")}
    assert manifest.model.files["model.safetensors"] == WeightsInfo.of_dir(tiny_llama_dir).files["model.safetensors"]
    assert manifest.drafter.path is None and manifest.drafter.random_seed == 0  # no trained drafter for it
    assert (manifest.build.batch_size, manifest.build.prefill_buckets, manifest.speculation.num_speculative_tokens) == (2, (16, 32), 3)
    assert manifest.build.kernels == "reference"  # the switch, resolved for xla: plain PyTorch
    assert manifest.build.lnc == 1  # no NeuronCore: one physical core per logical core, recorded
    for graph in manifest.graphs:
        hlo = (built / graph.hlo_file).read_text()
        assert hlo.startswith("HloModule")
        assert graph.files and all((built / f).is_file() for f in graph.files)
        assert graph.audit["passed"] and graph.audit["histogram"]["dot"] > 0
        assert graph.audit["histogram"] == audit.audit_hlo(hlo, [49152]).histogram
        kinds = {f["kind"] for f in graph.audit["findings"]}
        assert "argmax" in kinds  # greedy choice / verify, drafter proposals
        assert ("sort" in kinds) == (not graph.greedy)  # only top-k / top-p sampling sorts
        assert list(graph.compiler_args) == [*NEURON_COMPILER_FLAGS, "--target", "trn1", "--logical-nc-config", "1"]
    step = manifest.graph("spec_step_greedy")
    state = {t.name: t for t in step.state}
    assert state["cache.key_0"].shape == (2, 2, 96, 16) and state["state.pending_features"].shape == (2, 4, 192)
    assert "proposer.inner.cache.key_0" in state  # the drafter's cache, inside the context lookup
    assert state["proposer.history"].shape == (2, 97)  # the lookup's token history is state too
    assert state["proposer.copied"].shape == (2, 3)  # and its copies for the next step
    assert [(t.name, t.shape) for t in step.outputs] == [("tokens", (2, 4)), ("counts", (2,)), ("known_drafts", (2,))]
    short = manifest.graph("spec_step_k2_greedy")  # the short K's step, on the same state
    assert [(t.name, t.shape) for t in short.outputs][0] == ("tokens", (2, 3))
    assert {t.name: t.shape for t in short.state} == {t.name: t.shape for t in step.state}
    prefill = manifest.graph("spec_prefill_b32_sampling")
    assert prefill.inputs[0].shape == (1, 32) and prefill.inputs[0].dtype == "int64"  # one sequence, into a slot
    notes = " ".join(manifest.audit_notes)
    assert "argmax over 49152" in notes and "lm-head-argmax kernel" in notes and "sort over 49152" in notes


@pytest.mark.xla
def test_rebuild_with_nothing_changed_compiles_nothing(built, tiny_llama_dir):
    summary = run_build(tiny_llama_dir, built)
    assert summary["compiled"] == [] and set(summary["up_to_date"]) == GRAPHS
    assert summary["xla_compilations"] == 0


@pytest.mark.xla
def test_changing_one_bucket_rebuilds_only_that_buckets_graphs(built, tiny_llama_dir, tmp_path):
    out = tmp_path / "artifacts"
    shutil.copytree(built, out)
    summary = run_build(tiny_llama_dir, out, buckets="16,48")
    assert set(summary["compiled"]) == {"spec_prefill_b48_greedy", "spec_prefill_b48_sampling"}
    assert summary["xla_compilations"] == 2
    assert set(summary["removed"]) == {"spec_prefill_b32_greedy", "spec_prefill_b32_sampling"}
    manifest = Manifest.load(out)
    assert manifest.build.prefill_buckets == (16, 48)
    assert not (out / "hlo" / "spec_prefill_b32_greedy.hlo.txt").exists()
    owned = {f for g in manifest.graphs for f in g.files}
    assert {f"xla_cache/{p.name}" for p in (out / "xla_cache").iterdir()} == owned


def test_tensor_parallel_and_unknown_target_are_clear_errors(tiny_llama_dir, tmp_path, capsys):
    # Sharded artifacts are NxD's (trn1); the other backends shard at run time (tests/test_nxd_parallel.py).
    code = build_main(["--model", str(tiny_llama_dir), "--out", str(tmp_path), "--tp-degree", "2"])
    assert code == 2 and "built for the nxd backend only" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="target must be one of"):
        neuron_compiler_args("trn3")


def test_the_lnc_is_set_for_the_compiler_and_refused_where_it_cannot_run(monkeypatch):
    """The compiler's LNC is explicit (its default is 2 on trn2; NKI kernels must match it); trn1 has LNC 1
    only; off NeuronCores only 1; on nxd "auto" follows NEURON_LOGICAL_NC_CONFIG."""
    from neuron_peagle.config import BuildConfig

    assert neuron_compiler_args("trn2", 2)[-2:] == ("--logical-nc-config", "2")
    built = BuildConfig(backend="neuron", lnc=2)  # what a manifest records, and reads back
    assert built.to_dict()["lnc"] == 2 and BuildConfig.from_dict(built.to_dict()) == built
    with pytest.raises(ConfigError, match=r"trn1 runs one physical NeuronCore per logical core \(LNC 1\), got lnc=2"):
        neuron_compiler_args("trn1", 2)
    with pytest.raises(ConfigError, match="lnc=2 needs NeuronCores: only with backend 'neuron' or 'nxd'"):
        BuildConfig(backend="inductor", lnc=2)
    with pytest.raises(ConfigError, match=r"lnc must be one of \(1, 2\)"):
        BuildConfig(backend="neuron", lnc=4)
    monkeypatch.delenv("NEURON_LOGICAL_NC_CONFIG", raising=False)
    assert BuildConfig(backend="nxd").lnc == 1 and BuildConfig(backend="neuron").lnc == 2  # trn2's default
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "1")
    assert BuildConfig(backend="neuron").lnc == 1 and BuildConfig(backend="nxd").lnc == 1
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "2")
    assert BuildConfig(backend="nxd").lnc == 2 and BuildConfig(backend="inductor").lnc == 1
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "3")
    with pytest.raises(ConfigError, match="NEURON_LOGICAL_NC_CONFIG must be one of"):
        BuildConfig(backend="neuron")


# ---- loading ------------------------------------------------------------------------------------

@pytest.mark.xla
def test_from_compiled_generates_the_eager_tokens_and_compiles_nothing(compiled_engine, tiny_llama_dir):
    engine = compiled_engine
    assert set(engine.artifacts.graphs) == GRAPHS
    eager = make_engine(tiny_llama_dir, **SHAPES)
    greedy = SamplingParams(max_new_tokens=24, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.95, seed=3, ignore_eos=True)
    start = engine.backend.compile_count()
    used_ks = record_ks(engine)  # (the recording stays on the shared engine: it only listens)
    cycle_ks(engine, [3, 0, 2])
    got = [o.output_ids for o in engine.generate(SHORT + LONG, greedy)]
    engine.generate(SHORT + LONG, sampled)
    assert engine.backend.compile_count() == start
    assert set(used_ks) == {3, 2, 0}  # every step graph ran
    assert got == [o.output_ids for o in eager.generate(SHORT + LONG, greedy)]


@pytest.mark.xla
def test_cli_generate_from_artifacts_equals_the_eager_cli(built, compiled_engine, tiny_llama_dir, capsys):
    common = ["generate", "hello there", "--max-new-tokens", "8", "--json"]
    assert cli_main([*common, "--artifacts", str(built)]) == 0
    compiled = json.loads(capsys.readouterr().out)
    assert cli_main([*common, "--model", str(tiny_llama_dir), *BUILD_ARGS, "--prefill-buckets", "16,32",
                     "--backend", "eager"]) == 0
    eager = json.loads(capsys.readouterr().out)
    assert compiled["output_ids"] == eager["output_ids"] and compiled["prompt_ids"] == eager["prompt_ids"]
    assert (compiled["backend"], eager["backend"]) == ("xla", "eager")


@pytest.mark.xla
def test_loading_after_other_xla_work_warns_and_compiles_in_process(built, compiled_engine, tmp_path):
    """torch-xla's persistent cache is fixed by now (the compiled_engine fixture set it), so loading
    a copy of the artifacts cannot use the copy's cache: it warns and compiles in the process."""
    from neuron_peagle.backends.xla_artifacts import IN_PROCESS

    copy = shutil.copytree(built, tmp_path / "copy")
    with pytest.warns(RuntimeWarning, match="compiled XLA graphs before loading"):
        engine = Engine.from_compiled(copy)
    assert "cache not usable" in engine.artifacts.cache
    assert set(engine.artifacts.graphs.values()) == {IN_PROCESS}  # the same graphs as compiled_engine's


@pytest.mark.xla
def test_changed_weight_file_is_refused_naming_it(built, tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model = shutil.copytree(tiny_llama_dir, tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 0.01
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match=r"model file .*model\.safetensors changed since the artifacts were built"):
        Engine.from_compiled(built, model_dir=model)


@pytest.mark.xla
def test_version_mismatch_is_refused(built, tmp_path):
    data = json.loads((built / MANIFEST_NAME).read_text())
    data["versions"]["torch-xla"] = "0.0.1"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(sealed(data)))
    installed = metadata.version("torch-xla")
    with pytest.raises(ArtifactError, match=rf"compiled with torch-xla 0\.0\.1 \(installed: {installed}\)"):
        Engine.from_compiled(tmp_path)


@pytest.mark.xla
def test_requested_shapes_must_match_the_build(built):
    with pytest.raises(ArtifactError, match=r"batch_size 2 \(requested: 4\), prefill_buckets \(16, 32\) "
                                            r"\(requested: \(16, 64\)\)"):
        Engine.from_compiled(built, batch_size=4, prefill_buckets=(16, 64))


@pytest.mark.xla
def test_prompt_no_bucket_fits_names_the_largest(compiled_engine):
    from neuron_peagle.errors import PromptError

    with pytest.raises(PromptError, match=r"largest prefill bucket \(32\)"):
        compiled_engine.generate([list(range(3, 43))], SamplingParams(max_new_tokens=4))


# ---- the plan shared with the nxd build ---------------------------------------------------------

@pytest.mark.parametrize("mode", ["plain", "parallel", "sequential"])
def test_declared_state_is_every_buffer_a_graph_updates(tiny_llama_dir, mode):
    """On a device only declared state is aliased and kept: a buffer updated but not declared
    would silently lose its update there. Checked by running each graph eagerly."""
    speculative = {key: SHAPES[key] if mode != "plain" else 0 for key in ("lookup_ngram", "short_draft_tokens")}
    engine = make_engine(tiny_llama_dir, **{**SHAPES, "mode": mode, **speculative, "plain_step": mode != "plain"})
    specs = plan(engine.runner)
    prefix = "spec_" if mode != "plain" else ""
    steps = ("spec_step", "spec_step_k2", "spec_step_k0") if mode != "plain" else ("decode",)
    assert {s.name for s in specs} == {f"{prefix}prefill_b{b}_{v}" for b in (16, 32) for v in ("greedy", "sampling")} | {
        f"{step}_{v}" for step in steps for v in ("greedy", "sampling")}
    for spec in specs:
        for buffer in spec.state_buffers.values():
            buffer.zero_()  # so that every write shows, even of what an earlier graph wrote
        before = {name: b.clone() for name, b in spec.module.named_buffers()}
        with torch.no_grad():
            outputs = spec.module(*spec.example_inputs)
        changed = {name for name, b in spec.module.named_buffers() if not torch.equal(b, before[name])}
        assert changed <= set(spec.state_names), spec.name
        assert "cache.key_0" in changed and len(outputs) == len(spec.module.Outputs._fields)


# ---- the audit ----------------------------------------------------------------------------------

WHILE_HLO = """HloModule loop
%cond (p: s32[]) -> pred[] {
  %p = s32[] parameter(0)
  %c = s32[] constant(4)
  ROOT %lt = pred[] compare(s32[] %p, s32[] %c), direction=LT
}
ENTRY %main (a: s32[]) -> s32[] {
  %a = s32[] parameter(0)
  ROOT %w = s32[] while(s32[] %a), condition=%cond, body=%cond
}
"""
DYNAMIC_HLO = """HloModule dyn
ENTRY %main (p: f32[<=16,4]) -> f32[<=16,4] {
  %p = f32[<=16,4]{1,0} parameter(0)
  ROOT %n = f32[<=16,4]{1,0} negate(f32[<=16,4]{1,0} %p)
}
"""
HOST_HLO = """HloModule host
ENTRY %main (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %cb = f32[4]{0} custom-call(f32[4]{0} %p), custom_call_target="xla_python_cpu_callback"
}
"""


@pytest.mark.parametrize("hlo, message", [(WHILE_HLO, "data-dependent loop: while instruction w"),
                                          (DYNAMIC_HLO, r"dynamic shape f32\[<=16,4\] in instruction p"),
                                          (HOST_HLO, "host callback: custom-call cb to 'xla_python_cpu_callback'")])
def test_audit_fails_with_a_clear_message(hlo, message):
    result = audit.audit_hlo(hlo, [49152])
    assert not result.passed
    with pytest.raises(ArtifactError, match=rf"graph g fails the HLO audit \(g\.hlo\.txt\): {message}"):
        audit.check("g", result, "g.hlo.txt")


@pytest.mark.xla
def test_audit_flags_vocabulary_argmax_and_sort_but_not_softmax():
    import torch_xla

    from neuron_peagle.backends.xla import hlo_text

    logits = torch.randn(2, 3, 1000).to(torch_xla.device())
    result = audit.audit_hlo(hlo_text([logits.argmax(-1), logits.softmax(-1), logits[..., :7].argmax(-1)]), [1000])
    assert result.passed
    assert [(f.kind, f.shape, f.size) for f in result.findings] == [("argmax", (2, 3, 1000), 1000)]
    result = audit.audit_hlo(hlo_text([logits.sort(-1, descending=True).values]), [1000])
    assert [(f.kind, f.size) for f in result.findings] == [("sort", 1000)]
    assert "lm-head-argmax kernel" in audit.notes({"g": (audit.Finding("argmax", "reduce.1", (2, 1000), 1000),)})[0]


# ---- nxd (neuronx-distributed NEFFs, trn1) --------------------------------------------------------

@pytest.mark.xla
@pytest.mark.skipif(importlib.util.find_spec("torch_neuronx") is not None, reason="the Neuron SDK is installed")
def test_nxd_without_the_sdk_says_what_to_install(built, tiny_llama_dir, tmp_path):
    request = BuildRequest(tiny_llama_dir, None, tmp_path / "out", backend="nxd",
                           build=BuildConfig(batch_size=2, max_length=96, prefill_buckets=(16, 32)),
                           speculation=SpeculationConfig(num_speculative_tokens=3, **DRAFTER_ALONE))
    with pytest.raises(BackendUnavailableError) as err:
        build_artifacts(request)
    assert str(err.value) == INSTALL_HINT
    data = json.loads((built / MANIFEST_NAME).read_text())
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(sealed({**data, "backend": "nxd"})))
    with pytest.raises(BackendUnavailableError, match="Neuron SDK's own pip repository"):
        Engine.from_compiled(tmp_path)


@pytest.mark.xla
def test_nxd_loader_checks_the_plan_interfaces_and_weight_dict(built, tiny_llama_dir):
    """Before any SDK call, an nxd load checks what its NxDModel relies on and the process provides.
    An nxd manifest is the xla one plus the weight dict's layout, so the xla build stands in for it."""
    from neuron_peagle.runtime.manifest import tensor_infos
    from neuron_peagle.backends.nxd_graphs import NxdBundle
    from neuron_peagle.backends.nxd_artifacts import check_nxd_plan

    from neuron_peagle.runtime.manifest import TensorInfo

    engine = make_engine(tiny_llama_dir, **SHAPES)
    specs = nxd_plan(engine)
    checkpoint = NxdBundle.of(specs).checkpoint
    built_manifest = Manifest.load(built)
    # On nxd every graph holds every state buffer (a prefill's one-row twin too: hold_every_state).
    state = {s.name: tuple(TensorInfo.of(n, t) for n, t in s.state_buffers.items()) for s in specs}
    manifest = dataclasses.replace(built_manifest, backend="nxd", neuron_checkpoint=tensor_infos(checkpoint),
                                   graphs=tuple(dataclasses.replace(g, state=state[g.name])
                                                for g in built_manifest.graphs))
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    check_nxd_plan(specs, manifest, checkpoint)  # as built: passes

    layout = list(manifest.neuron_checkpoint)
    norm = next(i for i, t in enumerate(layout) if t.name == "graph.target.norm.weight")
    wider = dataclasses.replace(manifest, neuron_checkpoint=tuple(
        dataclasses.replace(t, shape=(65,)) if i == norm else t for i, t in enumerate(layout)))
    with pytest.raises(ArtifactError, match=r"graph\.target\.norm\.weight is \[64\] float32, built as \[65\] float32"):
        check_nxd_plan(specs, wider, checkpoint)
    without_norm = dataclasses.replace(manifest, neuron_checkpoint=tuple(layout[:norm] + layout[norm + 1:]))
    with pytest.raises(ArtifactError, match=r"graph\.target\.norm\.weight was not there when they were built"):
        check_nxd_plan(specs, without_norm, checkpoint)
    step = manifest.graph("spec_step_greedy")
    longer_cache = tuple(dataclasses.replace(t, shape=(2, 2, 128, 16)) if t.name == "cache.key_0" else t
                         for t in step.state)
    changed = dataclasses.replace(manifest, graphs=tuple(
        dataclasses.replace(g, state=longer_cache) if g.name == step.name else g for g in manifest.graphs))
    with pytest.raises(ArtifactError, match=r"graph spec_step_greedy now has state .*'cache\.key_0', \[2, 2, 96, 16\]"):
        check_nxd_plan(specs, changed, checkpoint)
    fewer = dataclasses.replace(manifest, graphs=tuple(g for g in manifest.graphs if g.name != step.name))
    with pytest.raises(ArtifactError, match="the engine needs graphs"):
        check_nxd_plan(specs, fewer, checkpoint)


@pytest.mark.neuron
@pytest.mark.xla
def test_nxd_artifacts_generate_the_eager_tokens(tiny_llama_dir, tmp_path):
    """On a trn1 instance (the torch-xla environment with the Neuron SDK): the nxd build writes one
    NxDModel holding every graph, `from_compiled` loads it with one copy of the weights and state, and
    generation gives the eager engine's tokens."""
    pytest.importorskip("torch_neuronx")
    pytest.importorskip("neuronx_distributed")
    from neuron_peagle.backends.nxd_artifacts import ON_NEURON

    cmd = [sys.executable, "-m", "compile.build", "--backend", "nxd", "--model", str(tiny_llama_dir),
           "--out", str(tmp_path), *BUILD_ARGS, "--prefill-buckets", "16,32", "--target", "trn1"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=7200)
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = Manifest.load(tmp_path)
    assert manifest.backend == "nxd" and manifest.versions["torch-neuronx"] == metadata.version("torch-neuronx")
    assert manifest.versions["neuronx-distributed"] == metadata.version("neuronx-distributed")
    assert {g.name for g in manifest.graphs} == GRAPHS
    assert "graph.cache.key_0" in {t.name for t in manifest.neuron_checkpoint}
    for graph in manifest.graphs:
        assert set(graph.files) == {f"neuron/{graph.name}.neff", "neuron/model.pt"}
        assert all((tmp_path / f).is_file() for f in graph.files) and (tmp_path / graph.hlo_file).is_file()

    engine = Engine.from_compiled(tmp_path)
    assert engine.artifacts.graphs == {name: ON_NEURON for name in GRAPHS}
    eager = make_engine(tiny_llama_dir, **SHAPES)
    greedy = SamplingParams(max_new_tokens=24, ignore_eos=True)
    got = [o.output_ids for o in engine.generate(SHORT + LONG, greedy)]
    assert got == [o.output_ids for o in eager.generate(SHORT + LONG, greedy)]
    sampled = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.95, seed=3, ignore_eos=True)
    assert all(len(o.output_ids) == 16 for o in engine.generate(SHORT + LONG, sampled))
    assert engine.backend.compile_count() == 0

    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=7200)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert [r for r in records if r["event"] == "build"][-1]["compiled"] == []  # NEFFs reused, model.pt re-assembled


# ---- the default model ---------------------------------------------------------------------------

LOAD_AND_GENERATE = """
import json, sys
from neuron_peagle.runtime.engine import Engine, SamplingParams
engine = Engine.from_compiled(sys.argv[1])
start = engine.backend.compile_count()
outputs = engine.generate(json.loads(sys.argv[2]), SamplingParams(max_new_tokens=24, ignore_eos=True))
print(json.dumps({"ids": [o.output_ids for o in outputs], "compiled": engine.backend.compile_count() - start,
                  "graphs": sorted(engine.artifacts.graphs)}))
"""


@pytest.mark.slow
@pytest.mark.xla
def test_default_model_artifacts_generate_the_eager_tokens(default_model_dir, tmp_path):
    """The embedded model and its drafter, one bucket: a valid manifest and HLO for every graph, and a
    fresh process that loads them generates the eager engine's tokens with no compile while generating."""
    out = tmp_path / "default"
    # One bucket and one step graph (no adaptive K): the tiny model's build above covers several of each.
    cmd = [sys.executable, "-m", "compile.build", "--backend", "xla", "--out", str(out), "--mode", "parallel",
           "-k", "5", "--batch-size", "2", "--max-length", "160", "--prefill-buckets", "64", "--short-draft-tokens", "0",
           "--plain-step", "off"]
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1200, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = Manifest.load(out)
    graphs = {"spec_prefill_b64_greedy", "spec_prefill_b64_sampling", "spec_step_greedy", "spec_step_sampling"}
    assert {g.name for g in manifest.graphs} == graphs
    assert manifest.drafter.path is not None and manifest.build.prefill_buckets == (64,)
    for graph in manifest.graphs:
        assert (out / graph.hlo_file).read_text().startswith("HloModule") and graph.audit["passed"]

    eager = make_engine(mode="parallel", num_speculative_tokens=5, batch_size=2, max_length=160,
                                   prefill_buckets=(64,))
    prompts = [eager.encode("Write a Python function that reverses a string."),
               eager.encode("What is 12 times 7? Answer briefly, then explain.")]
    want = [o.output_ids for o in eager.generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=True))]
    result = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(out), json.dumps(prompts)],
                            capture_output=True, text=True, cwd=REPO, timeout=1200, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["graphs"] == sorted(graphs) and loaded["compiled"] == 0
    assert loaded["ids"] == want


@pytest.mark.parametrize("backend", ["inductor", "xla"])
def test_a_build_refuses_a_directory_of_the_users_and_deletes_nothing(tiny_llama_dir, tmp_path, backend):
    out = tmp_path / "mine"
    (out / "hlo").mkdir(parents=True)
    (out / "hlo" / "notes.txt").write_text("mine")
    (out / "thesis.tex").write_text("mine too")
    request = BuildRequest(tiny_llama_dir, None, out, backend=backend, speculation=PLAIN,
                           build=BuildConfig(max_length=64, prefill_buckets=(16,)))
    with pytest.raises(ArtifactError, match=r"holds files of its own \(thesis.tex\) and no manifest.json"):
        build_artifacts(request)
    assert (out / "hlo" / "notes.txt").read_text() == "mine" and (out / "thesis.tex").read_text() == "mine too"
    assert sorted(p.name for p in out.rglob("*")) == ["hlo", "notes.txt", "thesis.tex"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is a file"):
        build_artifacts(BuildRequest(tiny_llama_dir, None, tmp_path / "file", backend=backend, speculation=PLAIN))


def test_a_manifest_of_another_format_is_refused_with_both_formats(tmp_path):
    for other in (1, FORMAT_VERSION + 1, None):
        (tmp_path / MANIFEST_NAME).write_text(json.dumps(sealed({"format_version": other, "backend": "xla"})))
        expected = rf"manifest format {other!r}, this version reads format {FORMAT_VERSION}; rebuild the artifacts " \
                   r"with `python -m compile\.build`"
        with pytest.raises(ArtifactError, match=expected):
            Manifest.load(tmp_path)


# ---- artifact checksums --------------------------------------------------------------------------

def _hand_made_artifacts(out: Path, model_dir: Path) -> Manifest:
    """An xla-style artifact directory written by hand (HLO, a cache entry, a compile_cache folder and a
    portable cache) and its manifest as a build records it, for the loader's file checks (no compile)."""
    from neuron_peagle.runtime.manifest import GraphRecord, artifact_checksums, installed_versions

    (out / "hlo").mkdir(parents=True)
    (out / "hlo" / "decode_greedy.hlo.txt").write_text("HloModule decode_greedy\n")
    (out / "xla_cache").mkdir()
    (out / "xla_cache" / "1234").write_bytes(b"compiled graph")
    (out / "compile_cache" / "fxgraph").mkdir(parents=True)  # the compiler's own: not recorded
    (out / "compile_cache" / "fxgraph" / "entry").write_bytes(b"cached")
    (out / "portable_cache.bin").write_bytes(b"portable")
    graph = GraphRecord(name="decode_greedy", kind="decode", bucket=None, greedy=True, inputs=(), outputs=(), state=(),
                        compiler_args=(), hlo_file="hlo/decode_greedy.hlo.txt", hlo_sha256="", fingerprint="",
                        files=("xla_cache/1234", "compile_cache"), compile_time_s=0.0, audit={})
    manifest = Manifest(backend="inductor", versions=installed_versions("inductor"),
                        build=BuildConfig(max_length=64, prefill_buckets=(16,), backend="inductor"),
                        speculation=PLAIN.resolved(False), tp_degree=1, target="trn1", model=WeightsInfo.of_dir(model_dir),
                        drafter=None, graphs=(graph,), audit_notes=(),
                        checksums=artifact_checksums(out, (graph,)))
    manifest.save(out)
    return manifest


def test_manifest_records_the_sha256_of_every_file_the_loader_reads(tiny_llama_dir, tmp_path):
    from neuron_peagle.runtime.manifest import artifact_checksums
    from neuron_peagle.default_model import sha256_of
    from neuron_peagle.runtime.artifacts import check_artifact_files

    manifest = _hand_made_artifacts(tmp_path, tiny_llama_dir)
    assert set(manifest.checksums) == {"hlo/decode_greedy.hlo.txt", "xla_cache/1234", "portable_cache.bin"}
    assert manifest.checksums["xla_cache/1234"] == sha256_of(tmp_path / "xla_cache" / "1234")
    assert Manifest.load(tmp_path) == manifest  # saved and read back
    check_artifact_files(tmp_path, manifest)  # as built
    (tmp_path / "compile_cache" / "fxgraph" / "entry").write_bytes(b"the compiler's business")
    check_artifact_files(tmp_path, manifest)
    assert artifact_checksums(tmp_path, ()) == {"portable_cache.bin": manifest.checksums["portable_cache.bin"]}


@pytest.mark.parametrize("damage", ["changed", "missing"])
def test_a_changed_or_missing_artifact_file_is_refused_before_any_model_loads(tiny_llama_dir, tmp_path, damage,
                                                                              monkeypatch):
    _hand_made_artifacts(tmp_path, tiny_llama_dir)
    hlo = tmp_path / "hlo" / "decode_greedy.hlo.txt"
    if damage == "changed":
        hlo.write_text("HloModule something_else\n")
        match = r"artifact file .*hlo/decode_greedy\.hlo\.txt changed since the build \(sha256 [0-9a-f]{16}\.\.\., " \
                r"built as [0-9a-f]{16}\.\.\.\): it was modified or corrupted; rebuild the artifacts"
    else:
        hlo.unlink()
        match = r"artifact file .*hlo/decode_greedy\.hlo\.txt is missing \(the build wrote it\); rebuild the artifacts"
    monkeypatch.setattr(Engine, "from_build", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    with pytest.raises(ArtifactError, match=match):
        Engine.from_compiled(tmp_path)


def test_a_manifest_without_checksums_or_with_a_path_outside_is_malformed(tiny_llama_dir, tmp_path):
    _hand_made_artifacts(tmp_path, tiny_llama_dir)
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    del data["checksums"]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(sealed(data)))
    with pytest.raises(ArtifactError, match="malformed manifest"):
        Manifest.load(tmp_path)
    data["checksums"] = {"../elsewhere": "0" * 64}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(sealed(data)))
    with pytest.raises(ArtifactError, match="malformed manifest"):
        Manifest.load(tmp_path)
