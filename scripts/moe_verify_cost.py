"""On paper: HBM bytes, FLOPs and bandwidth-bound tokens/s of a P-EAGLE verify pass on two MoE targets.

    python -m scripts.moe_verify_cost [--context 2048] [--bandwidth-tbps 1.45] [--fixed-ms 0]
                                      [--peak-tflops 316] [--max-k 10] [--markdown]

A verify pass runs the last committed token and num_speculative_tokens (K) drafts, K+1 tokens, through
the target at batch 1; K=0 is a plain decode step. Nothing here is measured. Bytes and FLOPs are counted
from the model shapes in scripts/moe_published.py; a step's time is bytes / HBM bandwidth plus a fixed per-step overhead;
tokens per step come from published acceptance lengths (see ACCEPTANCE). Prints the tables behind
BENCHMARKS.md's "MoE targets on paper" section. Standard library only: it runs offline.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from scripts.moe_published import (ACCEPTANCE, GPT_OSS_20B, GPT_OSS_ACCEPTANCE, QWEN3_CODER_30B_A3B, TARGETS,
                                   TRN2_EXAMPLE, MoeShape, PublishedAcceptance, Trn2Example)

BF16_BYTES = 2.0
# MXFP4 (OCP microscaling): a 4-bit E2M1 element per parameter plus one 8-bit E8M0 scale per block of 32.
MXFP4_BYTES = (4 + 8 / 32) / 8
KV_BYTES = BF16_BYTES  # the KV cache stays bf16 whatever the weights are


@dataclass(frozen=True)
class WeightFormat:
    """Bytes per parameter of the expert matrices and of every other weight."""

    name: str
    expert_matrix_bytes: float
    other_bytes: float


BF16 = WeightFormat("bf16", BF16_BYTES, BF16_BYTES)
MXFP4_EXPERTS = WeightFormat("MXFP4 experts", MXFP4_BYTES, BF16_BYTES)


# ---- parameter counts, per decoder layer unless the name says otherwise ----

def q_width(s: MoeShape) -> int:
    return s.num_q_heads * s.head_dim


def kv_width(s: MoeShape) -> int:
    return s.num_kv_heads * s.head_dim


def attention_matmul_params(s: MoeShape) -> int:
    """q, k, v and o projection matrices."""
    return s.hidden * (q_width(s) + 2 * kv_width(s)) + q_width(s) * s.hidden


def attention_small_params(s: MoeShape) -> int:
    """Biases, sinks and q/k norms: read every step, no matmul FLOPs worth counting."""
    biases = q_width(s) + 2 * kv_width(s) + s.hidden if s.attention_bias else 0
    sinks = s.num_q_heads if s.attention_sinks else 0
    norms = 2 * s.head_dim if s.qk_norm else 0
    return biases + sinks + norms


def router_params(s: MoeShape) -> int:
    return s.num_experts * s.hidden + (s.num_experts if s.router_bias else 0)


def expert_matrix_params(s: MoeShape) -> int:
    """One expert's gate, up and down matrices."""
    return 3 * s.hidden * s.expert_intermediate


def expert_bias_params(s: MoeShape) -> int:
    return 2 * s.expert_intermediate + s.hidden if s.expert_bias else 0


def norm_params(s: MoeShape) -> int:
    """The two RMSNorm weights of a layer."""
    return 2 * s.hidden


def dense_layer_params(s: MoeShape) -> int:
    """Everything of a layer read in full every step: attention, router, norms."""
    return attention_matmul_params(s) + attention_small_params(s) + router_params(s) + norm_params(s)


def embedding_params(s: MoeShape) -> int:
    return s.vocab * s.hidden  # the embedding table and the (untied) LM head have this size each


def total_params(s: MoeShape) -> int:
    per_layer = dense_layer_params(s) + s.num_experts * (expert_matrix_params(s) + expert_bias_params(s))
    return s.num_layers * per_layer + 2 * embedding_params(s) + s.hidden  # + the final norm


def active_params(s: MoeShape, with_embedding_table: bool) -> int:
    """Parameters one token touches (the embedding table counted whole or not: model cards differ)."""
    per_layer = dense_layer_params(s) + s.experts_per_token * (expert_matrix_params(s) + expert_bias_params(s))
    table = embedding_params(s) if with_embedding_table else 0
    return s.num_layers * per_layer + embedding_params(s) + s.hidden + table


# ---- experts touched by a verify pass ----

def expected_distinct_experts(s: MoeShape, num_tokens: int) -> float:
    """E * (1 - (1 - k/E)^n): distinct experts per layer when n tokens each pick k of E uniformly and
    independently. Real routing is correlated across neighbouring tokens, so this is an upper-ish estimate."""
    miss = 1.0 - s.experts_per_token / s.num_experts
    return s.num_experts * (1.0 - miss ** num_tokens)


def worst_case_distinct_experts(s: MoeShape, num_tokens: int) -> int:
    """Every token picks experts no earlier token picked."""
    return min(s.num_experts, s.experts_per_token * num_tokens)


# ---- bytes and FLOPs of one verify pass ----

def kv_entries_read(s: MoeShape, context: int, k: int) -> tuple[int, int]:
    """Cache entries a full-attention layer and a sliding-window layer read for K+1 queries at positions
    context..context+K: the whole context (plus the K+1 new entries), and at most window + K entries."""
    full = context + k + 1
    sliding = min(full, s.sliding_window + k) if s.num_sliding_layers else 0
    return full, sliding


def kv_cache_bytes(s: MoeShape, context: int, k: int) -> float:
    full, sliding = kv_entries_read(s, context, k)
    entry = 2 * kv_width(s) * KV_BYTES  # K and V of one position in one layer
    num_full = s.num_layers - s.num_sliding_layers
    return entry * (num_full * full + s.num_sliding_layers * sliding)


@dataclass(frozen=True)
class VerifyTraffic:
    """HBM bytes of one verify pass, by what is read."""

    attention: float  # q/k/v/o weights, biases, sinks, q/k norms
    router: float
    experts: float  # the distinct experts touched, matrices and biases
    norms: float  # per-layer and final RMSNorm weights
    embedding: float  # the K+1 embedding rows
    lm_head: float
    kv_cache: float

    @property
    def total(self) -> float:
        return (self.attention + self.router + self.experts + self.norms + self.embedding + self.lm_head
                + self.kv_cache)


def verify_traffic(s: MoeShape, fmt: WeightFormat, context: int, k: int, distinct_experts: float) -> VerifyTraffic:
    """Each weight is read once per pass (one sequence, K+1 rows), each distinct expert once per layer."""
    w = fmt.other_bytes
    per_expert = expert_matrix_params(s) * fmt.expert_matrix_bytes + expert_bias_params(s) * w
    return VerifyTraffic(
        attention=s.num_layers * (attention_matmul_params(s) + attention_small_params(s)) * w,
        router=s.num_layers * router_params(s) * w,
        experts=s.num_layers * distinct_experts * per_expert,
        norms=(s.num_layers * norm_params(s) + s.hidden) * w,
        embedding=(k + 1) * s.hidden * w,
        lm_head=embedding_params(s) * w,
        kv_cache=kv_cache_bytes(s, context, k),
    )


def keys_attended(s: MoeShape, context: int, position: int, sliding: bool) -> int:
    keys = context + position + 1
    return min(keys, s.sliding_window) if sliding else keys


def verify_flops(s: MoeShape, context: int, k: int) -> float:
    """Matmul FLOPs of K+1 tokens: projections, router, each token's own top-k experts, LM head at every
    position (verify needs all K+1 argmaxes), and attention scores and values (4 * q heads * head_dim per key).
    Biases, norms, softmax and the SwiGLU are a few FLOPs per element and are left out."""
    per_layer = attention_matmul_params(s) + s.num_experts * s.hidden + s.experts_per_token * expert_matrix_params(s)
    linear = 2.0 * (s.num_layers * per_layer + embedding_params(s))
    num_full = s.num_layers - s.num_sliding_layers
    attention = 0.0
    for position in range(k + 1):
        keys = (num_full * keys_attended(s, context, position, False)
                + s.num_sliding_layers * keys_attended(s, context, position, True))
        attention += 4.0 * q_width(s) * keys
    return (k + 1) * linear + attention


# ---- acceptance: expected tokens committed per step ----



def geometric_sum(rate: float, n: int) -> float:
    return sum(rate ** i for i in range(1, n + 1))


def solve_rate(target: float, n: int) -> float:
    """The rate r in [0, 1] with r + r^2 + ... + r^n = target (bisection; the sum rises with r)."""
    if not 0.0 <= target <= n:
        raise ValueError(f"no rate gives a sum of {target} over {n} terms")
    low, high = 0.0, 1.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if geometric_sum(mid, n) < target else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class AcceptanceCurve:
    """P(drafts 1..i all accepted) = inner^i up to k_short, then inner^k_short * outer^(i - k_short).

    P-EAGLE's drafter attends causally, so draft i is the same whatever K is: AL(K) = 1 + sum_i P(1..i
    accepted) with one sequence of probabilities for every K. Two constant conditional rates, one fitted to
    each published point, reproduce both points exactly; K beyond k_long extrapolates with `outer`."""

    label: str
    k_short: int
    inner: float
    outer: float

    def reach(self, i: int) -> float:
        if i <= self.k_short:
            return self.inner ** i
        return self.inner ** self.k_short * self.outer ** (i - self.k_short)

    def expected_tokens(self, k: int) -> float:
        """Expected tokens committed by a step with K drafts (the acceptance length)."""
        return 1.0 + sum(self.reach(i) for i in range(1, k + 1))


def fit_curve(p: PublishedAcceptance) -> AcceptanceCurve:
    inner = solve_rate(p.al_short - 1.0, p.k_short)
    reach_short = inner ** p.k_short
    outer = solve_rate((p.al_long - p.al_short) / reach_short, p.k_long - p.k_short)
    return AcceptanceCurve(p.label, p.k_short, inner, outer)


# ---- time ----

@dataclass(frozen=True)
class Hardware:
    """HBM bandwidth and bf16 peak of the cores one deployment uses, and a fixed per-step overhead."""

    bandwidth_bytes_per_s: float
    peak_flops_per_s: float
    fixed_s: float


def step_seconds(nbytes: float, hw: Hardware) -> float:
    return nbytes / hw.bandwidth_bytes_per_s + hw.fixed_s


@dataclass(frozen=True)
class Variant:
    """A target with a weight format."""

    shape: MoeShape
    fmt: WeightFormat

    @property
    def label(self) -> str:
        return f"{self.shape.name} {self.fmt.name}"


GPT_OSS_BF16 = Variant(GPT_OSS_20B, BF16)  # the trn2 example's weights: experts dequantized to bf16
GPT_OSS_MXFP4 = Variant(GPT_OSS_20B, MXFP4_EXPERTS)  # the checkpoint's own format
QWEN_BF16 = Variant(QWEN3_CODER_30B_A3B, BF16)
VARIANTS = (GPT_OSS_BF16, GPT_OSS_MXFP4, QWEN_BF16)


def verify_bytes(v: Variant, context: int, k: int, worst_case: bool = False) -> float:
    n = k + 1
    distinct = worst_case_distinct_experts(v.shape, n) if worst_case else expected_distinct_experts(v.shape, n)
    return verify_traffic(v.shape, v.fmt, context, k, distinct).total


def tokens_per_s(v: Variant, curve: AcceptanceCurve, context: int, k: int, hw: Hardware,
                 worst_case: bool = False) -> float:
    return curve.expected_tokens(k) / step_seconds(verify_bytes(v, context, k, worst_case), hw)


def best_k(v: Variant, curve: AcceptanceCurve, context: int, max_k: int, hw: Hardware,
           worst_case: bool = False) -> int:
    return max(range(max_k + 1), key=lambda k: tokens_per_s(v, curve, context, k, hw, worst_case))


# ---- rendering ----

def render(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(c) for c in col) for col in zip(headers, *rows)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers)] + [fmt.format(*r) for r in rows])


def shapes_table(markdown: bool) -> str:
    headers = ["target", "layers (sliding)", "hidden", "q/kv heads x dim", "experts (top-k)", "expert inter",
               "vocab", "MB per expert bf16 / MXFP4", "params total / active (computed)", "model card"]
    rows = []
    for s in TARGETS:
        expert_bf16 = (expert_matrix_params(s) + expert_bias_params(s)) * BF16_BYTES
        expert_mx = expert_matrix_params(s) * MXFP4_BYTES + expert_bias_params(s) * BF16_BYTES
        active = f"{active_params(s, False) / 1e9:.2f}B ({active_params(s, True) / 1e9:.2f}B with the embedding table)"
        rows.append([s.name, f"{s.num_layers} ({s.num_sliding_layers}, window {s.sliding_window})"
                     if s.num_sliding_layers else f"{s.num_layers} (0)", str(s.hidden),
                     f"{s.num_q_heads}/{s.num_kv_heads} x {s.head_dim}",
                     f"{s.num_experts} ({s.experts_per_token})", str(s.expert_intermediate), str(s.vocab),
                     f"{expert_bf16 / 1e6:.1f} / {expert_mx / 1e6:.1f}", f"{total_params(s) / 1e9:.2f}B / {active}",
                     s.headline])
    return render(headers, rows, markdown)


def verify_table(context: int, max_k: int, hw: Hardware, markdown: bool) -> str:
    """Bytes, FLOPs and predicted tokens/s of a verify pass against K, both targets (HumanEval fits)."""
    headers = ["K", "gpt-oss E[experts]/layer (worst)", "GB bf16 (worst)", "GB MXFP4 experts (worst)", "GFLOP",
               "E[tokens]", "tok/s bf16", "tok/s MXFP4", "Qwen E[experts]/layer (worst)", "GB bf16 (worst)",
               "GFLOP", "E[tokens]", "tok/s bf16"]
    targets = ((GPT_OSS_20B, (GPT_OSS_BF16, GPT_OSS_MXFP4)), (QWEN3_CODER_30B_A3B, (QWEN_BF16,)))
    rows = []
    for k in range(max_k + 1):
        n, row = k + 1, [str(k)]
        for s, variants in targets:
            curve = fit_curve(ACCEPTANCE[s.name][0])
            row.append(f"{expected_distinct_experts(s, n):.1f} ({worst_case_distinct_experts(s, n)})")
            row += [f"{verify_bytes(v, context, k) / 1e9:.2f} ({verify_bytes(v, context, k, True) / 1e9:.2f})"
                    for v in variants]
            row += [f"{verify_flops(s, context, k) / 1e9:.1f}", f"{curve.expected_tokens(k):.2f}"]
            row += [f"{tokens_per_s(v, curve, context, k, hw):.0f}" for v in variants]
        rows.append(row)
    return render(headers, rows, markdown)


def breakdown_lines(context: int, max_k: int, hw: Hardware) -> str:
    """Where the bytes go at K=0 and at the largest K, and how far the FLOPs are from mattering."""
    lines = []
    for v in (GPT_OSS_BF16, QWEN_BF16):
        t0, t1 = (verify_traffic(v.shape, v.fmt, context, k, expected_distinct_experts(v.shape, k + 1))
                  for k in (0, max_k))
        f0, f1 = (1e3 * verify_flops(v.shape, context, k) / hw.peak_flops_per_s for k in (0, max_k))
        hbm0, hbm1 = (1e3 * t.total / hw.bandwidth_bytes_per_s for t in (t0, t1))
        lines.append(f"- {v.label}: experts are {t0.experts / t0.total:.0%} of the bytes at K=0 and "
                     f"{t1.experts / t1.total:.0%} at K={max_k} (KV cache {t0.kv_cache / t0.total:.1%} and "
                     f"{t1.kv_cache / t1.total:.1%}); the FLOPs at peak take {f0:.2f} and {f1:.2f} ms against "
                     f"{hbm0:.1f} and {hbm1:.1f} ms of HBM time.")
    return "\n".join(lines)


def best_k_table(context: int, max_k: int, hw: Hardware, markdown: bool) -> str:
    """Best K per target and published acceptance: 'K: tokens/s (x plain) [best K if every token hit new
    experts]'."""
    labels = [p.label for p in GPT_OSS_ACCEPTANCE]
    headers = ["target", "plain tok/s"] + labels
    rows = []
    for v in VARIANTS:
        cells = {}
        for p in ACCEPTANCE[v.shape.name]:
            c = fit_curve(p)
            base = tokens_per_s(v, c, context, 0, hw)
            k = best_k(v, c, context, max_k, hw)
            cells[p.label] = (f"{k}: {tokens_per_s(v, c, context, k, hw):.0f} "
                              f"({tokens_per_s(v, c, context, k, hw) / base:.2f}x) "
                              f"[{best_k(v, c, context, max_k, hw, worst_case=True)}]")
        rows.append([v.label, f"{base:.0f}"] + [cells.get(label, "-") for label in labels])
    return render(headers, rows, markdown)


def fits_line(ex: Trn2Example) -> str:
    """The fitted conditional rates, and the trn2 fit against the example's other reported points."""
    fits = [f"{s.name} {p.label} {c.inner:.3f} / {c.outer:.3f}"
            for s in TARGETS for p in ACCEPTANCE[s.name] for c in (fit_curve(p),)]
    curve = fit_curve(ex.published())
    others = [(k, al) for k, al, _ in ex.sweep if k not in ex.compared]
    fitted = " / ".join(f"{curve.expected_tokens(k):.2f}" for k, _ in others)
    reported = " / ".join(f"{al:.2f}" for _, al in others)
    ks = "/".join(str(k) for k, _ in others)
    return (f"- Fitted rates (inner / outer): {'; '.join(fits)}.\n"
            f"- Fit check: the trn2 fit gives AL {fitted} at K={ks}; the example reports {reported}.")


def fixed_overhead_table(context: int, max_k: int, hw: Hardware, markdown: bool) -> str:
    """How the best K moves with the fixed per-step overhead (HumanEval fits)."""
    overheads_ms = (0.0, 5.0, 10.0, 20.0)
    headers = ["target"] + [f"best K (x plain) at +{ms:g} ms" for ms in overheads_ms]
    rows = []
    for v in VARIANTS:
        curve = fit_curve(ACCEPTANCE[v.shape.name][0])
        row = [v.label]
        for ms in overheads_ms:
            h = Hardware(hw.bandwidth_bytes_per_s, hw.peak_flops_per_s, ms / 1e3)
            k = best_k(v, curve, context, max_k, h)
            row.append(f"{k} ({tokens_per_s(v, curve, context, k, h) / tokens_per_s(v, curve, context, 0, h):.2f})")
        rows.append(row)
    return render(headers, rows, markdown)


def trn2_linear_table(ex: Trn2Example, markdown: bool) -> str:
    headers = ["K", "AL (reported)", "verify ms, 19 + 6.3 K", "AL / verify, tok/s", "19 + 6.3 (K+1) reading, tok/s",
               "reported tok/s", "reported ms/step", "step - verify, ms (drafting, host)"]
    rows = []
    for k in ex.compared:
        al, measured = ex.point(k)
        verify = ex.verify_ms(k)
        step = 1e3 * al / measured
        rows.append([str(k), f"{al:.2f}", f"{verify:.1f}", f"{1e3 * al / verify:.1f}",
                     f"{1e3 * al / ex.verify_ms_other_reading(k):.1f}", f"{measured:.1f}", f"{step:.1f}",
                     f"{step - verify:.1f}"])
    return render(headers, rows, markdown)


def trn2_slope_table(ex: Trn2Example, context: int, hw: Hardware, markdown: bool) -> str:
    """The example's fixed and per-token verify costs against the bandwidth bound of its bf16 weights."""
    v, s = GPT_OSS_BF16, GPT_OSS_20B
    ms_per_byte = 1e3 / hw.bandwidth_bytes_per_s
    k_short, k_long = ex.compared
    per_expert = (expert_matrix_params(s) + expert_bias_params(s)) * BF16_BYTES
    # A per-(token, expert) loop gathers each token's experts afresh: top-k experts per token per layer.
    rereads = s.num_layers * s.experts_per_token * per_expert
    slopes = [(f"new distinct experts, K {a}->{b}",
               (verify_bytes(v, context, b) - verify_bytes(v, context, a)) / (b - a))
              for a, b in ((0, 1), (k_short, k_long))]
    slopes.append((f"top-{s.experts_per_token} experts re-read for every token", rereads))
    flop_per_token = (verify_flops(s, context, k_long) - verify_flops(s, context, k_short)) / (k_long - k_short)
    headers = ["cost", "trn2 example (reported)", "bandwidth / peak bound (this model)"]
    plain = verify_bytes(v, context, 0)
    rows = [["one-token step (K=0)", f"{ex.fixed_ms:g} ms fixed; base decode {ex.base_tok_s:g} tok/s",
             f"{plain / 1e9:.2f} GB -> {plain * ms_per_byte:.1f} ms"]]
    rows += [[f"each extra candidate, {what}", f"{ex.per_token_ms:g} ms",
              f"{nbytes / 1e9:.2f} GB -> {nbytes * ms_per_byte:.2f} ms"] for what, nbytes in slopes]
    rows.append(["each extra candidate, FLOPs at peak", f"{ex.per_token_ms:g} ms",
                 f"{flop_per_token / 1e9:.1f} GFLOP -> {1e3 * flop_per_token / hw.peak_flops_per_s:.3f} ms"])
    return render(headers, rows, markdown)


def report(context: int, max_k: int, hw: Hardware, markdown: bool) -> str:
    ex = TRN2_EXAMPLE
    head = (f"context {context}, batch 1, K = 0..{max_k}; HBM {hw.bandwidth_bytes_per_s / 1e12:.3g} TB/s, "
            f"peak {hw.peak_flops_per_s / 1e12:.0f} TFLOPS, fixed {1e3 * hw.fixed_s:g} ms per step. On paper only.")
    sections = [
        (None, head),
        ("Shapes", shapes_table(markdown)),
        ("Per verify pass: bytes (expected distinct experts, worst case in brackets), FLOPs, E[tokens per step] "
         "(HumanEval fits), tokens/s = E[tokens] / (bytes / bandwidth + fixed)",
         verify_table(context, max_k, hw, markdown)),
        (None, breakdown_lines(context, max_k, hw)),
        ("Best K per published acceptance: K: tok/s (x plain) [best K with worst-case experts]",
         best_k_table(context, max_k, hw, markdown)),
        (None, fits_line(ex)),
        ("Best K against the fixed per-step overhead (HumanEval fits)",
         fixed_overhead_table(context, max_k, hw, markdown)),
        ("trn2 example: what its linear verify model implies", trn2_linear_table(ex, markdown)),
        ("trn2 example against the bandwidth bound of its bf16 weights", trn2_slope_table(ex, context, hw, markdown)),
    ]
    out = []
    for title, body in sections:
        if title:
            out.append(f"### {title}" if markdown else f"== {title}")
        out += [body, ""]
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048, help="tokens already in the KV cache")
    parser.add_argument("--bandwidth-tbps", type=float, default=1.45,
                        help="HBM TB/s of the cores used: 4 of a Trainium2 chip's 8 NeuronCores (2.9 TB/s / 2), "
                             "the trn2 example's TP=4 at LNC=1; 2.9 for a whole chip")
    parser.add_argument("--peak-tflops", type=float, default=4 * 79.0,
                        help="bf16 matmul peak of the cores used (NeuronCore-v3: 79 TFLOPS each)")
    parser.add_argument("--fixed-ms", type=float, default=0.0, help="fixed overhead added to every step")
    parser.add_argument("--max-k", type=int, default=10, help="largest num_speculative_tokens")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = parser.parse_args()
    hw = Hardware(args.bandwidth_tbps * 1e12, args.peak_tflops * 1e12, args.fixed_ms / 1e3)
    print(report(args.context, args.max_k, hw, args.markdown), end="")


if __name__ == "__main__":
    main()
