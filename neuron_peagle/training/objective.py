"""The P-EAGLE training objective: all depths of every kept anchor in one drafter forward.

Element (a, d) of a sequence: anchor a, depth d. Depth 0 is the real pair (feature f_a, token
t_{a+1}) at position a; depth d >= 1 is a mask slot (mask embedding, fc(mask_hidden)) at position
a + d. Element (a, d) learns the target's distribution at position a + 1 + d, i.e. draft d+1 of a
step whose last real slot is a, exactly as the mask slots are used at inference.

Attention: a depth-0 element sees depth-0 elements up to its anchor; element (a, d) sees depth-0
elements up to a and its own chain (a, 1..d).

COD sampling (conditional drop-token) bounds the cost: depth d keeps about n * max(r^d, r_min) of
the anchors, each kept anchor's chain being kept whole below it (anchors of depth d are a subset of
those of depth d-1). Loss: KL(target || draft) over the draft vocabulary, averaged within each depth,
depths weighted equally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from neuron_peagle.models.drafter import Drafter


@dataclass
class Elements:
    anchors: Tensor  # [E] anchor a of each element
    depths: Tensor  # [E] depth d
    positions: Tensor  # [E] a + d
    visible: Tensor  # [E, E] bool, query x key


def cod_elements(num_anchors: int, depths: int, valid_last: int, generator: torch.Generator,
                 ratio: float = 0.7, ratio_min: float = 0.2) -> Elements:
    """Elements for anchors 0..num_anchors-1; depth d only for anchors with a + 1 + d <= valid_last."""
    per_depth = [torch.arange(num_anchors)]
    for d in range(1, depths):
        previous = per_depth[-1]
        previous = previous[previous + 1 + d <= valid_last]
        keep = max(1, int(round(num_anchors * max(ratio ** d, ratio_min))))
        if previous.numel() == 0:
            break
        chosen = torch.randperm(previous.numel(), generator=generator)[: min(keep, previous.numel())]
        per_depth.append(previous[chosen].sort().values)
    anchors = torch.cat(per_depth)
    depth = torch.cat([torch.full_like(a, d) for d, a in enumerate(per_depth)])
    qa, qd = anchors.unsqueeze(1), depth.unsqueeze(1)
    ka, kd = anchors.unsqueeze(0), depth.unsqueeze(0)
    visible = ((kd == 0) & (ka <= qa)) | ((ka == qa) & (kd >= 1) & (kd <= qd))
    return Elements(anchors, depth, anchors + depth, visible)


def peagle_loss(drafter: Drafter, target_embedding: torch.nn.Module, ids: Tensor, features: Tensor,
                teacher_logits: Tensor, response_start: int, depths: int, generator: torch.Generator
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """One sequence. ids [T], features [T, 3H], teacher_logits [T, draft_vocab] (target at each position,
    restricted to the draft vocabulary). Returns the loss and per-depth (loss, correct, count)."""
    length = ids.shape[0]
    elements = cod_elements(length - 1, depths, valid_last=length - 1, generator=generator)
    is_mask = elements.depths > 0
    real_tokens = ids[(elements.anchors + 1).clamp(max=length - 1)]
    embeds = drafter.embed(real_tokens.unsqueeze(0), is_mask.unsqueeze(0), target_embedding)
    hidden = drafter.project(features[elements.anchors].unsqueeze(0).to(embeds.dtype), is_mask.unsqueeze(0))
    rows = torch.arange(elements.anchors.numel()).unsqueeze(0)
    logits, _ = drafter(embeds, hidden, elements.positions.unsqueeze(0), None, rows,
                        elements.visible.unsqueeze(0))
    logits = logits[0]  # [E, draft_vocab]
    teacher_at = elements.anchors + 1 + elements.depths  # position whose distribution is learned
    teacher = torch.softmax(teacher_logits[teacher_at].float(), dim=-1)
    log_q = torch.log_softmax(logits, dim=-1)
    kl = (teacher * (torch.log(teacher.clamp_min(1e-20)) - log_q)).sum(-1)  # [E]
    # Learn only predictions of response tokens (the prompt is given, not generated).
    weight = (teacher_at >= response_start - 1).float()
    correct = (logits.argmax(-1) == teacher.argmax(-1)).float()
    loss = logits.new_zeros(())
    stats = {}
    present = 0
    for d in range(depths):
        at = (elements.depths == d).float() * weight
        count = at.sum()
        if count > 0:
            depth_loss = (kl * at).sum() / count
            loss = loss + depth_loss
            present += 1
            stats[f"depth{d}"] = torch.stack([depth_loss.detach(), (correct * at).sum(), count])
    return loss / max(present, 1), stats
