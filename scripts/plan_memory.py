"""On paper: bytes per rank of the models the published P-EAGLE drafters serve, from their real config.json
files (scripts/model_configs/, as published on the Hugging Face Hub), counted from the meta model with the
parallel plan applied (neuron_peagle.memory: parameters' numel, no weights read), against the HBM a rank
has on trn2.

A trn2 chip has 96 GiB of HBM and 8 physical NeuronCores; at the default LNC=2 that is 4 ranks of about
24 GiB each (before the runtime's own use, compiled graphs and scratch), 64 ranks on a trn2.48xlarge.

    python -m scripts.plan_memory [--batch-size 8] [--max-length 8192] [--drafter-layers 4]

The drafter counted beside each target is shaped like its target's layers with `--drafter-layers` layers
and a 32000-token draft vocabulary (an assumption: the published drafters' files are not read here).
gpt-oss's MXFP4 experts count in bf16, as the loader dequantizes them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neuron_peagle import memory
from neuron_peagle.config import BuildConfig, DrafterConfig, ModelConfig
from neuron_peagle.errors import ConfigError
from neuron_peagle.models.target import default_feature_layers
from neuron_peagle.parallel import TensorParallel

CONFIGS = Path(__file__).resolve().parent / "model_configs"
RANK_HBM = 24 * 2**30  # trn2, LNC=2: 96 GiB per chip / 4 logical cores
PLANS = {"gpt-oss-20b": (1, 4, 8), "gpt-oss-120b": (16, 32, 64), "Qwen3-Coder-30B-A3B-Instruct": (1, 2, 4, 8),
         "Qwen3-8B": (1, 2, 4, 8)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--drafter-layers", type=int, default=4)
    args = parser.parse_args(argv)
    build = BuildConfig(batch_size=args.batch_size, max_length=args.max_length, prefill_buckets=(128, 512),
                        dtype="bfloat16")
    gib = 2**30
    print(f"batch {args.batch_size}, max_length {args.max_length}, bf16; a rank has {RANK_HBM / gib:.0f} GiB of HBM "
          "(trn2, LNC=2)\n")
    print("| model | parameters | ranks | weights / rank (GiB) | KV caches / rank (GiB) | total / rank (GiB) | fits |")
    print("|---|---|---|---|---|---|---|")
    for name, degrees in PLANS.items():
        config = ModelConfig.from_hf_dict(json.loads((CONFIGS / f"{name}.json").read_text()), f"{name}.json")
        drafter = DrafterConfig.for_target(config, default_feature_layers(config.num_hidden_layers),
                                           num_layers=args.drafter_layers, draft_vocab_size=32000)
        whole = memory.meta_target(config, build)
        params = sum(p.numel() for p in {id(p): p for p in whole.parameters()}.values())
        for ranks in degrees:
            try:
                need = memory.estimate(config, build, drafter, TensorParallel(ranks))
            except ConfigError as err:
                print(f"| {name} | {params / 1e9:.1f}B | {ranks} | - | - | - | no: {err} |")
                continue
            on_device = need.weights + need.kv_cache
            print(f"| {name} | {params / 1e9:.1f}B | {ranks} | {need.weights / gib:.1f} | {need.kv_cache / gib:.2f} "
                  f"| {on_device / gib:.1f} | {'yes' if on_device <= RANK_HBM else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
