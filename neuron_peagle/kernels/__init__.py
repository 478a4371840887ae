"""NKI kernels for the fused draft pass, each next to the plain PyTorch function it replaces.

- `draft_input`: drafter layer 0's [slots, 2H] input (fc over the target features or fc(mask_hidden),
  token or mask embedding, both RMSNorms, the concat) and its residual (`first_layer_input.py`).
- `lm_head_argmax`: LM head + greedy argmax (+ the draft-to-target vocabulary map) without writing
  the [rows, vocab] logits to HBM (`lm_head.py`).

Graphs reach the kernels through two PyTorch custom ops, `neuron_peagle::draft_input` and
`neuron_peagle::lm_head_argmax` (`ops.py`): a graph compiled with `torch.compile(fullgraph=True,
dynamic=False)` (inductor on CPU, TorchNeuron's neuron backend on trn2) holds each as one node instead
of the operations inside, and the device decides what the node runs: the PyTorch reference on CPU,
the NKI kernel on TorchNeuron's "neuron" device. On XLA tensors (trn1's torch-xla stack) the two
functions below run inline instead, as ops.py explains.

Which implementation runs is the kernel mode, one of `KERNEL_MODES`:
- "reference": the plain PyTorch functions, through the ops (inline on XLA tensors); the default
  everywhere, and what eager, inductor and xla run.
- "nki": the kernels under `nki.jit` (needs the Neuron SDK's `nki`): on TorchNeuron's device through
  the ops, whose neuron implementation `check_kernel_mode("nki")` registers; on XLA tensors inside a
  traced graph, called inline, where they become custom calls in the same NEFF (the nxd backend).
- "interpreter": the same kernel source on the CPU interpreter (`interpreter.py`), on CPU tensors in
  eager graphs, inline: slow, for tests, which so check the kernels inside the real speculative step.
The mode is one switch, `BuildConfig.kernels` ("auto": "nki" on the neuron backends, else "reference"),
so the compile manifest records it with the other build settings; the graphs that use kernels keep it as
their `kernels` attribute (`DrafterProposer.kernels`, `SpecStepGraph.kernels`).
"""

from __future__ import annotations

from torch import Tensor

from neuron_peagle.config import KERNEL_MODES
from neuron_peagle.errors import BackendUnavailableError, ConfigError
from neuron_peagle.kernels import ops
from neuron_peagle.kernels.first_layer_input import DraftInputParams, draft_input_reference
from neuron_peagle.kernels.launch import draft_input_call, lm_head_argmax_call, run_draft_input, run_lm_head_argmax
from neuron_peagle.kernels.lm_head import lm_head_argmax_reference

__all__ = ["KERNEL_MODES", "DraftInputParams", "check_kernel_mode", "draft_input", "draft_input_call",
           "lm_head_argmax", "lm_head_argmax_call"]


def check_kernel_mode(mode: str) -> str:
    """The mode, validated; for "nki", with the ops' neuron implementations registered (see ops.py),
    which needs to happen before a graph that calls them is compiled."""
    if mode not in KERNEL_MODES:
        raise ConfigError(f"kernels must be one of {KERNEL_MODES}, got {mode!r}")
    if mode == "nki":
        ops.register_nki_implementations()
    return mode


def draft_input(embeds: Tensor, features: Tensor, is_mask: Tensor, params: DraftInputParams,
                mode: str = "reference") -> tuple[Tensor, Tensor]:
    # embeds [..., H] token embeddings; features [..., 3H_t]; is_mask [...] bool
    # -> x [..., 2H] (drafter layer 0's input), residual [..., H]
    if mode == "interpreter" or _on_xla(embeds):
        if mode == "reference":
            return draft_input_reference(embeds, features, is_mask, params)
        return run_draft_input(mode, embeds, features, is_mask, params)
    _check_op_mode(mode, embeds)
    return ops.draft_input(embeds, features, is_mask, *ops.draft_input_args(params))


def lm_head_argmax(hidden: Tensor, weight: Tensor, d2t: Tensor | None = None, mode: str = "reference"
                   ) -> tuple[Tensor, Tensor]:
    # hidden [..., H] final-normed rows; weight [vocab, H] (nn.Linear's); d2t [vocab] int64 or None
    # -> token ids [...] int64 (mapped through d2t), their logits [...] float32
    if mode == "interpreter" or _on_xla(hidden):
        if mode == "reference":
            return lm_head_argmax_reference(hidden, weight, d2t)
        return run_lm_head_argmax(mode, hidden, weight, d2t)
    _check_op_mode(mode, hidden)
    return ops.lm_head_argmax(hidden, weight, d2t)


def _on_xla(t: Tensor) -> bool:
    return t.device.type == "xla"


def _check_op_mode(mode: str, t: Tensor) -> None:
    """The mode is one the ops serve; in "nki" mode they must find their NKI implementation: on the
    neuron device, registered."""
    if mode == "reference":
        return
    if mode != "nki":
        raise ConfigError(f"kernels must be one of {KERNEL_MODES}, got {mode!r}")
    if t.device.type != ops.NEURON_DEVICE:
        raise BackendUnavailableError(
            f"kernels='nki' runs on Neuron tensors (TorchNeuron's {ops.NEURON_DEVICE!r} device, or XLA on "
            f"trn1), got a tensor on {t.device}; use 'reference' or 'interpreter' there")
    ops.register_nki_implementations()
