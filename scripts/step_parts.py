"""Where each millisecond of a decode step goes: graph parts, host parts, and the memory floor (issue 36).

    python -m scripts.step_parts                       # bf16 and float32, inductor and eager, batch 1 and 8
    python -m scripts.step_parts --dtypes bfloat16 --backends inductor --batch-sizes 1

For each configuration, in one process: the floor (the streaming bandwidth of this machine's torch threads
over a buffer the size of the target's weights, a float32 sum, median of repeats; the bytes a plain step
reads: weights plus the KV cache a compiled step reads, all of max_length), then plain decoding and P-EAGLE
(the command line's defaults, K fixed at its longest so every step is the same graph) on held-out code
prompts, streaming text with a stop string as the command line does.

Graph parts are timed from inside the graphs: for this run only, forward hooks put a marker op
(`step_parts::mark`, a custom op that notes the time and copies its input) at the edges of the target's
embedding, of every decoder layer and its attention, and of the LM head. A compiled graph keeps the
markers in data order (each sits between the tensor a part takes and the part), so the time between two
markers is what ran between them: attention (the input norm, projections, rotary, KV write, attention,
output projection), MLP (residual, post-attention norm, MLP, residual), and so on. The markers cost a
copy of one hidden row each and break fusion across part edges, so the table also gives the step without
them (a second engine, no hooks). Host parts: the runner's own work (inputs, K choice, sampling inputs),
the backend call outside the parts (guards, input and output copies), and the host loop between steps
(commit, stop checks, detokenising callbacks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

from neuron_peagle.files import atomic_write_text
from scripts.step_floor import stream_bandwidth, tensor_bytes

_stamps: list[tuple[str, float]] = []


@torch.library.custom_op("step_parts::mark", mutates_args=())
def mark(x: Tensor, label: str) -> Tensor:
    _stamps.append((label, time.perf_counter()))
    return x.clone()


@mark.register_fake
def _mark_fake(x: Tensor, label: str) -> Tensor:
    return torch.empty_like(x)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--backends", nargs="+", default=["inductor", "eager"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompts", type=int, default=8, help="held-out code prompts (batch 8 fills its slots)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("bench_out/step_parts.json"))
    return parser.parse_args()


def add_markers(target) -> None:
    """Marker hooks at the edges of the target's parts (see the module doc)."""
    def edges(module, name: str) -> None:
        module.register_forward_pre_hook(lambda m, args: (mark(args[0], f"enter:{name}"), *args[1:]))
        module.register_forward_hook(lambda m, args, out: mark(out, f"exit:{name}"))

    edges(target.embed_tokens, "embedding")
    for i, layer in enumerate(target.layers):
        edges(layer, f"layer:{i}")
        edges(layer.self_attn, f"attention:{i}")
    edges(target.norm, "final_norm")
    edges(target.lm_head, "lm_head")
    import neuron_peagle.graphs.speculative as speculative

    if not getattr(speculative.lm_head_argmax, "marked", False):
        original = speculative.lm_head_argmax

        def marked(hidden, *args):
            ids, best = original(mark(hidden, "enter:lm_head"), *args)
            return mark(ids, "exit:lm_head"), best

        marked.marked = True
        speculative.lm_head_argmax = marked


def split(stamps: list[tuple[str, float]], start: float, end: float, num_layers: int) -> dict[str, float] | None:
    """One graph call's stamps -> seconds per part, or None if they are not one target pass. A drafter
    that shares the target's embedding passes its hooks first: the target's pass is the one whose
    embedding comes last before layer 0."""
    labels = [label for label, _ in stamps]
    if "enter:layer:0" not in labels:
        return None
    first_layer = labels.index("enter:layer:0")
    times = {}
    for position, (label, t) in enumerate(stamps):
        if position < first_layer:
            times[label] = t  # the last before layer 0
        else:
            times.setdefault(label, t)
    needed = ["enter:embedding", "exit:embedding", *[f"{e}:{w}:{i}" for i in range(num_layers)
              for e in ("enter", "exit") for w in ("layer", "attention")], "enter:lm_head", "exit:lm_head"]
    if any(n not in times for n in needed):
        return None
    parts = {"before the target (draft: proposer; plain: graph entry)": times["enter:embedding"] - start,
             "embedding": times["exit:embedding"] - times["enter:embedding"],
             "rotary, masks (before layer 0)": times["enter:layer:0"] - times["exit:embedding"]}
    for i in range(num_layers):
        parts[f"attention {i}"] = times[f"exit:attention:{i}"] - times[f"enter:layer:{i}"]
        parts[f"mlp {i}"] = times[f"exit:layer:{i}"] - times[f"exit:attention:{i}"]
        if i + 1 < num_layers:
            parts[f"mlp {i}"] += times[f"enter:layer:{i + 1}"] - times[f"exit:layer:{i}"]
    parts["final norm + LM head"] = times["exit:lm_head"] - times[f"exit:layer:{num_layers - 1}"]
    parts["after the LM head (accept / pick, state, outputs)"] = end - times["exit:lm_head"]
    return parts


def instrument(engine) -> dict[str, list]:
    """Wrap the runner's step and its backend's run with clocks; returns the lists they fill."""
    runner, backend = engine.runner, engine.runner.backend
    log: dict[str, list] = {"step_s": [], "run_s": [], "parts": [], "runner_host_s": []}
    run, step = backend.run, runner.step
    layers = len(engine.target.layers)

    def timed_run(graph, inputs):
        _stamps.clear()
        start = time.perf_counter()
        out = run(graph, inputs)
        end = time.perf_counter()
        parts = split(list(_stamps), start, end, layers)
        if parts is not None:  # a step graph (prefill graphs pass more rows: not stepping)
            log["run_s"].append(end - start)
            log["parts"].append(parts)
        return out

    def timed_step():
        runs = len(log["run_s"])
        start = time.perf_counter()
        out = step()
        log["step_s"].append(time.perf_counter() - start)
        if len(log["run_s"]) == runs + 1:
            log["runner_host_s"].append(log["step_s"][-1] - log["run_s"][-1])
        return out

    backend.run, runner.step = timed_run, timed_step
    return log


def measure(engine, prompts, new_tokens: int, marked: bool, overlap: bool = False) -> dict:
    from neuron_peagle.runtime.engine import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, stop=("\n\n\n\n\n\n",))
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=8, ignore_eos=True))  # every graph warm
    log = instrument(engine)
    records, streamed = [], []
    start = time.perf_counter()
    outputs = engine.generate(prompts, params, on_step=records.append, overlap_host=overlap,
                              on_tokens=lambda index, tokens: streamed.append(len(tokens)))
    total = time.perf_counter() - start
    prefill = sum(o.stats.prefill_time_s for o in outputs)
    loop_per_step = (total - prefill) / len(records)
    decode_steps = len(log["step_s"])
    step_ms = statistics.median(log["step_s"]) * 1000
    result = {"steps": len(records), "tokens_per_step": sum(sum(r.kept) for r in records) / len(records),
              "step_ms": step_ms, "loop_ms_per_step": loop_per_step * 1000,
              "host_loop_ms": (loop_per_step - sum(log["step_s"]) / decode_steps) * 1000}
    if marked:
        per_part = defaultdict(list)
        for parts in log["parts"]:
            for name, seconds in parts.items():
                per_part[name].append(seconds * 1000)
        result["parts_ms"] = {name: statistics.median(v) for name, v in per_part.items()}
        result["graph_call_ms"] = statistics.median(log["run_s"]) * 1000
        result["runner_host_ms"] = statistics.median(log["runner_host_s"]) * 1000
    return result


def summary(parts: dict[str, float]) -> dict[str, float]:
    """Per-layer rows folded: attention and MLP as totals over layers."""
    out: dict[str, float] = {}
    for name, ms in parts.items():
        key = "attention (all layers)" if name.startswith("attention ") else (
            "mlp (all layers)" if name.startswith("mlp ") else name)
        out[key] = out.get(key, 0.0) + ms
    return out


def run_config(dtype: str, backend: str, batch: int, args, texts) -> dict:
    from neuron_peagle.runtime.engine import Engine
    from neuron_peagle.speculation import SpeculationConfig

    shapes = dict(batch_size=batch, max_length=args.max_length, prefill_buckets=(128, 512), dtype=dtype,
                  backend=backend)
    result = {}
    for name, speculation in (("plain", SpeculationConfig(mode="plain")),
                              ("P-EAGLE", SpeculationConfig(plain_step=False, short_draft_tokens=0))):
        runs = {}
        for marked in (True, False):
            engine = Engine.from_pretrained(speculation=speculation, **shapes)
            if marked:
                add_markers(engine.target)
            prompts = [engine.encode(t) for t in texts]
            runs[marked] = measure(engine, prompts, args.max_new_tokens, marked)
            if not marked:
                runs["overlap"] = measure(engine, prompts, args.max_new_tokens, False, overlap=True)
            if name == "plain" and not marked:
                target = engine.target
        result[name] = {**runs[True], "unmarked_step_ms": runs[False]["step_ms"],
                        "unmarked_host_loop_ms": runs[False]["host_loop_ms"],
                        "overlap_step_ms": runs["overlap"]["step_ms"],
                        "overlap_host_loop_ms": runs["overlap"]["host_loop_ms"],
                        "unmarked_tokens_per_step": runs[False]["tokens_per_step"]}
    weights = tensor_bytes(target) - tensor_bytes(target.rotary)
    cache = target.new_cache(batch)
    kv = sum(t.numel() * t.element_size() for t in cache.buffers())
    bandwidth = stream_bandwidth(weights, torch.float32, args.repeats)
    result["floor"] = {"weight_bytes": weights, "kv_bytes": kv, "bandwidth_gb_s": bandwidth / 1e9,
                       "floor_ms": (weights + kv) / bandwidth * 1000}
    return result


def print_table(label: str, result: dict) -> None:
    floor = result["floor"]
    print(f"\n### {label}: floor {floor['floor_ms']:.1f} ms (weights {floor['weight_bytes'] / 1e6:.0f} MB + KV "
          f"{floor['kv_bytes'] / 1e6:.0f} MB at {floor['bandwidth_gb_s']:.1f} GB/s)")
    plain, spec = result["plain"], result["P-EAGLE"]
    rows = list(dict.fromkeys([*summary(plain["parts_ms"]), *summary(spec["parts_ms"])]))
    print("| part (ms, median of steps) | plain | P-EAGLE |\n|---|---|---|")
    for row in rows:
        print(f"| {row} | {summary(plain['parts_ms']).get(row, 0):.2f} | {summary(spec['parts_ms']).get(row, 0):.2f} |")
    for key, text in (("graph_call_ms", "graph call, markers in"), ("runner_host_ms", "runner host work (inputs, K choice)"),
                      ("host_loop_ms", "host loop between steps (commit, stops, callbacks)"),
                      ("unmarked_step_ms", "**step without markers**"),
                      ("unmarked_host_loop_ms", "host loop, without markers"),
                      ("overlap_step_ms", "step, host reading beside it (overlap)"),
                      ("overlap_host_loop_ms", "host loop outside the steps, overlap")):
        print(f"| {text} | {plain[key]:.2f} | {spec[key]:.2f} |")
    print(f"| tokens per step | {plain['unmarked_tokens_per_step']:.2f} | {spec['unmarked_tokens_per_step']:.2f} |")
    share = lambda r: 100 * r["unmarked_host_loop_ms"] / (r["unmarked_host_loop_ms"] + r["unmarked_step_ms"])
    print(f"| host loop share of a step | {share(plain):.1f}% | {share(spec):.1f}% |")
    overlapped = lambda r: 100 * r["overlap_host_loop_ms"] / (r["overlap_host_loop_ms"] + r["overlap_step_ms"])
    print(f"| host loop share, overlap | {overlapped(plain):.1f}% | {overlapped(spec):.1f}% |")
    print(f"| plain step / floor | {plain['unmarked_step_ms'] / floor['floor_ms']:.2f}x | |")


def main() -> None:
    args = parse_args()
    from neuron_peagle.training.prompt_sets import load_prompts

    texts = [p.text for p in load_prompts("heldout") if p.domain == "code"][:args.prompts]
    report = {"command": {k: str(v) for k, v in vars(args).items()}, "threads": torch.get_num_threads(), "runs": {}}
    for dtype in args.dtypes:
        for backend in args.backends:
            for batch in args.batch_sizes:
                label = f"{dtype} {backend} batch {batch}"
                result = run_config(dtype, backend, batch, args, texts[:max(batch, 1)] if batch > 1 else texts[:2])
                report["runs"][label] = result
                print_table(label, result)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(args.out, json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
