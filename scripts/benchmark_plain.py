"""Plain greedy decoding on CPU: our eager engine against transformers' generate and the memory floor.

Usage: python -m scripts.benchmark_plain [--max-new-tokens 128] [--repeats 3] [--batch-sizes 1,8]
                                         [--max-length 1024] [--threads N] [--out bench_out/plain.json]

One run measures, on the same chat-templated prompts, every row generating exactly max_new_tokens
(EOS ignored, so every system does the same work):
  1. our plain greedy decode (`Engine`, mode "plain", eager backend) at each batch size;
  2. transformers' `generate(do_sample=False)` on the same token ids (left padding for batches);
  3. the machine floor: weight bytes streamed per decode step / measured copy bandwidth, plus the
     bandwidth our decode-shaped matmuls (and transformers' `F.linear` ones) actually reach;
  4. where a batch-1 decode step of ours spends its time (per-module timers on a few steps).

Decode tokens/s never include prefill. Both systems are timed the same way: from the moment the first
new token exists (end of our prefill; transformers' streamer receiving its first token) to the moment
the last one does, i.e. the wall time of the decode loop, host work included. That loop makes
max_new_tokens - 1 tokens per row. At batch 1 a repeat's figure is the median over prompts; at a larger
batch it is all rows' decoded tokens / the loop's wall time. Each repeat runs every system once, in
turn, so slow drifts in machine load hit all of them alike; the tables report medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from neuron_peagle.files import atomic_path, atomic_write_text
from neuron_peagle.models.layers import RMSNorm
from neuron_peagle.runtime.engine import Engine, SamplingParams
from neuron_peagle.speculation import SpeculationConfig

PROMPTS = (
    "Explain to a ten-year-old why the sky is blue during the day and red at sunset.",
    "Write a short, friendly email to a colleague asking to move our Thursday meeting to Friday.",
    "What are three practical tips for sleeping better when working night shifts?",
    "Write a Python function `merge_intervals(intervals)` that merges overlapping intervals and "
    "returns them sorted. Include a docstring and two examples.",
    "Here is a JavaScript snippet:\n\nfunction sum(xs) { let t = 0; for (let i = 0; i <= xs.length; i++) "
    "t += xs[i]; return t; }\n\nFind the bug and show the corrected code.",
    "Write a SQL query that returns, for each customer, their total order amount in 2023, from tables "
    "customers(id, name) and orders(id, customer_id, amount, created_at).",
    "A train leaves at 9:40 and arrives at 13:15. How long is the journey in minutes? Show your steps.",
    "Solve for x: 3x + 7 = 2x - 5, then check the answer by substituting it back.",
)

HF_LINEAR_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def median(values) -> float:
    return statistics.median(values)


# ---- 1. our engine ---------------------------------------------------------------------------------

class LoopClock:
    """Timestamps the end of prefill and of every decode step of one engine's runner.

    Installed as instance attributes, so the engine's code is untouched; the host loop calls them as
    it would the runner's own methods."""

    def __init__(self, runner) -> None:
        self.prefill_end = 0.0
        self.last_step_end = 0.0
        self.step_time = 0.0  # inside runner.step(), summed over steps
        self.steps = 0
        self.in_prefill = False
        prefill, step = runner.prefill, runner.step

        def timed_prefill(*args, **kwargs):
            self.in_prefill = True
            out = prefill(*args, **kwargs)
            self.in_prefill = False
            self.prefill_end = time.perf_counter()
            self.last_step_end, self.step_time, self.steps = self.prefill_end, 0.0, 0
            return out

        def timed_step():
            start = time.perf_counter()
            out = step()
            self.last_step_end = time.perf_counter()
            self.step_time += self.last_step_end - start
            self.steps += 1
            return out

        runner.prefill, runner.step = timed_prefill, timed_step

    @property
    def loop_time(self) -> float:
        return self.last_step_end - self.prefill_end


def run_ours(engine: Engine, clock: LoopClock, prompt_ids: list[list[int]], params: SamplingParams) -> dict:
    """One repeat over all prompts, in groups of the engine's batch size."""
    batch = engine.build.batch_size
    groups = []
    outputs = []
    for first in range(0, len(prompt_ids), batch):
        outs = engine.generate(prompt_ids[first:first + batch], params)
        decoded = sum(o.stats.num_decoded_tokens for o in outs)
        groups.append({"decoded_tokens": decoded, "loop_time_s": clock.loop_time,
                       "tokens_per_s": decoded / clock.loop_time,
                       "stats_tokens_per_s": [o.stats.tokens_per_s for o in outs],
                       "prefill_time_s": outs[0].stats.prefill_time_s})
        outputs.extend(o.output_ids for o in outs)
    return _summarise(groups, batch, outputs)


def _summarise(groups: list[dict], batch: int, outputs: list[list[int]]) -> dict:
    if batch == 1:
        rate = median(g["tokens_per_s"] for g in groups)
    else:
        rate = sum(g["decoded_tokens"] for g in groups) / sum(g["loop_time_s"] for g in groups)
    return {"tokens_per_s": rate, "groups": groups, "output_ids": outputs}


# ---- 2. transformers -------------------------------------------------------------------------------

class FirstTokenClock:
    """A transformers streamer that only notes when tokens arrive.

    generate() puts the prompt first, then each new token as soon as it is chosen (synchronously on
    CPU), so the time from the first new token to the last is the decode loop, prefill excluded."""

    def __init__(self) -> None:
        self.puts: list[float] = []

    def put(self, value) -> None:
        self.puts.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def loop_time(self) -> float:
        return self.puts[-1] - self.puts[1]


def left_pad(prompt_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompt_ids))
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.int64)  # [B, width]
    mask = torch.zeros(len(prompt_ids), width, dtype=torch.int64)  # [B, width]
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def run_hf(model, pad_id: int, prompt_ids: list[list[int]], batch: int, new_tokens: int) -> dict:
    groups = []
    outputs = []
    for first in range(0, len(prompt_ids), batch):
        group = prompt_ids[first:first + batch]
        ids, mask = left_pad(group, pad_id)
        clock = FirstTokenClock()
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=pad_id, streamer=clock)
        decoded = len(group) * (len(clock.puts) - 2)
        groups.append({"decoded_tokens": decoded, "loop_time_s": clock.loop_time,
                       "tokens_per_s": decoded / clock.loop_time})
        outputs.extend(out[:, ids.shape[1]:].tolist())
    return _summarise(groups, batch, outputs)


# ---- 3. the floor ----------------------------------------------------------------------------------

def streamed_bytes(target, batch: int, max_length: int) -> dict:
    """Bytes one decode step of our model reads: every Linear weight (a tied LM head reads the whole
    embedding matrix; otherwise the embedding table is only indexed, one row per token), the norms, and
    the whole fixed-length KV cache, which attention reads and masks at every step."""
    linear = sum(m.weight.numel() * m.weight.element_size() + (m.bias.numel() * m.bias.element_size()
                 if m.bias is not None else 0) for m in target.modules() if isinstance(m, torch.nn.Linear))
    norms = sum(m.weight.numel() * m.weight.element_size() for m in target.modules() if isinstance(m, RMSNorm))
    embed_rows = batch * target.embed_tokens.weight[0].numel() * target.embed_tokens.weight.element_size()
    c = target.config
    kv = 2 * c.num_hidden_layers * batch * c.num_key_value_heads * max_length * c.head_dim \
        * target.embed_tokens.weight.element_size()
    return {"linear_bytes": linear, "norm_bytes": norms, "embedding_row_bytes": embed_rows,
            "weight_bytes": linear + norms + embed_rows, "kv_cache_bytes": kv}


def copy_bandwidth(samples: int, megabytes: int = 512) -> list[float]:
    """GB/s of `dst.copy_(src)` on a tensor far larger than the caches, counting read + write bytes."""
    src = torch.randn(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    rates = []
    for _ in range(samples):
        start = time.perf_counter()
        dst.copy_(src)
        rates.append(2 * src.numel() * 4 / (time.perf_counter() - start) / 1e9)
    del src, dst
    return rates


@torch.inference_mode()
def matmul_sweep(weights: list[tuple[str, torch.Tensor]], op, rounds: int) -> dict:
    """Time `op(x, W)` for a [1, in] x on each weight, in the model's order, so that (as in decode)
    a weight comes back only after the whole model has streamed through the caches."""
    per_round = []
    for r in range(rounds + 1):  # round 0 warms up
        spent: dict[str, float] = defaultdict(float)
        for kind, w in weights:
            x = torch.randn(1, w.shape[1])
            start = time.perf_counter()
            op(x, w)
            spent[kind] += time.perf_counter() - start
        if r:
            per_round.append(spent)
    table = {}
    for kind in dict.fromkeys(k for k, _ in weights):
        ws = [w for k, w in weights if k == kind]
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        seconds = median(s[kind] for s in per_round)
        table[kind] = {"shape": list(ws[0].shape), "count": len(ws), "mb_per_token": nbytes / 1e6,
                       "ms_per_token": seconds * 1e3, "gb_per_s": nbytes / seconds / 1e9}
    total_s = median(sum(s.values()) for s in per_round)
    total_bytes = sum(w.numel() * w.element_size() for _, w in weights)
    return {"kinds": table, "ms_per_token": total_s * 1e3, "gb_per_s": total_bytes / total_s / 1e9,
            "tokens_per_s_bound": 1 / total_s}


def our_linear_weights(target) -> list[tuple[str, torch.Tensor]]:
    out = []
    for layer in target.layers:
        out += [("qkv_proj", layer.self_attn.qkv_proj.weight), ("o_proj", layer.self_attn.o_proj.weight),
                ("gate_up_proj", layer.mlp.gate_up_proj.weight), ("down_proj", layer.mlp.down_proj.weight)]
    return out + [("lm_head", target.lm_head.weight)]


def hf_linear_weights(model) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, module in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and kind in HF_LINEAR_KINDS:
            out.append((kind, module.weight))
    return out


# ---- 4. where a batch-1 step goes ------------------------------------------------------------------

class PartClock:
    """Forward hooks that add up the wall time spent in modules, by category, while `active`."""

    def __init__(self, is_active) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.is_active = is_active
        self._starts: dict[int, float] = {}
        self._handles = []

    def attach(self, module, category: str) -> None:
        def before(mod, args):
            self._starts[id(mod)] = time.perf_counter()

        def after(mod, args, out):
            start = self._starts.pop(id(mod))
            if self.is_active():
                self.totals[category] += time.perf_counter() - start

        self._handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()


def step_breakdown(engine: Engine, clock: LoopClock, prompt_ids: list[int], steps: int) -> dict:
    """Split `steps` decode steps into parts: each part is a module's time less its timed children's,
    so the rows add up to the host loop's wall time (timers included, which cost a little)."""
    target = engine.runner.target
    parts = PartClock(lambda: not clock.in_prefill)
    parts.attach(engine.runner.graphs[True][1], "graph")
    parts.attach(target, "target")
    parts.attach(target.norm, "final_norm")
    parts.attach(target.lm_head, "lm_head")
    for layer in target.layers:
        parts.attach(layer, "layer")
        parts.attach(layer.input_layernorm, "norm")
        parts.attach(layer.post_attention_layernorm, "norm")
        parts.attach(layer.self_attn, "attention")
        parts.attach(layer.self_attn.qkv_proj, "qkv_proj")
        parts.attach(layer.self_attn.o_proj, "o_proj")
        parts.attach(layer.mlp, "mlp")
        parts.attach(layer.mlp.gate_up_proj, "gate_up_proj")
        parts.attach(layer.mlp.down_proj, "down_proj")
    try:
        engine.generate([prompt_ids], SamplingParams(max_new_tokens=steps + 1, ignore_eos=True))
    finally:
        parts.detach()
    t = parts.totals
    n = clock.steps
    layers = len(target.layers)
    vocab, hidden = target.lm_head.weight.shape
    rows = {
        f"linear qkv_proj (x{layers})": t["qkv_proj"],
        f"linear o_proj (x{layers})": t["o_proj"],
        f"linear gate_up_proj (x{layers})": t["gate_up_proj"],
        f"linear down_proj (x{layers})": t["down_proj"],
        f"LM head matmul [{hidden} x {vocab}]": t["lm_head"],
        "attention core (RoPE, cache scatter, QK over max_length, mask, softmax, PV)":
            t["attention"] - t["qkv_proj"] - t["o_proj"],
        "MLP activation (silu * up)": t["mlp"] - t["gate_up_proj"] - t["down_proj"],
        f"RMSNorms ({2 * layers + 1})": t["norm"] + t["final_norm"],
        "residual adds, layer glue": t["layer"] - t["attention"] - t["mlp"] - t["norm"],
        "embedding, RoPE lookup, logit gather": t["target"] - t["layer"] - t["lm_head"] - t["final_norm"],
        "argmax, graph glue": t["graph"] - t["target"],
        "runner.step host work (inputs, inference_mode)": clock.step_time - t["graph"],
        "host loop (commit, stats)": clock.loop_time - clock.step_time,
    }
    total = clock.loop_time
    return {"steps": n, "step_ms_hooked": total / n * 1e3,
            "rows": {name: {"ms_per_token": s / n * 1e3, "percent": 100 * s / total} for name, s in rows.items()}}


# ---- reporting -------------------------------------------------------------------------------------

def machine(threads: int) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "torch_threads": threads, "cpu": cpu, "torch": torch.__version__,
            "python": platform.python_version()}


def markdown(result: dict) -> str:
    cfg, floor = result["config"], result["floor"]
    lines = [f"Machine: {result['machine']['cpu']}, nproc {result['machine']['nproc']}, "
             f"torch threads {result['machine']['torch_threads']}, torch {result['machine']['torch']}; "
             f"load average (1 min) {result['load_before'][0]:.2f} before, {result['load_after'][0]:.2f} after.",
             f"{len(cfg['prompt_lengths'])} prompts ({min(cfg['prompt_lengths'])}-{max(cfg['prompt_lengths'])} "
             f"tokens), {cfg['max_new_tokens']} new tokens each, EOS ignored, float32, max_length "
             f"{cfg['max_length']}, medians of {cfg['repeats']} repeats.",
             "",
             "| system | batch | decode tokens/s (median) | per repeat | ms per step |",
             "| --- | ---: | ---: | --- | ---: |"]
    for row in result["throughput"]:
        per = ", ".join(f"{v:.1f}" for v in row["per_repeat"])
        lines.append(f"| {row['system']} | {row['batch']} | {row['tokens_per_s']:.1f} | {per} | "
                     f"{row['batch'] * 1e3 / row['tokens_per_s']:.1f} |")
    for b, f in floor["per_batch"].items():
        lines.append(f"| floor: weights / copy bandwidth | {b} | {f['weights_only_tokens_per_s']:.1f} | | "
                     f"{int(b) * 1e3 / f['weights_only_tokens_per_s']:.1f} |")
        lines.append(f"| floor: weights + our full KV cache read | {b} | {f['with_kv_tokens_per_s']:.1f} | | "
                     f"{int(b) * 1e3 / f['with_kv_tokens_per_s']:.1f} |")
    lines += ["", f"Prefill excluded: {result['prefill_exclusion']}", "",
              f"Copy bandwidth (512 MB `dst.copy_(src)`, read + write): {floor['copy_gb_per_s']:.1f} GB/s "
              f"(median of {len(floor['copy_samples_gb_per_s'])}). Bytes per decode step at batch 1: "
              f"{floor['per_batch']['1']['weight_bytes'] / 1e6:.1f} MB of weights (Linear weights incl. the "
              f"LM head, norms, one embedding row) + "
              f"{floor['per_batch']['1']['kv_cache_bytes'] / 1e6:.1f} MB of KV cache (all {cfg['max_length']} "
              f"slots of every layer, read every step).", "",
              "| decode-shaped matmul, x [1, in] | weight shape | count | MB/token | ms/token | GB/s |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for label, sweep in (("ours: F.linear, the CPU backend's strides", result["matmuls"]["ours"]),
                         ("transformers: F.linear, [out, in]", result["matmuls"]["transformers"])):
        for kind, k in sweep["kinds"].items():
            lines.append(f"| {label} {kind} | {k['shape']} | {k['count']} | {k['mb_per_token']:.1f} | "
                         f"{k['ms_per_token']:.2f} | {k['gb_per_s']:.1f} |")
        lines.append(f"| **{label}, all** | | | | **{sweep['ms_per_token']:.2f}** | **{sweep['gb_per_s']:.1f}** |")
    bd = result["breakdown"]
    lines += ["", f"Batch-1 step of ours, {bd['steps']} decode steps with per-module timers "
              f"({bd['step_ms_hooked']:.1f} ms/step with timers, {result['throughput'][0]['ms_per_token']:.1f} "
              f"without):", "", "| part | ms per token | % of step |", "| --- | ---: | ---: |"]
    for name, r in bd["rows"].items():
        lines.append(f"| {name} | {r['ms_per_token']:.2f} | {r['percent']:.1f} |")
    return "\n".join(lines)


def bar_chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [str(b) for b in result["config"]["batch_sizes"]]
    series = {"ours (eager)": {}, "transformers generate": {}}
    for row in result["throughput"]:
        series[row["system"]][str(row["batch"])] = row["tokens_per_s"]
    series["floor (weights / copy BW)"] = {b: result["floor"]["per_batch"][b]["weights_only_tokens_per_s"]
                                           for b in batches}
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(batches))]
        ys = [values[b] for b in batches]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(batches))],
                  [f"batch {b}" for b in batches])
    ax.set_ylabel("decode tokens/s (all rows)")
    ax.set_yscale("log")
    ax.set_title(f"Plain greedy decode, {result['config']['max_new_tokens']} new tokens, "
                 f"{result['machine']['torch_threads']} threads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a stopped run never leaves half a figure
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated, e.g. 1,8")
    parser.add_argument("--max-length", type=int, default=1024, help="our KV cache length (engine default)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--breakdown-steps", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench_out/plain.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if 1 not in batch_sizes:
        parser.error("--batch-sizes must include 1 (the breakdown and the batch-1 comparison use it)")
    load_before = os.getloadavg()
    n = args.max_new_tokens
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)

    engines = {b: Engine.from_pretrained(speculation=SpeculationConfig(mode="plain"), batch_size=b,
                                         max_length=args.max_length, dtype="float32", backend="eager")
               for b in batch_sizes}
    clocks = {b: LoopClock(e.runner) for b, e in engines.items()}
    prompt_ids = [engines[1].encode(p) for p in PROMPTS]

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(engines[1].model_dir, dtype=torch.float32).eval()
    pad_id = engines[1].tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else hf.config.eos_token_id

    print(f"threads {torch.get_num_threads()}, prompts {[len(p) for p in prompt_ids]} tokens; warming up")
    warm = SamplingParams(max_new_tokens=4, ignore_eos=True)
    for b, engine in engines.items():
        engine.generate(prompt_ids[:b], warm)
        run_hf(hf, pad_id, prompt_ids[:b], b, 4)

    runs: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in range(args.repeats):
        for b in batch_sizes:
            for system in ("ours (eager)", "transformers generate"):
                start = time.perf_counter()
                if system == "ours (eager)":
                    run = run_ours(engines[b], clocks[b], prompt_ids, params)
                else:
                    run = run_hf(hf, pad_id, prompt_ids, b, n)
                runs[(system, b)].append(run)
                print(f"repeat {r + 1}/{args.repeats} batch {b} {system}: {run['tokens_per_s']:.1f} tokens/s "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)

    throughput = []
    for (system, b), rs in runs.items():
        rate = median(x["tokens_per_s"] for x in rs)
        row = {"system": system, "batch": b, "tokens_per_s": rate, "ms_per_token": 1e3 / rate,
               "per_repeat": [x["tokens_per_s"] for x in rs], "groups": [x["groups"] for x in rs]}
        if system == "ours (eager)":
            row["engine_stats_tokens_per_s"] = median(
                median(t for g in x["groups"] for t in g["stats_tokens_per_s"]) for x in rs)
        throughput.append(row)
    throughput.sort(key=lambda row: (row["batch"], row["system"] != "ours (eager)"))

    ours1, hf1 = runs[("ours (eager)", 1)][0]["output_ids"], runs[("transformers generate", 1)][0]["output_ids"]
    agreement = [next((i for i, (a, c) in enumerate(zip(x, y)) if a != c), None) for x, y in zip(ours1, hf1)]

    print("measuring the floor", flush=True)
    copies = copy_bandwidth(samples=5 * args.repeats)
    bw = median(copies) * 1e9
    floor = {"copy_gb_per_s": bw / 1e9, "copy_samples_gb_per_s": copies, "per_batch": {}}
    target = engines[1].runner.target
    for b in batch_sizes:
        nbytes = streamed_bytes(target, b, args.max_length)
        floor["per_batch"][str(b)] = {**nbytes, "weights_only_tokens_per_s": b * bw / nbytes["weight_bytes"],
                                      "with_kv_tokens_per_s": b * bw / (nbytes["weight_bytes"] + nbytes["kv_cache_bytes"])}
    matmuls = {"ours": matmul_sweep(our_linear_weights(target), F.linear, args.repeats),
               "transformers": matmul_sweep(hf_linear_weights(hf), F.linear, args.repeats)}

    print("timing the parts of a batch-1 step", flush=True)
    breakdown = step_breakdown(engines[1], clocks[1], prompt_ids[0], args.breakdown_steps)

    result = {
        "config": {"max_new_tokens": n, "repeats": args.repeats, "batch_sizes": batch_sizes,
                   "max_length": args.max_length, "dtype": "float32", "backend": "eager",
                   "model_dir": str(engines[1].model_dir), "prompts": list(PROMPTS),
                   "prompt_lengths": [len(p) for p in prompt_ids]},
        "machine": machine(torch.get_num_threads()),
        "load_before": list(load_before), "load_after": list(os.getloadavg()),
        "prefill_exclusion": (
            "both systems time the decode loop only: ours from the end of prefill (which yields the first "
            "token) to the end of the last step; transformers' from its streamer receiving the first new "
            "token to receiving the last (prefill timed separately, not subtracted); "
            f"{n - 1} decoded tokens per row"),
        "throughput": throughput,
        "greedy_agreement": {"identical_prompts": sum(a is None for a in agreement),
                             "first_difference": agreement},
        "floor": floor, "matmuls": matmuls, "breakdown": breakdown,
    }
    table = markdown(result)
    print()
    print(table)
    print(f"\ngreedy outputs identical to transformers' on {result['greedy_agreement']['identical_prompts']}"
          f"/{len(agreement)} prompts (first differing position per prompt: {agreement})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1))
    png = args.out.with_suffix(".png")
    bar_chart(result, png)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
