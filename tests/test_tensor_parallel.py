"""Tensor parallelism (neuron_peagle.parallel) on CPU: two processes under torchrun, each holding half
of every decoder layer's heads and MLP width, decode the tokens one process holding all of it does,
in plain decoding and in P-EAGLE speculative decoding with context lookup, greedy and sampled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neuron_peagle.cli import main as cli_main
from neuron_peagle.errors import ConfigError
from neuron_peagle.models.target import TargetModel
from neuron_peagle.parallel import TensorParallel
from neuron_peagle.runtime.engine import Engine

REPO = Path(__file__).resolve().parent.parent
# Tensor parallelism runs on the eager backend (the command line's default is inductor).
SHAPES = ["--max-length", "96", "--buckets", "16,32", "--max-new-tokens", "24", "--batch-size", "2", "--json",
          "--no-chat-template", "--backend", "eager"]
PROMPTS = ["Write a haiku about the sea.", "List three prime numbers.", "Hi"]


def _cli_json(argv: list[str], capsys) -> list[dict]:
    assert cli_main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tp") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


CASES = {
    "plain greedy": ["--mode", "plain"],
    "parallel greedy, lookup": ["--mode", "parallel", "-k", "3", "--lookup-ngram", "2"],
    "parallel sampled": ["--mode", "parallel", "-k", "3", "--temperature", "0.8", "--top-p", "0.9", "--seed", "4"],
}


def test_two_ranks_decode_what_one_process_does(tiny_llama_dir, prompts_file, capsys):
    for name, options in CASES.items():
        argv = ["generate", "--prompts-file", str(prompts_file), "--model", str(tiny_llama_dir), *SHAPES, *options]
        want = _cli_json(argv, capsys)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "neuron_peagle.cli", *argv, "--tp-degree", "2"]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-4000:]
        got = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        assert len(got) == len(PROMPTS), result.stdout  # rank 0 alone prints
        assert [r["output_ids"] for r in got] == [r["output_ids"] for r in want], name
        assert all(len(r["output_ids"]) == 24 for r in got)


def test_a_rank_holds_its_share_of_every_layer(tiny_llama_dir):
    whole = TargetModel.from_pretrained(tiny_llama_dir, 64)
    halves = [TargetModel.from_pretrained(tiny_llama_dir, 64, tp=TensorParallel(2, rank)) for rank in (0, 1)]
    attn, mlp = whole.layers[1].self_attn, whole.layers[1].mlp
    nh, nkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = attn.qkv_proj.weight.split([nh * hd, nkv * hd, nkv * hd], dim=1)
    for rank, half in enumerate(halves):
        shard = half.layers[1].self_attn
        assert (shard.num_heads, shard.num_kv_heads) == (nh // 2, nkv // 2)
        q_r, k_r, v_r = shard.qkv_proj.weight.split([nh // 2 * hd, nkv // 2 * hd, nkv // 2 * hd], dim=1)
        assert torch.equal(q_r, q.chunk(2, dim=1)[rank]) and torch.equal(k_r, k.chunk(2, dim=1)[rank])
        assert torch.equal(v_r, v.chunk(2, dim=1)[rank])
        assert torch.equal(shard.o_proj.weight, attn.o_proj.weight.chunk(2, dim=0)[rank])
        assert torch.equal(half.layers[1].mlp.down_proj.weight, mlp.down_proj.weight.chunk(2, dim=0)[rank])
        assert half.new_cache(1).layer(0)[0].shape[1] == nkv // 2
        assert torch.equal(half.lm_head.weight, whole.lm_head.weight)  # the LM head stays whole


def test_tensor_parallel_errors_name_the_problem(tiny_llama_dir):
    with pytest.raises(ConfigError, match=r"key-value heads \(2\) is not divisible by tp_degree 4"):
        TargetModel.from_pretrained(tiny_llama_dir, 64, tp=TensorParallel(4, 0))
    with pytest.raises(ConfigError, match="tp_degree must be >= 1"):
        TensorParallel(0)
    with pytest.raises(ConfigError, match="runs on the eager backend so far, not on 'xla'"):
        Engine.from_pretrained(tiny_llama_dir, mode="plain", backend="xla", tp_degree=2)
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    code = ("import sys; from neuron_peagle.parallel import TensorParallel\n"
            "try:\n    TensorParallel.from_process_group(2)\nexcept Exception as err:\n    print(err); sys.exit(3)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 3 and "torchrun --nproc-per-node 2" in result.stdout
