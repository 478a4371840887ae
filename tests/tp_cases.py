"""The generations tensor parallelism must reproduce: plain decoding, and P-EAGLE with context lookup
and the n-gram datastore, greedy and sampled with a seed (shared by the test and its torchrun worker)."""

from __future__ import annotations

from pathlib import Path

from neuron_peagle.runtime.engine import SamplingParams
from spec_helpers import make_engine

PROMPTS = [[4, 7, 12], [20, 21, 22, 23], [5, 7, 13, 5, 7]]
SHAPES = dict(max_length=96, prefill_buckets=(16,), batch_size=2)
SPEC = dict(mode="parallel", num_speculative_tokens=4, lookup_ngram=2, datastore=True)
GREEDY = SamplingParams(max_new_tokens=30, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=30, ignore_eos=True, temperature=0.9, top_k=20, seed=11)
CASES = {
    "plain greedy": (dict(mode="plain"), GREEDY),
    "P-EAGLE + lookup + datastore, greedy": (SPEC, GREEDY),
    "P-EAGLE + lookup + datastore, sampled": (SPEC, SAMPLED),
}
# Mixture-of-experts targets (expert parallelism): the drafter alone drafts, no lookup.
MOE_CASES = {
    "plain greedy": (dict(mode="plain"), GREEDY),
    "P-EAGLE, greedy": (dict(mode="parallel", num_speculative_tokens=3, lookup_ngram=0), GREEDY),
}


def generate_case(model_dir: Path, drafter_dir: Path, case: tuple[dict, SamplingParams], backend: str,
                  tp_degree: int = 1) -> list[list[int]]:
    options, params = case
    engine = make_engine(model_dir, drafter_dir if options["mode"] != "plain" else None, backend=backend,
                                    tp_degree=tp_degree, **SHAPES, **options)
    return [out.output_ids for out in engine.generate(PROMPTS, params)]
