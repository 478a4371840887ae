"""torch-neuronx on a trn1/trn2 instance: compiles the planned graphs into traced NEFF modules.

The Neuron SDK is imported only inside functions, so everything else runs (and is tested) without
it; with it missing, every entry point raises BackendUnavailableError with INSTALL_HINT.

Each graph is traced by `torch_neuronx.trace` with its KV caches and speculative state as
`input_output_aliases` (they stay on the device and are updated in place), weights kept out of the
NEFF (`inline_weights_to_neff=False`, so all graphs can share one device copy via
`torch_neuronx.move_trace_to_device`), then saved with `torch.jit.save`.

Running graphs on Neuron is not wired yet: each traced module owns its aliased state, while the
prefill and step graphs must share one KV cache; sharing state across graphs is what
neuronx-distributed's ModelBuilder provides, and is the next step.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from neuron_peagle.errors import BackendUnavailableError

INSTALL_HINT = (
    "the neuron backend needs the Neuron SDK (torch-neuronx 2.9, neuronx-cc) on a trn1/trn2 instance, "
    "installed from the Neuron SDK's own pip repository; on other machines use --backend eager or xla"
)
NOT_WIRED = (
    "running graphs on Neuron is not supported yet: `python -m compile.build --backend neuron` compiles "
    "them, but each traced module owns its aliased state and the prefill and step graphs must share one "
    "KV cache (next step: neuronx-distributed's ModelBuilder); use --backend eager or xla to generate"
)


def require_sdk():
    """The torch_neuronx module, or BackendUnavailableError saying what to install."""
    try:
        import torch_neuronx
    except ImportError:
        raise BackendUnavailableError(INSTALL_HINT) from None
    return torch_neuronx


class NeuronBackend:
    name = "neuron"

    def __init__(self) -> None:
        require_sdk()
        raise BackendUnavailableError(NOT_WIRED)


class StateOutputs(nn.Module):
    """A graph whose outputs are followed by its state buffers, read after its in-place updates.

    `torch_neuronx.trace` keeps a tensor on the device only as an aliased pair: the state tensor
    (a module buffer, not a graph input) and the output that carries its new value.
    """

    def __init__(self, graph: nn.Module, state_names: tuple[str, ...]) -> None:
        super().__init__()
        self.graph, self.state_names = graph, state_names

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        outputs = self.graph(*inputs)
        return (*outputs, *(self.graph.get_buffer(name) for name in self.state_names))


def compile_graph(name: str, graph: nn.Module, example_inputs: tuple[Tensor, ...], state_names: tuple[str, ...],
                  compiler_args: tuple[str, ...], workdir: Path, out_dir: Path) -> list[Path]:
    """Trace and compile one graph (module on the CPU); returns the files written to `out_dir`:
    the traced module `<name>.pt` and the NEFF neuronx-cc produced, `<name>.neff`."""
    torch_neuronx = require_sdk()
    num_outputs = len(graph.Outputs._fields)
    aliases = {graph.get_buffer(state): num_outputs + i for i, state in enumerate(state_names)}
    traced = torch_neuronx.trace(StateOutputs(graph, state_names), tuple(example_inputs),
                                 input_output_aliases=aliases, compiler_workdir=str(workdir),
                                 compiler_args=list(compiler_args), inline_weights_to_neff=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    module_path = out_dir / f"{name}.pt"
    torch.jit.save(traced, str(module_path))
    files = [module_path]
    neffs = sorted(workdir.rglob("*.neff"))  # neuronx-cc writes one per traced graph
    if neffs:
        files.append(out_dir / f"{name}.neff")
        shutil.copyfile(neffs[-1], files[-1])
    return files
