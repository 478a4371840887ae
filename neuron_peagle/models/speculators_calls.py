"""Our Drafter run on what speculators' own training forwards feed a drafter, to compare logits with the
ones speculators computes (tests/fixtures/speculators, scripts/make_speculators_fixtures.py).

speculators 0.9.0, `PEagleDraftModel.forward(hidden_states, input_ids, document_ids, ...)`: its COD
sampling gives E elements (anchor_pos[e], depth[e]); element e sits at position anchor_pos + depth and
takes, at depth 0, the token input_ids[position] and the features hidden_states[position], at depth
> 0 the mask token and mask_hidden; element q sees element k where both anchors' documents agree,
q's is not padding (-1), and k is a depth-0 element at or before q's anchor, or an element of q's own
chain (same anchor) at or below q's depth. Anchors can be -1 (a depth-1 element at position 0):
document_ids[-1] is then read, as speculators' mask does. Logits: lm_head(norm(last layer)) of every
element.

`Eagle3DraftModel.forward(hidden_states, input_ids, document_ids, position_ids, ttt_steps=T)`: step 0
runs fc(features) with the tokens input_ids, causally within a document; step k >= 1 runs the
previous step's output hidden state (the final norm's with norm_output) with the tokens shifted k to
the left (zero-padded), at positions + k, each row seeing what step 0's row saw plus its own row of
steps 1..k (speculators' KV cache across steps). Here step k is one forward over the k + 1 steps' rows
with that pattern, whose last block is step k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from neuron_peagle.models.drafter import Drafter


def peagle_visible(anchor_pos: Tensor, depth: Tensor, document_ids: Tensor) -> Tensor:
    """speculators' P-EAGLE attention pattern: anchor_pos, depth [E]; document_ids [S] -> [E, E] bool."""
    qa, ka = anchor_pos.unsqueeze(1), anchor_pos.unsqueeze(0)
    qd, kd = depth.unsqueeze(1), depth.unsqueeze(0)
    q_doc, k_doc = document_ids[qa], document_ids[ka]  # an anchor of -1 reads the last entry
    chain = (qa == ka) & (qd >= kd)
    context = (kd == 0) & (qa >= ka)
    return (q_doc != -1) & (q_doc == k_doc) & (context | chain)


def peagle_logits(drafter: Drafter, hidden_states: Tensor, input_ids: Tensor, document_ids: Tensor,
                  anchor_pos: Tensor, depth: Tensor) -> Tensor:
    """hidden_states [S, 3H_t], input_ids, document_ids [S]; anchor_pos, depth [E] (speculators' COD
    sample) -> draft-vocabulary logits [E, draft_vocab] of speculators' P-EAGLE forward."""
    positions = anchor_pos + depth
    is_mask = depth > 0
    tokens = torch.where(is_mask, torch.full_like(positions, drafter.config.mask_token_id), input_ids[positions])
    embeds = drafter.embed(tokens.unsqueeze(0), is_mask.unsqueeze(0), None)
    dtype = drafter.fc.weight.dtype
    hidden = drafter.project(hidden_states[positions].unsqueeze(0).to(dtype), is_mask.unsqueeze(0))
    rows = torch.arange(positions.numel()).unsqueeze(0)
    visible = peagle_visible(anchor_pos, depth, document_ids)
    logits, _ = drafter(embeds, hidden, positions.unsqueeze(0), None, rows, visible.unsqueeze(0))
    return logits[0]


def ttt_visible(document_ids: Tensor, steps: int) -> Tensor:
    """Attention over `steps` blocks of S rows: step 0 causal within a document, each later row also
    its own index of steps 1..its step. document_ids [S] -> [steps * S, steps * S] bool."""
    length = document_ids.numel()
    i = torch.arange(length)
    causal = (i.unsqueeze(1) >= i.unsqueeze(0)) & (document_ids.unsqueeze(1) != -1) & (
        document_ids.unsqueeze(1) == document_ids.unsqueeze(0))
    diagonal = i.unsqueeze(1) == i.unsqueeze(0)
    visible = torch.zeros(steps * length, steps * length, dtype=torch.bool)
    for q in range(steps):
        rows = slice(q * length, (q + 1) * length)
        visible[rows, :length] = causal | diagonal
        for k in range(1, q + 1):
            visible[rows, k * length:(k + 1) * length] = diagonal
    return visible


def eagle3_ttt_logits(drafter: Drafter, hidden_states: Tensor, input_ids: Tensor, document_ids: Tensor,
                      position_ids: Tensor, ttt_steps: int) -> Tensor:
    """hidden_states [S, 3H_t]; input_ids, document_ids, position_ids [S] -> draft-vocabulary logits
    [ttt_steps, S, draft_vocab] of speculators' EAGLE-3 training-time-test forward."""
    length = input_ids.numel()
    dtype = drafter.fc.weight.dtype
    fed = [drafter.project_features(hidden_states.to(dtype))]  # step k's hidden input, [S, H]
    shifted = [torch.cat([input_ids[k:], input_ids.new_zeros(k)]) for k in range(ttt_steps)]
    all_logits = []
    for step in range(ttt_steps):
        blocks = step + 1
        tokens = torch.cat(shifted[:blocks]).unsqueeze(0)
        embeds = drafter.embed(tokens, torch.zeros_like(tokens, dtype=torch.bool), None)
        positions = torch.cat([position_ids + k for k in range(blocks)]).unsqueeze(0)
        rows = torch.arange(step * length, blocks * length).unsqueeze(0)
        visible = ttt_visible(document_ids, blocks).unsqueeze(0)
        logits, out = drafter(embeds, torch.cat(fed[:blocks]).unsqueeze(0), positions, None, rows, visible)
        fed.append(out[0])
        all_logits.append(logits[0])
    return torch.stack(all_logits)
