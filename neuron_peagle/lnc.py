"""Logical NeuronCores (LNC): how many physical NeuronCores one rank's graphs and kernels run on.

trn2 and trn3 default to LNC=2 (two physical cores as one logical core: 4 per trn2 chip), trn1 has
LNC=1 only. The degree is a property of a whole compiled graph: the Neuron compiler's `--lnc` and every
NKI kernel inside the graph must agree, or the compiler rejects the kernel (NCC_EVRF066), and the
runtime (`NEURON_LOGICAL_NC_CONFIG`) must match what was compiled. So the degree is chosen once per build
(`BuildConfig.lnc`), recorded in the manifest, passed to the compiler where we call it (nxd), and each
kernel launch uses it (`kernel[lnc]`, neuron_peagle/kernels/launch.py).
"""

from __future__ import annotations

import os

from neuron_peagle.errors import ConfigError

LNC_ENV = "NEURON_LOGICAL_NC_CONFIG"  # the Neuron runtime's setting (and TorchNeuron's compile's)
LNC_DEGREES = (1, 2)
DEFAULT_LNC = {"trn1": 1, "trn2": 2, "trn3": 2}  # the runtime's and compiler's defaults per instance family


def check_lnc(value: object, where: str = "lnc") -> int:
    if isinstance(value, bool) or value not in LNC_DEGREES:
        raise ConfigError(f"{where} must be one of {LNC_DEGREES} (physical NeuronCores per logical core), got {value!r}")
    return int(value)


def environment_lnc() -> int | None:
    """NEURON_LOGICAL_NC_CONFIG, checked, or None where it is not set."""
    value = os.environ.get(LNC_ENV)
    if value is None or value == "":
        return None
    try:
        return check_lnc(int(value), LNC_ENV)
    except ValueError:
        raise ConfigError(f"{LNC_ENV} must be one of {LNC_DEGREES}, got {value!r}") from None


def runtime_lnc() -> int:
    """The LNC the Neuron runtime of this process uses: NEURON_LOGICAL_NC_CONFIG, else what TorchNeuron
    reports (`torch_neuronx.utils.get_logical_neuron_cores`), else trn2's default (2)."""
    env = environment_lnc()
    if env is not None:
        return env
    try:
        from torch_neuronx.utils import get_logical_neuron_cores
    except ImportError:
        return DEFAULT_LNC["trn2"]
    return check_lnc(int(get_logical_neuron_cores()), "TorchNeuron's logical NeuronCore config")
