"""NKI kernels for the fused draft pass, each next to the plain PyTorch function it replaces.

- `draft_input`: drafter layer 0's [slots, 2H] input (fc over the target features or fc(mask_hidden),
  token or mask embedding, both RMSNorms, the concat) and its residual (`first_layer_input.py`).
- `lm_head_argmax`: LM head + greedy argmax (+ the draft-to-target vocabulary map) without writing
  the [rows, vocab] logits to HBM (`lm_head.py`).

How a graph reaches a kernel depends on where its tensors live:
- CPU (eager, inductor): through two PyTorch custom ops, `neuron_peagle::draft_input` and
  `neuron_peagle::lm_head_argmax` (`ops.py`), whose implementation is the PyTorch reference: a graph
  compiled with `torch.compile(fullgraph=True, dynamic=False)` holds each as one node instead of the
  operations inside (what the kernels replace is visible in every CPU graph).
- TorchNeuron's "neuron" device (trn2/trn3) and XLA tensors (trn1): inline. In "nki" mode the
  `nki.jit` kernel is called directly inside the compiled region, TorchNeuron's documented route (the
  call becomes one `nki_kernel_wrapper` node, lowered to the kernel's custom call in the NEFF; on XLA a
  custom call of the HLO); in "reference" mode the plain PyTorch code runs inline, no custom op at all
  (TorchNeuron's lowering knows no `neuron_peagle::` op, and with fallback execution off, its default,
  such a node would fail the compile).

Which implementation runs is the kernel mode, one of `KERNEL_MODES`:
- "reference": the plain PyTorch functions; the default off NeuronCores.
- "nki": the kernels under `nki.jit` (needs the Neuron SDK's `nki`), launched at the build's logical
  NeuronCore degree (`BuildConfig.lnc`, neuron_peagle/lnc.py), on neuron or XLA tensors only.
- "interpreter": the same kernel source on the CPU interpreter (`interpreter.py`), on CPU tensors in
  eager graphs, inline: slow, for tests, which so check the kernels inside the real speculative step
  (at LNC 1 or 2: each physical core's share of the rows).
The mode is one switch, `BuildConfig.kernels` ("auto": "nki" on the neuron backends, else "reference"),
so the compile manifest records it with the other build settings (and `lnc`); the graphs that use
kernels keep both (`DrafterProposer.kernels` / `.lnc`, `SpecStepGraph.kernels` / `.lnc`).
"""

from __future__ import annotations

from torch import Tensor

from neuron_peagle.capabilities import KERNEL_MODES
from neuron_peagle.errors import BackendUnavailableError, ConfigError
from neuron_peagle.kernels import ops
from neuron_peagle.kernels.first_layer_input import DraftInputParams, draft_input_reference
from neuron_peagle.kernels.launch import draft_input_call, lm_head_argmax_call, run_draft_input, run_lm_head_argmax
from neuron_peagle.kernels.lm_head import lm_head_argmax_reference
from neuron_peagle.kernels.nki_api import HAVE_NKI

INLINE_DEVICES = ("neuron", "xla")  # TorchNeuron's device, torch-xla's: kernels inline, never a custom op
NKI_MISSING = ("kernels='nki' needs the Neuron SDK's nki package (on a trn instance); elsewhere use "
               "'reference', or 'interpreter' to run the kernel source on CPU")

__all__ = ["KERNEL_MODES", "DraftInputParams", "check_kernel_mode", "draft_input", "draft_input_call",
           "lm_head_argmax", "lm_head_argmax_call"]


def check_kernel_mode(mode: str) -> str:
    """The mode, validated; "nki" needs the Neuron SDK's `nki` (checked before a graph is built)."""
    if mode not in KERNEL_MODES:
        raise ConfigError(f"kernels must be one of {KERNEL_MODES}, got {mode!r}")
    if mode == "nki" and not HAVE_NKI:
        raise BackendUnavailableError(NKI_MISSING)
    return mode


def draft_input(embeds: Tensor, features: Tensor, is_mask: Tensor, params: DraftInputParams,
                mode: str = "reference", lnc: int = 1) -> tuple[Tensor, Tensor]:
    # embeds [..., H] token embeddings; features [..., 3H_t]; is_mask [...] bool
    # -> x [..., 2H] (drafter layer 0's input), residual [..., H]
    if mode == "interpreter" or embeds.device.type in INLINE_DEVICES:
        if mode == "reference":
            return draft_input_reference(embeds, features, is_mask, params)
        return run_draft_input(mode, embeds, features, is_mask, params, lnc)
    _check_op_mode(mode, embeds)
    return ops.draft_input(embeds, features, is_mask, *ops.draft_input_args(params))


def lm_head_argmax(hidden: Tensor, weight: Tensor, d2t: Tensor | None = None, mode: str = "reference",
                   lnc: int = 1) -> tuple[Tensor, Tensor]:
    # hidden [..., H] final-normed rows; weight [vocab, H] (nn.Linear's); d2t [vocab] int64 or None
    # -> token ids [...] int64 (mapped through d2t), their logits [...] float32
    if mode == "interpreter" or hidden.device.type in INLINE_DEVICES:
        if mode == "reference":
            return lm_head_argmax_reference(hidden, weight, d2t)
        return run_lm_head_argmax(mode, hidden, weight, d2t, lnc)
    _check_op_mode(mode, hidden)
    return ops.lm_head_argmax(hidden, weight, d2t)


def _check_op_mode(mode: str, t: Tensor) -> None:
    """The ops (CPU, and other devices without kernels) serve "reference" only."""
    if mode == "reference":
        return
    if mode != "nki":
        raise ConfigError(f"kernels must be one of {KERNEL_MODES}, got {mode!r}")
    raise BackendUnavailableError(
        f"kernels='nki' runs on Neuron tensors (TorchNeuron's {INLINE_DEVICES[0]!r} device, or XLA on trn1), got a "
        f"tensor on {t.device}; use 'reference' or 'interpreter' there")
