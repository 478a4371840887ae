"""The kernels on TorchNeuron's route (neuron_peagle/kernels/__init__.py), checked on CPU by capturing every
graph of an engine for the "neuron" device: PrivateUse1 renamed "neuron" and a device module registered
(what importing torch_neuronx does), the graph's weights, state and inputs as fake tensors on that device,
and the graph traced with make_fx, as AOT capture sees it before TorchNeuron's lowering.

- "nki" mode: each kernel is one call of `nki.jit(kernel)[lnc]` inside the graph (here a stand-in op that
  records the kernel and the LNC: on a trn instance that call is TorchNeuron's `nki_kernel_wrapper`
  node), and no `neuron_peagle::` custom op, which TorchNeuron's lowering would not know;
- "reference" mode: no custom op at all, only aten.
Each check runs in a process of its own: renaming PrivateUse1 cannot be undone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CAPTURE = textwrap.dedent("""
    import json, sys
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    # What importing torch_neuronx does to torch: PrivateUse1 renamed "neuron", with a device module, hooks
    # and a device guard (PyTorch's own set-up of a Python-side backend, no kernels: only fake tensors).
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend
    _setup_privateuseone_for_python_backend(rename="neuron")

    import neuron_peagle.kernels as kernels
    from neuron_peagle.kernels import launch
    from neuron_peagle.backends import get_backend
    from neuron_peagle.config import BuildConfig
    from neuron_peagle.graphs.interface import plan
    from neuron_peagle.runtime.engine import Engine
    from neuron_peagle.speculation import SpeculationConfig

    model_dir, drafter_dir, mode, lnc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    # nki.jit stood in for by an op that records which kernel is launched at which LNC and gives the
    # kernel's output shapes (the kernels' contracts, kernels/launch.py).
    OUTPUTS = {
        "draft_input_kernel": lambda t: [t[0].new_empty(t[0].shape[0], 2 * t[0].shape[1]),
                                         t[0].new_empty(t[0].shape[0], t[0].shape[1])],
        "lm_head_argmax_kernel": lambda t: [t[0].new_empty(t[0].shape[0], 1, dtype=torch.int32),
                                            t[0].new_empty(t[0].shape[0], 1, dtype=torch.float32)],
    }
    OUTPUTS["lm_head_argmax_d2t_kernel"] = OUTPUTS["lm_head_argmax_kernel"]

    @torch.library.custom_op("nki_stand_in::launch", mutates_args=())
    def launch_op(kernel: str, lnc: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        raise AssertionError("traced only")

    @launch_op.register_fake
    def _(kernel, lnc, tensors):
        return OUTPUTS[kernel](tensors)

    class StandIn:
        def __init__(self, kernel, lnc=1):
            self.kernel, self.lnc = kernel, lnc
        def __getitem__(self, lnc):
            return StandIn(self.kernel, lnc)
        def __call__(self, *args):
            return launch_op(self.kernel.__name__, self.lnc, [a for a in args if isinstance(a, torch.Tensor)])

    kernels.HAVE_NKI = True  # the mode check only; nothing of nki runs
    launch._jit = StandIn
    build = BuildConfig(batch_size=2, max_length=64, prefill_buckets=(16,), backend="neuron", kernels=mode, lnc=lnc)
    speculation = SpeculationConfig(mode="parallel", num_speculative_tokens=3, lookup_ngram=0, datastore=False,
                                    plain_step=False)
    engine = Engine.from_build(model_dir, drafter_dir, speculation, build, backend=get_backend("eager"))
    report = {}
    fake = FakeTensorMode(allow_non_fake_inputs=True)

    def on_device(t):  # a fake tensor on the neuron device with t's shape, strides and dtype
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="neuron")

    for graph in plan(engine.runner):
        module = graph.module
        with fake:
            state = {name: on_device(t) for name, t in [*module.named_parameters(), *module.named_buffers()]}
            inputs = [on_device(t) if isinstance(t, torch.Tensor) else t for t in graph.example_inputs]
        def run(state, *inputs):
            return torch.func.functional_call(module, state, tuple(inputs))
        with fake:  # traced on the fake device tensors themselves
            captured = make_fx(run)(state, *inputs)
        targets = [n.target for n in captured.graph.nodes if n.op == "call_function"]
        namespaces = sorted({t.namespace for t in targets if isinstance(t, torch._ops.OpOverload)})
        launches = [(n.args[0], n.args[1]) for n in captured.graph.nodes
                    if n.op == "call_function" and "nki_stand_in" in str(n.target)]
        devices = sorted({str(n.meta["val"].device) for n in captured.graph.nodes
                          if isinstance(n.meta.get("val"), torch.Tensor)})
        report[graph.name] = {"namespaces": namespaces, "launches": launches, "devices": devices}
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def engine_dirs(tmp_path_factory):
    from conftest import save_tiny_model
    from neuron_peagle.config import DrafterConfig, ModelConfig
    from neuron_peagle.models.drafter_io import save_drafter
    from neuron_peagle.models.target import default_feature_layers
    from neuron_peagle.runtime.drafter_choice import random_drafter

    root = tmp_path_factory.mktemp("route")
    model_dir = save_tiny_model(root / "model", "llama", vocab_size=64, num_hidden_layers=2)
    target = ModelConfig.from_dir(model_dir)
    drafter = DrafterConfig.for_target(target, default_feature_layers(2), draft_vocab_size=32, intermediate_size=64)
    return model_dir, save_drafter(random_drafter(drafter, 64, seed=1), root / "drafter")


def _capture(engine_dirs, mode: str, lnc: int) -> dict:
    model_dir, drafter_dir = engine_dirs
    result = subprocess.run([sys.executable, "-c", CAPTURE, str(model_dir), str(drafter_dir), mode, str(lnc)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_neuron_graph_calls_the_nki_kernels_at_the_builds_lnc_and_holds_no_opaque_op(engine_dirs):
    report = _capture(engine_dirs, "nki", 2)
    assert sorted(report) == ["spec_prefill_b16_greedy", "spec_prefill_b16_sampling", "spec_step_greedy",
                              "spec_step_sampling"]
    for name, graph in report.items():
        assert graph["namespaces"] == ["aten", "nki_stand_in"], name  # no neuron_peagle:: op
        assert graph["devices"] == ["neuron:0"], name  # every tensor of the graph on the device
        assert all(lnc == 2 for _, lnc in graph["launches"]), name
    assert [kernel for kernel, _ in report["spec_prefill_b16_greedy"]["launches"]] == ["draft_input_kernel"]
    step = report["spec_step_greedy"]
    # the draft pass: layer 0's input, the drafter's greedy drafts (a reduced vocabulary: with d2t);
    # the verify: the target's greedy tokens
    assert sorted(kernel for kernel, _ in step["launches"]) == [
        "draft_input_kernel", "lm_head_argmax_d2t_kernel", "lm_head_argmax_kernel"]
    sampled = report["spec_step_sampling"]
    assert sorted(kernel for kernel, _ in sampled["launches"]) == ["draft_input_kernel", "lm_head_argmax_d2t_kernel"]


def test_in_reference_mode_a_neuron_graph_holds_no_custom_op(engine_dirs):
    report = _capture(engine_dirs, "reference", 1)
    for name, graph in report.items():
        assert graph["namespaces"] == ["aten"], (name, graph["namespaces"])
        assert not graph["launches"] and graph["devices"] == ["neuron:0"], name
