"""Run by tests/test_tensor_parallel.py under `torchrun --nproc-per-node N`: one rank of a tensor-
parallel engine. Rank 0 prints one JSON line; a failed check exits non-zero with its message.

    tp_worker.py shards MODEL_DIR                       each rank checks the shards it holds
    tp_worker.py generate MODEL_DIR DRAFTER_DIR BACKEND [CASE ...]  token ids of each case (default: all of
                                                                 tp_cases.CASES)
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
from tp_cases import CASES, generate_case  # noqa: E402

from neuron_peagle.models.target import TargetModel  # noqa: E402
from neuron_peagle.parallel import TensorParallel, exit_rank, shutdown  # noqa: E402


def check_shards(model_dir: Path) -> dict:
    """Every rank's q/k/v, gate/up, o and down shards are the slices of the Hugging Face tensors its
    heads and width select (KV heads replicated where there are fewer than ranks)."""
    tp = TensorParallel.from_process_group(int(os.environ["WORLD_SIZE"]))
    degree = tp.degree
    model = TargetModel.from_pretrained(model_dir, 64, tp=tp)
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
            got = module.weight.to_local()
            if not torch.equal(got, want.float()):
                raise SystemExit(f"rank {tp.rank} layer {i} {name}: shard {tuple(got.shape)} is not the expected slice")
        if (attn.num_heads, attn.num_kv_heads) != (nh, len(kv)):
            raise SystemExit(f"rank {tp.rank}: {attn.num_heads} heads / {attn.num_kv_heads} KV heads")
    if model.new_cache(1).layer(0)[0].shape[1] != len(kv):
        raise SystemExit(f"rank {tp.rank}: KV cache does not hold {len(kv)} heads")
    if c.tie_word_embeddings and model.lm_head.weight is not model.embed_tokens.weight:
        raise SystemExit("the LM head is not the whole embedding")
    return {"rank": tp.rank, "kv_heads": list(kv)}


def main() -> None:
    task, model_dir = sys.argv[1], Path(sys.argv[2])
    if task == "shards":
        result = check_shards(model_dir)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        result = gathered
    else:
        drafter_dir, backend, names = Path(sys.argv[3]), sys.argv[4], sys.argv[5:] or list(CASES)
        degree = int(os.environ["WORLD_SIZE"])
        result = {name: generate_case(model_dir, drafter_dir, CASES[name], backend, degree) for name in names}
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    shutdown()
    exit_rank(0)


if __name__ == "__main__":
    main()
