"""The published facts the MoE verify-cost analysis (scripts/moe_verify_cost.py) stands on, each with
where it was read: the two targets' shapes, published P-EAGLE acceptance lengths, and the one public trn2
P-EAGLE measurement. Data only: the model that uses them is in moe_verify_cost.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoeShape:
    """Shapes of an MoE target, as its config.json and its transformers modeling code define them."""

    name: str
    num_layers: int
    hidden: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    expert_intermediate: int
    vocab: int
    attention_bias: bool  # q/k/v/o biases
    attention_sinks: bool  # one learned logit per q head
    qk_norm: bool  # RMSNorm over head_dim on q and on k
    router_bias: bool
    expert_bias: bool  # gate_up and down biases of every expert
    num_sliding_layers: int
    sliding_window: int  # keys a sliding-window layer attends to (0: no such layers)
    headline: str  # the model card's parameter counts, to check the counting below against


# openai/gpt-oss-20b, config.json (read from its copy in the GitHub repo jihengzhang/jihz-gpt-oss-20b,
# gpt-oss-20b/config.json): num_hidden_layers 24, hidden_size 2880, num_attention_heads 64,
# num_key_value_heads 8, head_dim 64, num_local_experts 32, num_experts_per_tok 4, intermediate_size 2880
# (per expert), vocab_size 201088, attention_bias true, tie_word_embeddings false, sliding_window 128,
# layer_types alternating sliding_attention / full_attention (12 of each).
# Tensors (huggingface/transformers, src/transformers/models/gpt_oss/modular_gpt_oss.py): q/k/v/o are
# nn.Linear(bias=attention_bias); `sinks` [num_heads]; router weight [E, H] and bias [E]; experts
# gate_up_proj [E, H, 2I] + gate_up_proj_bias [E, 2I], down_proj [E, I, H] + down_proj_bias [E, H].
# Model card (openai/gpt-oss-20b, README.md): "21B parameters with 3.6B active parameters". The checkpoint
# ships the expert matrices MXFP4-quantized, the rest in bf16 (aws-neuron/nkipy, examples/models/gpt_oss/
# README.md, which dequantizes those experts to bf16 for Trainium). The counting below gives 20,914,757,184.
GPT_OSS_20B = MoeShape(
    name="gpt-oss-20b", num_layers=24, hidden=2880, num_q_heads=64, num_kv_heads=8, head_dim=64,
    num_experts=32, experts_per_token=4, expert_intermediate=2880, vocab=201088,
    attention_bias=True, attention_sinks=True, qk_norm=False, router_bias=True, expert_bias=True,
    num_sliding_layers=12, sliding_window=128, headline="21B total, 3.6B active",
)

# Qwen/Qwen3-Coder-30B-A3B-Instruct, config.json (read from its copy in the GitHub repo ztxz16/fastllm,
# Qwen3-Coder-30B-A3B-Instruct/config.json): num_hidden_layers 48, hidden_size 2048, num_attention_heads 32,
# num_key_value_heads 4, head_dim 128, num_experts 128, num_experts_per_tok 8, moe_intermediate_size 768,
# vocab_size 151936, tie_word_embeddings false, qkv_bias false, use_qk_norm true, decoder_sparse_step 1 and
# mlp_only_layers [] (every layer is MoE), shared_expert_intermediate_size 0, no sliding window.
# Tensors (huggingface/transformers, src/transformers/models/qwen3_moe/modular_qwen3_moe.py): Qwen3 attention
# (q_norm and k_norm over head_dim), Qwen2-MoE experts (gate, up, down) and router, no biases.
# Model card (Qwen3-Coder-30B-A3B-Instruct/README.md in the same repo): "30.5B in total and 3.3B activated".
# The counting below gives 30,532,122,624.
QWEN3_CODER_30B_A3B = MoeShape(
    name="Qwen3-Coder-30B-A3B", num_layers=48, hidden=2048, num_q_heads=32, num_kv_heads=4, head_dim=128,
    num_experts=128, experts_per_token=8, expert_intermediate=768, vocab=151936,
    attention_bias=False, attention_sinks=False, qk_norm=True, router_bias=False, expert_bias=False,
    num_sliding_layers=0, sliding_window=0, headline="30.5B total, 3.3B activated",
)

TARGETS = (GPT_OSS_20B, QWEN3_CODER_30B_A3B)


@dataclass(frozen=True)
class PublishedAcceptance:
    """Two published mean acceptance lengths of one drafter on one workload. An acceptance length counts
    the accepted drafts plus the one token the target adds, so it lies in [1, K+1]."""

    label: str
    source: str
    k_short: int
    al_short: float
    k_long: int
    al_long: float


@dataclass(frozen=True)
class Trn2Example:
    """The one public trn2 P-EAGLE measurement: aws-neuron/nkipy, examples/models/gpt_oss/peagle/README.md.

    gpt-oss-20b on trn2.48xlarge, TP=4 with `--lnc 1` (examples/models/gpt_oss/config.py: 4 physical
    NeuronCores), experts dequantized from MXFP4 to bf16 at weight preparation, the default MoE a per-(token,
    expert) loop (kernels/transformer_layer.py). The README reports verify as ~19 ms fixed + ~6.3 ms per
    candidate token, base decode ~52 tokens/s, and a K sweep on one chat prompt, n=96."""

    fixed_ms: float = 19.0
    per_token_ms: float = 6.3
    base_tok_s: float = 52.0
    sweep: tuple[tuple[int, float, float], ...] = (  # (K, acceptance length, decode tokens/s; "~60" at K=3)
        (1, 1.94, 50.0), (2, 2.67, 52.6), (3, 3.31, 60.0), (4, 3.31, 49.5), (7, 4.33, 50.4))
    compared: tuple[int, int] = (3, 7)  # the K=3 vs K=7 comparison, also the two points the fit uses

    def point(self, k: int) -> tuple[float, float]:
        """(acceptance length, decode tokens/s) reported at K."""
        return next((al, tok_s) for kk, al, tok_s in self.sweep if kk == k)

    def published(self) -> PublishedAcceptance:
        (k_short, k_long) = self.compared
        return PublishedAcceptance("trn2 example, chat", "aws-neuron/nkipy gpt_oss/peagle README",
                                   k_short, self.point(k_short)[0], k_long, self.point(k_long)[0])

    def verify_ms(self, k: int) -> float:
        """The fixed part is a one-token forward, so K drafts add K tokens: 19 + 6.3 K. This reading puts a
        K=3 verify at 37.9 ms, inside the 36-39 ms the README gives for it; 19 + 6.3 (K+1) would give 44.2."""
        return self.fixed_ms + self.per_token_ms * k

    def verify_ms_other_reading(self, k: int) -> float:
        return self.fixed_ms + self.per_token_ms * (k + 1)


TRN2_EXAMPLE = Trn2Example()

# The copies of the published P-EAGLE articles this project keeps are cut short and carry no acceptance
# figures. The same AWS/NVIDIA article is in vllm-project/vllm-project.github.io, _posts/2026-03-13-p-eagle.md:
# P-EAGLE on GPT-OSS-20B (4-layer drafter, one B200, vLLM) at K=3 and K=7. No per-position rates are published
# for gpt-oss, hence the two-point fit in AcceptanceCurve; the trn2 example's points are in Trn2Example.
# Qwen3-Coder's drafter card: amazon/Qwen3-Coder-30B-A3B-Instruct-P-EAGLE, README.md (HumanEval, instruction
# prompts; it also gives K=18: 7.51).
VLLM_BLOG = "vLLM blog P-EAGLE post, GPT-OSS-20B, B200"
GPT_OSS_ACCEPTANCE = (
    PublishedAcceptance("HumanEval", VLLM_BLOG, 3, 3.02, 7, 3.94),
    PublishedAcceptance("SPEED-Bench", VLLM_BLOG, 3, 2.87, 7, 3.38),
    PublishedAcceptance("MT-Bench", VLLM_BLOG, 3, 2.87, 7, 3.70),
    TRN2_EXAMPLE.published(),
)
QWEN_ACCEPTANCE = (
    PublishedAcceptance("HumanEval", "amazon/Qwen3-Coder-30B-A3B-Instruct-P-EAGLE card", 4, 4.30, 10, 6.66),
)
ACCEPTANCE = {GPT_OSS_20B.name: GPT_OSS_ACCEPTANCE, QWEN3_CODER_30B_A3B.name: QWEN_ACCEPTANCE}
