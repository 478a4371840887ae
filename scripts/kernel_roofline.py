"""On paper: HBM bytes, FLOPs and lower-bound times of the draft-pass kernels, fused and unfused.

    python -m scripts.kernel_roofline [--num-speculative-tokens 7] [--batch-size 1]

Prints the markdown kept in BENCHMARKS.md ("NKI kernels on paper"). Shapes come from the shipped
drafter's config (the default model) and from Llama-3.1-8B's public config; bf16 weights and
activations. A lower bound is max(bytes / HBM bandwidth, FLOPs / bf16 matmul peak) on one NeuronCore.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

BF16 = 2
FP32 = 4
INT32 = 4


@dataclass(frozen=True)
class ModelShape:
    name: str
    target_hidden: int  # H_t: the features are 3 H_t wide
    hidden: int  # the drafter's H
    vocab: int
    draft_vocab: int


def default_model() -> ModelShape:
    from neuron_peagle.models.drafter_io import read_drafter_config
    from neuron_peagle.runtime.drafter_choice import DEFAULT_DRAFTER_DIR

    c = read_drafter_config(DEFAULT_DRAFTER_DIR)
    return ModelShape("SmolLM2-135M + shipped drafter", c.target_hidden_size, c.hidden_size, c.vocab_size,
                      c.draft_vocab_size)


# Llama-3.1-8B's config.json: hidden_size 4096, vocab_size 128256; a 32000-token draft vocabulary
# as EAGLE-3 drafters for Llama 3 use.
LLAMA_8B = ModelShape("Llama-3.1-8B", 4096, 4096, 128256, 32000)


@dataclass(frozen=True)
class Core:
    name: str
    hbm_bytes_per_s: float
    bf16_flops_per_s: float


# Per physical NeuronCore, the chip's figures split evenly over its cores (AWS Neuron docs):
# trn1: a Trainium chip has 2 NeuronCore-v2, 190 BF16 TFLOPS and 820 GB/s of HBM bandwidth.
# trn2: a Trainium2 chip has 8 NeuronCore-v3 at 79 BF16 TFLOPS each, and 2.9 TB/s of HBM bandwidth.
CORES = (Core("trn1", 820e9 / 2, 190e12 / 2), Core("trn2", 2.9e12 / 8, 79e12))


@dataclass(frozen=True)
class Traffic:
    kernel: str
    rows: int
    fused_bytes: int
    unfused_bytes: int
    flops: int  # matmul FLOPs (the norms and the argmax add a few per element, negligible here)
    unfused_extra: str
    recomputed_bytes: int = 0  # what the graph before the kernels also read: fc(mask_hidden) every step


def draft_input_traffic(m: ModelShape, slots: int) -> Traffic:
    """Kernel 1 over the 2K slots of a P-EAGLE pass."""
    h, f = m.hidden, 3 * m.target_hidden
    weights = f * h * BF16
    inputs = slots * f * BF16 + slots * h * BF16 + slots * FP32  # features, embeddings, mask flags
    broadcasts = 4 * slots * h * BF16  # fc(mask_hidden), mask embedding, two norm weights, one row per slot
    outputs = slots * 3 * h * BF16  # x [slots, 2H] and the residual [slots, H]
    fused = weights + inputs + broadcasts + outputs
    # Unfused, each [slots, H] intermediate is written once and read once: fc out, the two mask-
    # substituted tensors, the two normed ones; and each RMSNorm's float32 x and normalised x.
    intermediates = 5 * 2 * slots * h * BF16 + 2 * 2 * 2 * slots * h * FP32
    mask_row = weights + f * BF16 + 2 * h * BF16  # fc weight and mask_hidden read, the row written and read
    return Traffic("draft input (fc + 2 norms + concat)", slots, fused, fused + intermediates, 2 * slots * f * h,
                   "fc out, substituted and normed tensors, float32 norm temporaries", mask_row)


def lm_head_traffic(kind: str, hidden: int, vocab: int, rows: int, mapped: bool) -> Traffic:
    """Kernel 2: rows x [hidden, vocab] and an argmax per row."""
    fused = hidden * vocab * BF16 + rows * hidden * BF16 + rows * (INT32 + FP32) + (rows * INT32 if mapped else 0)
    logits = 2 * rows * vocab * FP32  # written by the matmul, read back by the argmax
    return Traffic(kind, rows, fused, fused + logits, 2 * rows * hidden * vocab,
                   "logits [rows, vocab] fp32 out and back")


def traffic(m: ModelShape, k: int, batch: int) -> list[Traffic]:
    return [
        draft_input_traffic(m, batch * 2 * k),
        lm_head_traffic("LM head + argmax, drafts", m.hidden, m.draft_vocab, batch * k, m.draft_vocab < m.vocab),
        lm_head_traffic("LM head + argmax, verify", m.target_hidden, m.vocab, batch * (k + 1), False),
    ]


def lower_bound_us(nbytes: int, flops: int, core: Core) -> float:
    return 1e6 * max(nbytes / core.hbm_bytes_per_s, flops / core.bf16_flops_per_s)


def markdown(models: list[ModelShape], k: int, batch: int) -> str:
    cores = " | ".join(f"{c.name} fused us | {c.name} unfused us" for c in CORES)
    lines = [f"K={k}, batch {batch}, bf16. Bytes are HBM traffic; times are per NeuronCore lower bounds.", "",
             f"| model | kernel | rows | fused MB | unfused MB | GFLOP | {cores} | the unfused graph also moves "
             f"| before: fc(mask_hidden) per step, +MB |",
             "|" + "---|" * (8 + 2 * len(CORES))]
    for m in models:
        for t in traffic(m, k, batch):
            times = " | ".join(f"{lower_bound_us(t.fused_bytes, t.flops, c):.1f} | "
                               f"{lower_bound_us(t.unfused_bytes, t.flops, c):.1f}" for c in CORES)
            lines.append(f"| {m.name} | {t.kernel} | {t.rows} | {t.fused_bytes / 1e6:.3f} | "
                         f"{t.unfused_bytes / 1e6:.3f} | {t.flops / 1e9:.3f} | {times} | {t.unfused_extra} | "
                         f"{t.recomputed_bytes / 1e6:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-speculative-tokens", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    print(markdown([default_model(), LLAMA_8B], args.num_speculative_tokens, args.batch_size))


if __name__ == "__main__":
    main()
