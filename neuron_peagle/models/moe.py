"""The mixture-of-experts MLP (qwen3_moe, gpt_oss), written for fixed shapes: routing picks experts per
token but never changes a shape.

Two formulations, chosen from the (static) number of routed rows N * k (N tokens, k experts each)
against the number of experts E:

- **per-token gather** (N * k <= E: decode, and verify at small batch): each token's k expert
  matrices are gathered (`weights[ids]`) and applied to that token alone. A step reads exactly the
  selected experts' weights, N * k expert matrices, and computes N * k rows: nothing scales with E.
- **grouped blocks** (prefill, and verify at large batch): the N * k (token, expert) rows are sorted by
  expert and laid out in blocks of `block_rows` rows, each block owned by one expert and padded to
  its end. Every expert's rows fill ceil(rows_e / C) blocks, so at most ceil(N * k / C) + E blocks
  exist; the graph has that many (a fixed shape), unused ones point at dummy rows with weight 0.
  Cost: (N * k + E * C) rows of compute and ceil(N * k / C) + E expert matrices read, against N * E rows
  for running every expert on every token. C is the power of two nearest N * k / E (clamped to
  [8, 128]), so padding costs about as much as the real rows.

Both give the same sums as transformers' per-expert loop (which adds experts in index order; we add a
token's k outputs in routing order: equal up to float rounding).

Expert parallelism (the parallel plan, neuron_peagle/parallel.py) leaves a layer a range of whole experts
(`Experts.held`): the router still scores all E, a route to an expert held elsewhere keeps its slot with
score 0 (so no shape depends on the routing), and `sum_ranks` adds the ranks' partial outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from neuron_peagle.config import MoeConfig


def block_rows(routed_rows: int, num_experts: int) -> int:
    """C: rows per block of the grouped formulation, near the mean rows per expert."""
    mean = max(1, routed_rows // num_experts)
    return min(128, max(8, 1 << (mean - 1).bit_length()))


class Router(nn.Module):
    """Scores of the k experts each token goes to. weight: [E, hidden] (nn.Linear's layout)."""

    def __init__(self, hidden_size: int, config: MoeConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(config.num_experts), requires_grad=False) if config.router_bias else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # [N, H] -> scores [N, k] (x.dtype), ids [N, k]
        c = self.config
        logits = F.linear(x, self.weight, self.bias)
        if c.routing == "topk_softmax":  # gpt-oss: softmax over the k largest logits
            top, ids = torch.topk(logits, c.num_experts_per_tok, dim=-1)
            return torch.softmax(top, dim=-1), ids
        probs = torch.softmax(logits.float(), dim=-1)  # qwen3_moe: softmax over all, then the k largest
        top, ids = torch.topk(probs, c.num_experts_per_tok, dim=-1)
        if c.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return top.to(x.dtype), ids


class Experts(nn.Module):
    """SwiGLU experts, the `held` ones of the router's E (all, as built). gate_up: [E_held, H, 2I] (gate
    columns, then up), down: [E_held, I, H]; optional biases."""

    def __init__(self, hidden_size: int, config: MoeConfig) -> None:
        super().__init__()
        self.config = config
        self.held = range(config.num_experts)
        # held.start as data, not a constant of the graph: every rank's graph is the same (one compile, one
        # SPMD trace), each rank's weights say which experts it holds
        self.register_buffer("first_expert", torch.tensor(0, dtype=torch.int64))
        e, i = config.num_experts, config.expert_intermediate_size
        self.gate_up = nn.Parameter(torch.empty(e, hidden_size, 2 * i), requires_grad=False)
        self.down = nn.Parameter(torch.empty(e, i, hidden_size), requires_grad=False)
        self.gate_up_bias = nn.Parameter(torch.zeros(e, 2 * i), requires_grad=False) if config.expert_bias else None
        self.down_bias = nn.Parameter(torch.zeros(e, hidden_size), requires_grad=False) if config.expert_bias else None

    def activation(self, gate_up: Tensor) -> Tensor:  # [..., 2I] -> [..., I]
        c = self.config
        gate, up = gate_up.split(c.expert_intermediate_size, dim=-1)
        if c.activation == "clamped_swiglu":
            gate = gate.clamp(max=c.swiglu_limit)
            up = up.clamp(min=-c.swiglu_limit, max=c.swiglu_limit)
            return (up + 1) * (gate * torch.sigmoid(gate * c.swiglu_alpha))
        return nn.functional.silu(gate) * up

    def per_token(self, x: Tensor, ids: Tensor) -> Tensor:  # x [N, H], ids [N, k] -> [N, k, H]
        h = torch.matmul(x[:, None, None, :], self.gate_up[ids]).squeeze(2)  # [N, k, 2I]
        if self.gate_up_bias is not None:
            h = h + self.gate_up_bias[ids]
        out = torch.matmul(self.activation(h).unsqueeze(2), self.down[ids]).squeeze(2)  # [N, k, H]
        if self.down_bias is not None:
            out = out + self.down_bias[ids]
        return out

    def grouped(self, x: Tensor, ids: Tensor, scores: Tensor) -> Tensor:  # x [N, H], ids/scores [N, k] -> [N, H]
        tokens, k = ids.shape
        experts = len(self.held)
        rows = tokens * k
        size = block_rows(rows, experts)
        blocks = (rows + size - 1) // size + experts  # enough for any routing
        flat = ids.reshape(-1)  # [R]
        order = torch.argsort(flat, stable=True)  # rows sorted by expert
        sorted_expert = flat[order]
        counts = torch.zeros(experts, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        start = torch.cumsum(counts, 0) - counts  # first sorted row of each expert
        padded = (counts + size - 1) // size * size
        offset = torch.cumsum(padded, 0) - padded  # first slot of each expert's blocks
        slot = offset[sorted_expert] + torch.arange(rows, device=x.device) - start[sorted_expert]  # [R]
        # Slot -> token (the dummy token `tokens`, a zero row, where unused) and routing score (0 there).
        slot_token = torch.full((blocks * size,), tokens, dtype=torch.int64, device=x.device)
        slot_token = slot_token.scatter(0, slot, torch.div(order, k, rounding_mode="floor"))
        slot_score = torch.zeros(blocks * size, dtype=scores.dtype, device=x.device)
        slot_score = slot_score.scatter(0, slot, scores.reshape(-1)[order])
        # Block -> its expert: the last expert whose blocks start at or before it (trailing blocks: the last).
        first_block = offset // size  # [E]
        block_ids = torch.arange(blocks, device=x.device)
        block_expert = ((first_block.unsqueeze(0) <= block_ids.unsqueeze(1)) & (padded > 0).unsqueeze(0))
        block_expert = (block_expert * torch.arange(1, experts + 1, device=x.device)).amax(1).clamp(min=1) - 1

        padded_x = torch.cat([x, x.new_zeros(1, x.shape[1])])  # [N + 1, H]
        xb = padded_x[slot_token].view(blocks, size, -1)  # [blocks, C, H]
        h = torch.bmm(xb, self.gate_up[block_expert])  # [blocks, C, 2I]
        if self.gate_up_bias is not None:
            h = h + self.gate_up_bias[block_expert].unsqueeze(1)
        out = torch.bmm(self.activation(h), self.down[block_expert])  # [blocks, C, H]
        if self.down_bias is not None:
            out = out + self.down_bias[block_expert].unsqueeze(1)
        out = out.reshape(blocks * size, -1) * slot_score.unsqueeze(-1)
        summed = x.new_zeros(tokens + 1, x.shape[1]).index_add(0, slot_token, out.to(x.dtype))
        return summed[:tokens]


class SparseMoe(nn.Module):
    """Router + experts: [B, T, H] -> [B, T, H]."""

    def __init__(self, hidden_size: int, config: MoeConfig) -> None:
        super().__init__()
        self.config = config
        self.router = Router(hidden_size, config)
        self.experts = Experts(hidden_size, config)
        self.sum_ranks: nn.Module = nn.Identity()  # the partial outputs of the experts held -> the whole output

    def uses_gather(self, tokens: int) -> bool:
        """The per-token gather for `tokens` tokens (static), else grouped blocks."""
        return tokens * self.config.num_experts_per_tok <= self.config.num_experts

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, hidden = x.shape
        flat = x.reshape(batch * seq, hidden)
        scores, ids = self.router(flat)
        held = len(self.experts.held)
        if held < self.config.num_experts:  # routes to experts held elsewhere: score 0, local index 0
            first = self.experts.first_expert
            here = (ids >= first) & (ids < first + held)
            ids = torch.where(here, ids - first, 0)
            scores = scores.masked_fill(~here, 0)
        if self.uses_gather(batch * seq):
            out = (self.experts.per_token(flat, ids) * scores.unsqueeze(-1)).sum(1)
        else:
            out = self.experts.grouped(flat, ids, scores)
        return self.sum_ranks(out.to(x.dtype)).view(batch, seq, hidden)
