"""Run by tests/test_tensor_parallel.py under `torchrun --nproc-per-node N`: one rank of a tensor-
parallel engine. Rank 0 prints one JSON line; a failed check exits non-zero with its message.

    tp_worker.py shards MODEL_DIR                       each rank checks the shards it holds
    tp_worker.py generate MODEL_DIR DRAFTER_DIR BACKEND [CASE ...]  token ids of each case (default: all of
                                                                 tp_cases.CASES)
    tp_worker.py moe MODEL_DIR DRAFTER_DIR BACKEND        each MOE_CASES case's token ids, and what each rank
                                                         holds (experts, parameter counts)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tp_cases import CASES, MOE_CASES, generate_case  # noqa: E402

from neuron_peagle.models.target import TargetModel  # noqa: E402
from neuron_peagle.parallel import TensorParallel, exit_rank, shutdown  # noqa: E402


def check_shards(model_dir: Path) -> dict:
    """Every rank's q/k/v, gate/up, o and down shards are the slices of the Hugging Face tensors its
    heads and width select (KV heads replicated where there are fewer than ranks)."""
    tp = TensorParallel.from_process_group(int(os.environ["WORLD_SIZE"]))
    degree = tp.degree
    model = TargetModel.from_pretrained(model_dir, 64, shard=tp.shard)
    hf = load_file(str(model_dir / "model.safetensors"))
    c = model.config
    nh, hd, width = c.num_attention_heads // degree, c.head_dim, c.intermediate_size // degree
    kv = tp.kv_heads(c.num_key_value_heads)
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        q = hf[prefix + "self_attn.q_proj.weight"][tp.rank * nh * hd:(tp.rank + 1) * nh * hd]
        k = hf[prefix + "self_attn.k_proj.weight"][kv.start * hd:kv.stop * hd]
        v = hf[prefix + "self_attn.v_proj.weight"][kv.start * hd:kv.stop * hd]
        gate = hf[prefix + "mlp.gate_proj.weight"][tp.rank * width:(tp.rank + 1) * width]
        up = hf[prefix + "mlp.up_proj.weight"][tp.rank * width:(tp.rank + 1) * width]
        o = hf[prefix + "self_attn.o_proj.weight"][:, tp.rank * nh * hd:(tp.rank + 1) * nh * hd]
        down = hf[prefix + "mlp.down_proj.weight"][:, tp.rank * width:(tp.rank + 1) * width]
        attn, mlp = layer.self_attn, layer.mlp
        expected = {"qkv": (attn.qkv_proj, torch.cat([q, k, v])), "gate_up": (mlp.gate_up_proj, torch.cat([gate, up])),
                    "o": (attn.o_proj, o), "down": (mlp.down_proj, down)}
        for name, (module, want) in expected.items():
            got = module.weight
            if not torch.equal(got, want.float()):
                raise SystemExit(f"rank {tp.rank} layer {i} {name}: shard {tuple(got.shape)} is not the expected slice")
        if (attn.num_heads, attn.num_kv_heads) != (nh, len(kv)):
            raise SystemExit(f"rank {tp.rank}: {attn.num_heads} heads / {attn.num_kv_heads} KV heads")
    if model.new_cache(1).layer(0)[0].shape[1] != len(kv):
        raise SystemExit(f"rank {tp.rank}: KV cache does not hold {len(kv)} heads")
    if c.tie_word_embeddings and model.lm_head.weight is not model.embed_tokens.weight:
        raise SystemExit("the LM head is not the whole embedding")
    return {"rank": tp.rank, "kv_heads": list(kv)}


def held_by_rank(model_dir: Path) -> dict:
    """What this rank's sharded target holds: each layer's experts (global indices), its expert and other
    parameters' element counts, and the expert weights compared with the checkpoint's slices."""
    tp = TensorParallel.from_process_group(int(os.environ["WORLD_SIZE"]))
    model = TargetModel.from_pretrained(model_dir, 64, shard=tp.shard)
    experts = [layer.mlp.experts for layer in model.layers]
    expert_params = sum(p.numel() for e in experts for p in e.parameters())
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    whole = TargetModel.from_pretrained(model_dir, 64)
    for layer, mine in zip(whole.layers, experts):
        for name, param in mine.named_parameters():
            want = getattr(layer.mlp.experts, name)[mine.held.start:mine.held.stop]
            if not torch.equal(param, want):
                raise SystemExit(f"rank {tp.rank}: experts.{name} is not experts {mine.held} of the whole model")
    return {"rank": tp.rank, "experts": [[e.held.start, e.held.stop] for e in experts],
            "expert_params": expert_params, "params": total,
            "whole_expert_params": sum(p.numel() for layer in whole.layers for p in layer.mlp.experts.parameters())}


def main() -> None:
    task, model_dir = sys.argv[1], Path(sys.argv[2])
    if task in ("shards", "moe"):
        if task == "moe":
            drafter_dir, backend = Path(sys.argv[3]), sys.argv[4]
            tokens = {name: generate_case(model_dir, drafter_dir, case, backend, dist.get_world_size() if
                                          dist.is_initialized() else int(os.environ["WORLD_SIZE"]))
                      for name, case in MOE_CASES.items()}
        result = check_shards(model_dir) if task == "shards" else held_by_rank(model_dir)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        result = gathered if task == "shards" else {"ranks": gathered, "tokens": tokens}
    else:
        drafter_dir, backend, names = Path(sys.argv[3]), sys.argv[4], sys.argv[5:] or list(CASES)
        degree = int(os.environ["WORLD_SIZE"])
        cases = {**MOE_CASES, **CASES}  # "plain greedy" is the same case in both
        result = {name: generate_case(model_dir, drafter_dir, cases[name], backend, degree) for name in names}
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    shutdown()
    exit_rank(0)


if __name__ == "__main__":
    main()
