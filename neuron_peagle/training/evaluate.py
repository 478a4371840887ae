"""Held-out drafter accuracy without decoding: a fast proxy for the benchmark's acceptance length.

The target answers held-out prompts once (its own greedy responses, as at inference); its features
on them are cached. A drafter is then scored teacher-forced: every position of a response is an
anchor, and the drafter proposes all depths at once exactly as parallel drafting does (depth 0 from
the real pair, depths 1.. from mask slots). Depth d's accuracy is how often its top-1 draft equals
the target's greedy token there. The product rule 1 + a0 + a0*a1 + ... turns them into an estimated
acceptance length (it treats depths as independent, so it is an estimate, not the measured value).

Depth 0 is also split by how sure the target is of the token it drafts (its top-1 probability in
`CONFIDENCE_EDGES` bands): a drafter that misses tokens the target is nearly certain of (a name copied
from the prompt, the rest of a word) lacks context it could have, not luck. The draft vocabulary's
coverage (how many of those tokens it can name at all) is the ceiling on every depth's accuracy.

These features live apart from the training ones, and the trainer refuses to read them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from neuron_peagle.files import atomic_write_text
from neuron_peagle.models.drafter import Drafter, draft_target_ids
from neuron_peagle.models.target import TargetModel
from neuron_peagle.training.data import Example, compute_features, load_shards
from neuron_peagle.training.objective import cod_elements, first_response_prediction, parallel_logits
from neuron_peagle.training.prompt_sets import load_prompts

HELDOUT_DIR = "heldout_features"
CONFIDENCE_EDGES = (0.0, 0.5, 0.9, 1.0)  # bands of the target's top-1 probability
CONFIDENCE_BANDS = tuple(zip(CONFIDENCE_EDGES, CONFIDENCE_EDGES[1:]))  # ((lo, hi), ...)


@dataclass(frozen=True)
class DepthAccuracy:
    domain: str
    accuracy: tuple[float, ...]  # [depths] top-1 agreement with the target's greedy token
    positions: int  # response positions scored at depth 0
    # per band of CONFIDENCE_EDGES: (share of the depth-0 positions, depth-0 accuracy there)
    by_confidence: tuple[tuple[float, float], ...] = ()
    vocab_coverage: float = 1.0  # share of the depth-0 positions whose target token is in the draft vocabulary

    @property
    def estimated_acceptance_length(self) -> float:
        total, chain = 1.0, 1.0
        for a in self.accuracy:
            chain *= a
            total += chain
        return total


def build_heldout(make_engine: Callable[[], Any], target: TargetModel, out_dir: Path,
                  per_domain: dict[str, int], max_new_tokens: int) -> Path:
    """The target's greedy responses to the first held-out prompts of each domain, and its features
    on them (written once, by the plain engine `make_engine` returns; delete `out_dir` to rebuild)."""
    from neuron_peagle.runtime.engine import SamplingParams

    if (out_dir / "domains.json").is_file():
        return out_dir
    engine = make_engine()
    heldout = load_prompts("heldout")
    examples = []
    for domain, count in per_domain.items():
        ids = [engine.encode(p.text) for p in heldout if p.domain == domain][:count]
        outputs = engine.generate(ids, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))
        examples += [Example(domain, i, o.output_ids) for i, o in zip(ids, outputs)]
    compute_features(target, examples, out_dir)
    # Written last, whole: its presence says the set is complete.
    atomic_write_text(out_dir / "domains.json", json.dumps([e.domain for e in examples]))
    return out_dir


@torch.no_grad()
def heldout_accuracy(drafter: Drafter, target: TargetModel, heldout_dir: Path, depths: int
                     ) -> list[DepthAccuracy]:
    """Per domain: the drafter's teacher-forced top-1 agreement with the target at each depth."""
    domains = json.loads((heldout_dir / "domains.json").read_text())
    examples = load_shards(sorted(heldout_dir.glob("shard_*.safetensors")))
    draft_ids = draft_target_ids(drafter.d2t)
    head = target.lm_head.weight  # [vocab, H]
    in_draft_vocab = torch.zeros(head.shape[0], dtype=torch.bool)  # [vocab]
    in_draft_vocab[draft_ids] = True
    results = []
    for domain in dict.fromkeys(domains):
        correct, count = torch.zeros(depths), torch.zeros(depths)
        bands = len(CONFIDENCE_BANDS)
        band_correct, band_count = torch.zeros(bands), torch.zeros(bands)
        covered = 0
        for example, where in zip(examples, domains):
            if where != domain:
                continue
            ids = example["ids"].long()
            length, response_start = len(ids), int(example["prompt_length"])
            top = torch.softmax(F.linear(target.norm(example["hidden"].to(head.dtype)), head), dim=-1).max(-1)
            greedy, sure = top.indices, top.values  # [T] the target's token and its probability
            elements = cod_elements(length - 1, depths, length - 1, torch.Generator(), ratio=1.0, ratio_min=1.0)
            drafts = draft_ids[parallel_logits(drafter, target.embed_tokens, ids,
                                               example["features"].to(head.dtype), elements).argmax(-1)]
            at = elements.anchors + 1 + elements.depths  # the position whose next token is drafted
            scored = at >= first_response_prediction(response_start)
            hit = (drafts == greedy[at]) & scored
            for d in range(depths):
                here = (elements.depths == d) & scored
                correct[d] += hit[here].sum()
                count[d] += here.sum()
            first = (elements.depths == 0) & scored
            covered += int(in_draft_vocab[greedy[at[first]]].sum())
            band = torch.bucketize(sure[at[first]], torch.tensor(CONFIDENCE_EDGES[1:-1]))
            band_correct += torch.bincount(band, weights=hit[first].float(), minlength=bands)
            band_count += torch.bincount(band, minlength=bands)
        accuracy = tuple((correct / count.clamp(min=1)).tolist())
        by_confidence = tuple(zip((band_count / count[0].clamp(min=1)).tolist(),
                                  (band_correct / band_count.clamp(min=1)).tolist()))
        results.append(DepthAccuracy(domain, accuracy, int(count[0]), by_confidence,
                                     covered / max(int(count[0]), 1)))
    return results


def format_accuracy(name: str, results: Sequence[DepthAccuracy]) -> str:
    def bands(r: DepthAccuracy) -> str:
        return ", ".join(f"p{lo:g}-{hi:g} {share:.0%} of tokens at {acc:.2f}" for (lo, hi), (share, acc)
                         in zip(CONFIDENCE_BANDS, r.by_confidence))

    cells = [f"{r.domain}: {' '.join(f'{a:.2f}' for a in r.accuracy)} (est. AL {r.estimated_acceptance_length:.2f}; "
             f"draft vocabulary covers {r.vocab_coverage:.1%}; depth 0 where the target is sure: {bands(r)})" for r in results]
    return f"{name}: " + "; ".join(cells)
