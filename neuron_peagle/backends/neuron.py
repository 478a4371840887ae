"""torch-neuronx on a trn1/trn2 instance. Compiled artifacts come with the compile/ entry point;
until then this backend only says what it needs."""

from __future__ import annotations

from neuron_peagle.errors import BackendUnavailableError

INSTALL_HINT = (
    "the neuron backend needs the Neuron SDK (torch-neuronx 2.9, neuronx-cc) on a trn1/trn2 instance, "
    "installed from the Neuron SDK's own pip repository; on other machines use --backend eager or xla"
)


class NeuronBackend:
    name = "neuron"

    def __init__(self) -> None:
        try:
            import torch_neuronx  # noqa: F401
        except ImportError:
            raise BackendUnavailableError(INSTALL_HINT) from None
        raise BackendUnavailableError(
            "running graphs on Neuron goes through compiled artifacts (`python -m compile.build "
            "--backend neuron`), which this version does not build yet"
        )
