"""Drafter training objectives: P-EAGLE (all depths of every kept anchor in one drafter forward) and
EAGLE-3's sequential training-time test, on the same sampled elements so the two compare fairly.

Element (a, d) of a sequence: anchor a, depth d. Depth 0 is the real pair (feature f_a, token
t_{a+1}) at position a; depth d >= 1 is a mask slot (mask embedding, fc(mask_hidden)) at position
a + d. Element (a, d) learns the target's distribution at position a + 1 + d, i.e. draft d+1 of a
step whose last real slot is a, exactly as the mask slots are used at inference.

Attention: a depth-0 element sees depth-0 elements up to its anchor; element (a, d) sees depth-0
elements up to a and its own chain (a, 1..d).

COD sampling (conditional drop-token) bounds the cost: depth d keeps about n * max(r^d, r_min) of
the anchors, each kept anchor's chain being kept whole below it (anchors of depth d are a subset of
those of depth d-1). Loss per element: KL(target || draft) over the draft vocabulary, optionally mixed
with the cross-entropy of the target's top token (`LossSettings.ce_weight`: greedy acceptance is a
top-1 match). How the elements' losses make the loss is `LossSettings.weighting`: "depth" (our
default) averages within each depth and weighs depth d by decay**d (P-EAGLE's paper: depths equally,
decay 1); "element" is one mean over all elements (speculators' P-EAGLE code), so a depth weighs as
many elements as COD keeps of it, and depth 0, the draft every accepted run starts with, weighs most.

What is learned: predictions of response tokens weigh 1, predictions of prompt tokens weigh
`prompt_weight` (default 0: the prompt is given, not generated; every depth-0 element of the prompt is
still in the forward, as the context later elements attend to). With prompt weight 0 the mask depths
are sampled among the elements that learn something, so no draft slot is spent on the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch import Tensor

from neuron_peagle.models.drafter import Drafter


WEIGHTINGS = ("depth", "element")


@dataclass(frozen=True)
class LossSettings:
    """How the elements' losses make the loss (see the module docstring)."""
    prompt_weight: float = 0.0  # weight of the target's predictions of prompt tokens (response: 1)
    weighting: str = "depth"  # "depth": a mean per depth, depth d weighted decay**d; "element": one mean
    decay: float | None = None  # depth d's weight decay**d; None: the objective's own (P-EAGLE 1, EAGLE-3 0.8)
    ce_weight: float = 0.0  # element loss (1 - w) * KL + w * cross-entropy of the target's top token

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not 0.0 <= self.prompt_weight <= 1.0:
            raise ValueError(f"prompt_weight must be in [0, 1], got {self.prompt_weight}")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1], got {self.ce_weight}")
        if self.decay is not None and not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")


@dataclass
class Elements:
    anchors: Tensor  # [E] anchor a of each element
    depths: Tensor  # [E] depth d
    positions: Tensor  # [E] a + d
    visible: Tensor  # [E, E] bool, query x key


def first_response_prediction(response_start: int) -> int:
    """The first position whose target distribution predicts a response token (position p predicts
    token p + 1): elements learning at or after it learn the response."""
    return response_start - 1


def cod_elements(num_anchors: int, depths: int, valid_last: int, generator: torch.Generator,
                 ratio: float = 0.7, ratio_min: float = 0.2, first_learned: int = 0) -> Elements:
    """Elements for anchors 0..num_anchors-1; depth d >= 1 only for anchors with
    first_learned <= a + 1 + d <= valid_last (element (a, d) learns the target at a + 1 + d). How many
    depth-d elements are kept is set by num_anchors, whatever first_learned leaves to choose from."""
    per_depth = [torch.arange(num_anchors)]
    for d in range(1, depths):
        previous = per_depth[-1]
        previous = previous[(previous + 1 + d <= valid_last) & (previous + 1 + d >= first_learned)]
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


def _depth_losses(logits: Tensor, anchors: Tensor, depths_of: Tensor, teacher_logits: Tensor,
                  response_start: int, depths: int, settings: LossSettings, default_decay: float
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of elements (anchors [E], depths_of [E]) with draft-vocabulary logits [E, draft_vocab], as
    `settings` says (depth d weighted decay**d, the objective's `default_decay` unless the settings give
    one). Stats per depth (mean KL, correct, count) cover response tokens only, whatever the loss."""
    decay = default_decay if settings.decay is None else settings.decay
    teacher_at = anchors + 1 + depths_of  # position whose distribution is learned
    teacher = torch.softmax(teacher_logits[teacher_at].float(), dim=-1)
    log_q = torch.log_softmax(logits, dim=-1)
    kl = (teacher * (torch.log(teacher.clamp_min(1e-20)) - log_q)).sum(-1)  # [E]
    top = teacher.argmax(-1)
    element_loss = kl
    if settings.ce_weight > 0:
        ce = F.nll_loss(log_q.float(), top, reduction="none")
        element_loss = (1.0 - settings.ce_weight) * kl + settings.ce_weight * ce
    in_response = (teacher_at >= first_response_prediction(response_start)).float()
    weight = in_response + settings.prompt_weight * (1.0 - in_response)
    correct = (logits.argmax(-1) == top).float()
    if settings.weighting == "element":
        weight = weight * decay ** depths_of.float()
        loss = (element_loss * weight).sum() / weight.sum().clamp_min(1e-9)
    else:
        loss = logits.new_zeros(())
        present = 0.0
        for d in range(depths):
            at = (depths_of == d).float() * weight
            if at.sum() > 0:
                loss = loss + decay ** d * (element_loss * at).sum() / at.sum()
                present += decay ** d
        loss = loss / max(present, 1e-9)
    stats = {}
    for d in range(depths):
        scored = (depths_of == d).float() * in_response
        count = scored.sum()
        if count > 0:
            response_loss = (kl * scored).sum() / count
            stats[f"depth{d}"] = torch.stack([response_loss.detach(), (correct * scored).sum(), count])
    return loss, stats


def _elements(length: int, depths: int, response_start: int, prompt_weight: float,
              generator: torch.Generator) -> Elements:
    """COD elements of a sequence of `length` tokens: mask depths only where they learn something."""
    first_learned = 0 if prompt_weight > 0 else first_response_prediction(response_start)
    return cod_elements(length - 1, depths, valid_last=length - 1, generator=generator, first_learned=first_learned)


def peagle_loss(drafter: Drafter, target_embedding: torch.nn.Module, ids: Tensor, features: Tensor,
                teacher_logits: Tensor, response_start: int, depths: int, generator: torch.Generator,
                settings: LossSettings = LossSettings()) -> tuple[Tensor, dict[str, Tensor]]:
    """One sequence. ids [T], features [T, 3H], teacher_logits [T, draft_vocab] (target at each position,
    restricted to the draft vocabulary). Returns the loss and per-depth (loss, correct, count)."""
    elements = _elements(ids.shape[0], depths, response_start, settings.prompt_weight, generator)
    logits = parallel_logits(drafter, target_embedding, ids, features, elements)
    return _depth_losses(logits, elements.anchors, elements.depths, teacher_logits, response_start, depths,
                         settings, default_decay=1.0)


def parallel_logits(drafter: Drafter, target_embedding: torch.nn.Module, ids: Tensor, features: Tensor,
                    elements: Elements) -> Tensor:
    """One drafter forward over every element, as parallel drafting feeds them: ids [T], features
    [T, 3H] -> draft-vocabulary logits [E, draft_vocab]."""
    is_mask = elements.depths > 0
    real_tokens = ids[(elements.anchors + 1).clamp(max=ids.shape[0] - 1)]
    embeds = drafter.embed(real_tokens.unsqueeze(0), is_mask.unsqueeze(0), target_embedding)
    hidden = drafter.project(features[elements.anchors].unsqueeze(0).to(embeds.dtype), is_mask.unsqueeze(0))
    rows = torch.arange(elements.anchors.numel()).unsqueeze(0)
    logits, _ = drafter(embeds, hidden, elements.positions.unsqueeze(0), None, rows,
                        elements.visible.unsqueeze(0))
    return logits[0]


def eagle3_loss(drafter: Drafter, target_embedding: torch.nn.Module, ids: Tensor, features: Tensor,
                teacher_logits: Tensor, response_start: int, depths: int, generator: torch.Generator,
                settings: LossSettings = LossSettings()) -> tuple[Tensor, dict[str, Tensor]]:
    """EAGLE-3's training-time test, on the same elements and attention pattern as P-EAGLE.

    Element (a, d >= 1) is what sequential drafting feeds at pass d + 1: the token t_{a+1+d} (the
    target's own continuation, which a greedy draft that survives equals) and, instead of a target
    feature, the drafter's own output hidden state of element (a, d-1). So depth d needs the outputs
    of depth d-1: one drafter forward per depth over the elements of depths <= d (the gradient flows
    through the chain), about depths/2 times the cost of the P-EAGLE objective per sequence.
    Depth d is weighted 0.8**d, as EAGLE-3 trains, unless `settings.decay` says otherwise.
    """
    length = ids.shape[0]
    elements = _elements(length, depths, response_start, settings.prompt_weight, generator)
    tokens = ids[(elements.anchors + 1 + elements.depths).clamp(max=length - 1)]
    no_mask = torch.zeros(1, tokens.numel(), dtype=torch.bool)
    embeds = drafter.embed(tokens.unsqueeze(0), no_mask, target_embedding)[0]  # [E, H]
    real_hidden = drafter.project_features(features[elements.anchors].to(embeds.dtype))  # [E, H]
    present_depths = int(elements.depths.max()) + 1
    parent = torch.full_like(elements.anchors, -1)  # index of element (a, d-1) for each (a, d)
    for d in range(1, present_depths):
        upper = (elements.depths == d - 1).nonzero().squeeze(-1)
        here = (elements.depths == d).nonzero().squeeze(-1)
        parent[here] = upper[torch.searchsorted(elements.anchors[upper], elements.anchors[here])]

    # Outputs of the elements computed so far, kept in float32 (under autocast the layers give bf16).
    own_hidden = real_hidden.new_zeros(real_hidden.shape, dtype=torch.float32)
    all_logits = real_hidden.new_zeros(elements.anchors.numel(), drafter.lm_head.out_features, dtype=torch.float32)
    for d in range(present_depths):
        subset = (elements.depths <= d).nonzero().squeeze(-1)
        hidden = torch.where((elements.depths[subset] == 0).unsqueeze(-1), real_hidden[subset].float(),
                             own_hidden[parent[subset].clamp(min=0)])
        rows = (elements.depths[subset] == d).nonzero().squeeze(-1)
        logits, out_hidden = drafter(embeds[subset].unsqueeze(0), hidden.unsqueeze(0),
                                     elements.positions[subset].unsqueeze(0), None, rows.unsqueeze(0),
                                     elements.visible[subset][:, subset].unsqueeze(0))
        computed = subset[rows]
        own_hidden = own_hidden.index_put((computed,), out_hidden[0].float())
        all_logits = all_logits.index_put((computed,), logits[0].float())
    return _depth_losses(all_logits, elements.anchors, elements.depths, teacher_logits, response_start, depths,
                         settings, default_decay=0.8)


OBJECTIVES = {"peagle": peagle_loss, "eagle3": eagle3_loss}
