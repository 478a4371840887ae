"""Tensor parallelism with DTensor (neuron_peagle.parallel) on CPU: two and three processes under
torchrun (gloo), each holding its share of every decoder layer's heads and MLP width, decode exactly
the tokens one process holding all of it does: eagerly and compiled with inductor, plain and P-EAGLE
with context lookup and the n-gram datastore, greedy and sampled with a seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_tiny_model
from neuron_peagle.cli import main as cli_main
from neuron_peagle.config import DrafterConfig, ModelConfig
from neuron_peagle.datastore import DATASTORE_FILE, DatastoreConfig, build_entries, save_datastore
from neuron_peagle.errors import ConfigError
from neuron_peagle.models.drafter_io import save_drafter
from neuron_peagle.models.target import TargetModel, default_feature_layers
from neuron_peagle.parallel import TensorParallel
from neuron_peagle.runtime.drafter_choice import random_drafter
from tp_cases import CASES, GREEDY, PROMPTS, generate_case
from spec_helpers import make_engine

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "tp_worker.py"
# The command line's tensor parallelism, on the eager backend.
SHAPES = ["--max-length", "96", "--prefill-buckets", "16,32", "--max-new-tokens", "24", "--batch-size", "2", "--json",
          "--no-chat-template", "--backend", "eager"]
TEXT_PROMPTS = ["Write a haiku about the sea.", "List three prime numbers.", "Hi"]


def _torchrun(ranks: int, *args: str, timeout: int = 1200) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *args]
    # One thread and no compile workers per rank: the ranks share the machine's cores.
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def tp_model(tmp_path_factory):
    """A 64-token random target whose 6 query heads and width 96 split over 2 and 3 ranks and whose one
    KV head is replicated on every rank, a random drafter, and a datastore of the target's answers."""
    root = tmp_path_factory.mktemp("tp_model")
    model_dir = save_tiny_model(root / "model", "llama", vocab_size=64, seed=7, num_hidden_layers=2, hidden_size=96,
                                num_attention_heads=6, num_key_value_heads=1, head_dim=16, intermediate_size=96)
    target = ModelConfig.from_dir(model_dir)
    drafter = DrafterConfig.for_target(target, default_feature_layers(target.num_hidden_layers), draft_vocab_size=64,
                                       intermediate_size=128)
    drafter_dir = save_drafter(random_drafter(drafter, 128, seed=3), root / "drafter")
    answers = generate_case(model_dir, drafter_dir, CASES["plain greedy"], "eager")
    config = DatastoreConfig(max_order=3, min_order=2, min_count=1)
    save_datastore(build_entries([p + a for p, a in zip(PROMPTS, answers)], config), drafter_dir / DATASTORE_FILE,
                   64, config, "test")
    want = {name: generate_case(model_dir, drafter_dir, case, "eager") for name, case in CASES.items()}
    return model_dir, drafter_dir, want


@pytest.mark.parametrize("ranks, cases", [(2, list(CASES)), (3, [name for name in CASES if "P-EAGLE" in name])])
def test_ranks_compiled_with_inductor_decode_what_one_process_does(tp_model, ranks, cases):
    model_dir, drafter_dir, want = tp_model
    got = json.loads(_torchrun(ranks, str(WORKER), "generate", str(model_dir), str(drafter_dir), "inductor", *cases))
    assert sorted(got) == sorted(cases)
    for name in cases:
        assert got[name] == want[name], name
    assert got["P-EAGLE + lookup + datastore, greedy"] == want["plain greedy"]  # lossless, sharded too


@pytest.mark.parametrize("ranks", [2, 3])
def test_each_rank_holds_the_slices_of_its_heads_and_width(tp_model, ranks):
    model_dir, _, _ = tp_model
    ranks_report = json.loads(_torchrun(ranks, str(WORKER), "shards", str(model_dir)))
    assert [r["rank"] for r in ranks_report] == list(range(ranks))
    assert all(r["kv_heads"] == [0] for r in ranks_report)  # the one KV head, replicated


def test_two_ranks_on_the_command_line_decode_what_one_process_does(tiny_llama_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in TEXT_PROMPTS))
    common = ["generate", "--prompts-file", str(prompts), "--model", str(tiny_llama_dir), *SHAPES, "--mode", "parallel",
              "-k", "3", "--lookup-ngram", "2"]
    # Sampled at one fixed K (a K chosen by measured cost would draw its uniforms per the times each run
    # measured). Sharded logits differ from one process's by rounding (up to ~6e-6 here): top-k keeps the
    # random model's near-uniform distribution from putting a draw within that of a boundary.
    sampled = [*common, "--plain-step", "off", "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--seed", "4"]
    # Greedy with K chosen per step among 3 and 0: every rank must run the same step graph each step (the
    # ranks agree on the measured times), or their all-reduces would not meet.
    greedy = [*common, "--plain-step", "on"]
    for argv in (sampled, greedy):
        assert cli_main(argv) == 0
        want = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        out = _torchrun(2, "-m", "neuron_peagle.cli", *argv, "--tp-degree", "2")
        got = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert len(got) == len(TEXT_PROMPTS)  # rank 0 alone prints
        assert [r["output_ids"] for r in got] == [r["output_ids"] for r in want]


def test_kv_heads_split_or_replicate_by_rank():
    assert [list(TensorParallel(2, r).kv_heads(4)) for r in range(2)] == [[0, 1], [2, 3]]
    assert [list(TensorParallel(4, r).kv_heads(2)) for r in range(4)] == [[0], [0], [1], [1]]
    with pytest.raises(ConfigError, match=r"key-value heads \(2\) neither divide by tp_degree 3 nor divide it"):
        TensorParallel(3, 0).kv_heads(2)


def test_a_degree_that_does_not_divide_is_refused_before_any_work(tiny_llama_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(TargetModel, "from_pretrained", refuse)
    with pytest.raises(ConfigError, match=r"attention heads \(4\) is not divisible by tp_degree 3"):
        make_engine(tiny_llama_dir, mode="plain", tp_degree=3)
    with pytest.raises(ConfigError, match="tp_degree must be >= 1"):
        TensorParallel(0)
    with pytest.raises(ConfigError, match="runs on backends eager, inductor, neuron, not on 'xla'"):
        make_engine(tiny_llama_dir, mode="plain", backend="xla", tp_degree=2)
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    code = ("import sys; from neuron_peagle.parallel import TensorParallel\n"
            "try:\n    TensorParallel.from_process_group(2)\nexcept Exception as err:\n    print(err); sys.exit(3)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 3 and "torchrun --nproc-per-node 2" in result.stdout


def test_greedy_cases_are_nontrivial(tp_model):
    _, _, want = tp_model
    assert len({tuple(ids) for ids in want["plain greedy"]}) == len(PROMPTS)
    assert all(len(ids) == GREEDY.max_new_tokens for ids in want["plain greedy"])
