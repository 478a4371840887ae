"""On a trn2/trn3 instance with TorchNeuron (the `neuron` extra, Python 3.12-3.14): the checks of the
`--backend neuron` path that only the hardware can make. Marked `neuron`; they skip where torch_neuronx
cannot be imported (every machine here), and `make trn-check` runs them first on a trn instance.

- every graph compiled with `torch.compile(backend="neuron")`, the NKI kernels inside at the runtime's LNC,
  gives the tokens the CPU eager engine gives;
- a second process starting from the artifacts loads every graph from the NEFF cache: no new NEFF;
- tensor parallelism with 2 ranks on the neuron process group decodes what one CPU process decodes;
- the NKI kernels on the device match their PyTorch references.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neuron_peagle.runtime.engine import SamplingParams
from spec_helpers import make_engine

pytestmark = pytest.mark.neuron

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [[4, 7, 12, 99], [20, 21, 22, 23, 24, 25], [5, 7, 13, 5, 7]]
SHAPES = dict(batch_size=2, max_length=96, prefill_buckets=(16, 32))
SPEC = dict(mode="parallel", num_speculative_tokens=3, lookup_ngram=0, datastore=False)
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def torchneuron():
    return pytest.importorskip("torch_neuronx")


@pytest.fixture(scope="module")
def drafter_dir(tiny_llama_dir, tmp_path_factory):
    from neuron_peagle.config import DrafterConfig, ModelConfig
    from neuron_peagle.models.drafter_io import save_drafter
    from neuron_peagle.models.target import default_feature_layers
    from neuron_peagle.runtime.drafter_choice import random_drafter

    target = ModelConfig.from_dir(tiny_llama_dir)
    config = DrafterConfig.for_target(target, default_feature_layers(target.num_hidden_layers))
    return save_drafter(random_drafter(config, 96, seed=3), tmp_path_factory.mktemp("neuron_drafter") / "drafter")


def _tokens(engine) -> list[list[int]]:
    return [out.output_ids for out in engine.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("mode", ["plain", "parallel"])
def test_every_graph_compiled_for_the_neuron_device_gives_the_eager_tokens(torchneuron, tiny_llama_dir, drafter_dir,
                                                                          mode):
    from neuron_peagle.lnc import runtime_lnc

    options = SPEC if mode == "parallel" else dict(mode="plain")
    drafter = drafter_dir if mode == "parallel" else None
    want = _tokens(make_engine(tiny_llama_dir, drafter, **SHAPES, **options, backend="eager"))
    engine = make_engine(tiny_llama_dir, drafter, **SHAPES, **options, backend="neuron")
    assert engine.build.kernels == "nki" and engine.build.lnc == runtime_lnc()
    assert len(engine.warm()) == engine.backend.compile_count()  # every planned graph compiled, once
    assert _tokens(engine) == want
    assert engine.backend.compile_count() == len(engine.warm())  # generation compiled nothing more


def test_a_second_process_loads_every_graph_from_the_neff_cache(torchneuron, tiny_llama_dir, drafter_dir, tmp_path):
    out = tmp_path / "artifacts"
    build = [sys.executable, "-m", "compile.build", "--backend", "neuron", "--model", str(tiny_llama_dir),
             "--drafter", str(drafter_dir), "--out", str(out), "--batch-size", "2", "--max-length", "96", "--prefill-buckets", "16,32",
             "--mode", "parallel", "-k", "3", "--lookup-ngram", "0", "--datastore", "off"]
    result = subprocess.run(build, capture_output=True, text=True, cwd=REPO, timeout=7200)
    assert result.returncode == 0, result.stderr[-4000:]
    cache = out / "compile_cache"
    before = {p: p.stat().st_mtime for p in cache.rglob("*") if p.is_file()}
    assert before, "the build wrote no NEFF into the artifacts' cache"
    run = [sys.executable, "-m", "neuron_peagle.cli", "generate", "Write a haiku.", "--artifacts", str(out),
           "--no-chat-template", "--max-new-tokens", "16", "--ignore-eos", "--json"]
    result = subprocess.run(run, capture_output=True, text=True, cwd=REPO, timeout=3600)
    assert result.returncode == 0, result.stderr[-4000:]
    after = {p: p.stat().st_mtime for p in cache.rglob("*") if p.is_file()}
    assert after == before  # nothing compiled: every NEFF came from the cache


def test_two_ranks_on_the_neuron_process_group_decode_what_one_cpu_process_does(torchneuron, tiny_llama_dir,
                                                                               drafter_dir):
    from tp_cases import MOE_CASES, generate_case

    case = "P-EAGLE, greedy"
    want = generate_case(tiny_llama_dir, drafter_dir, MOE_CASES[case], "eager")
    worker = Path(__file__).resolve().parent / "tp_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker),
           "generate", str(tiny_llama_dir), str(drafter_dir), "neuron", case]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=7200)
    assert result.returncode == 0, result.stderr[-4000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got[case] == want


def test_the_nki_kernels_on_the_device_match_their_references(torchneuron):
    from neuron_peagle import kernels
    from neuron_peagle.kernels import DraftInputParams
    from neuron_peagle.kernels.first_layer_input import draft_input_reference
    from neuron_peagle.kernels.lm_head import lm_head_argmax_reference
    from neuron_peagle.lnc import runtime_lnc
    from neuron_peagle.models.layers import RMSNorm

    lnc = runtime_lnc()
    g = torch.Generator().manual_seed(0)
    hidden, target_hidden, vocab, rows = 256, 128, 5000, 300  # three row tiles: both cores at LNC 2
    embeds, features = torch.randn(rows, hidden, generator=g), torch.randn(rows, 3 * target_hidden, generator=g)
    is_mask = torch.rand(rows, generator=g) < 0.4
    norm = RMSNorm(hidden, 1e-5)
    params = DraftInputParams(torch.randn(hidden, 3 * target_hidden, generator=g) / 20, torch.randn(hidden, generator=g),
                              torch.randn(hidden, generator=g), norm, norm, False)
    weight = torch.randn(vocab, hidden, generator=g) / 16
    device = torch.device("neuron")

    def on_device(t):
        return t.to(device)

    def draft_pass(embeds, features, is_mask, fc_weight, fc_mask_row, mask_embedding, weight):
        p = DraftInputParams(fc_weight, fc_mask_row, mask_embedding, norm.to(device), norm.to(device), False)
        x, residual = kernels.draft_input(embeds, features, is_mask, p, mode="nki", lnc=lnc)
        ids, best = kernels.lm_head_argmax(x[..., hidden:].contiguous(), weight, None, mode="nki", lnc=lnc)
        return x, residual, ids, best

    compiled = torch.compile(draft_pass, backend="neuron", fullgraph=True, dynamic=False)
    x, residual, ids, best = (t.cpu() for t in compiled(*map(on_device, (
        embeds, features, is_mask, params.fc_weight, params.fc_mask_row, params.mask_embedding, weight))))
    want_x, want_residual = draft_input_reference(embeds, features, is_mask, params)
    torch.testing.assert_close(x, want_x, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(residual, want_residual, rtol=2e-3, atol=2e-3)
    want_ids, want_best = lm_head_argmax_reference(want_x[..., hidden:], weight)
    assert (ids == want_ids).float().mean() > 0.99  # float32 sums in another order: near-ties may flip
    torch.testing.assert_close(best, want_best, rtol=2e-3, atol=2e-3)
