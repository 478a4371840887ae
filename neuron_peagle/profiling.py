"""Profiler sessions: one generation under its backend's profilers, written to a directory.

    neuron-peagle profile "Write a quicksort in Python." --out profiles/quicksort   (generate's options)

A session directory holds (`session.json` lists what was written):

- `session.json`: the engine (model, drafter, mode, K, the K it may choose, lookup, dtype, backend, shapes) and
  a summary: decode steps, acceptance length, tokens/s, milliseconds per step (median and mean), per
  part of the step (draft / verify / accept inside the graph, host outside it; eager only, where the
  graph is Python) and how many steps ran each K;
- `steps.jsonl`: every decode step (`runtime.host_loop.StepRecord`: K, tokens committed per row,
  wall time, parts);
- `trace.json`: the host timeline recorded by torch.profiler, in Chrome trace format (Perfetto or
  chrome://tracing), with `peagle::prefill` and `peagle::step` ranges and, on eager,
  `peagle::draft` / `peagle::verify` / `peagle::accept` around the operators; `ops.txt`: its
  operators by self time (not on the Neuron backends, below);
- backend xla: `xla_metrics.txt`, torch-xla's metrics report (compilations, executions, transfers);
- Neuron backends (neuron, nxd): `neuron/`, the Neuron runtime's own capture, switched on by its
  inspect settings (`neuron_capture_env`) in session mode: one device trace of everything the
  NeuronCores ran in the process (the warm-up included), to open with
  `neuron-explorer view -d <session>/neuron`. Not the per-NEFF mode (`=1`), which records only the
  first run of each NEFF, here the warm-up's. The settings must be in the environment before the
  runtime starts: the command line sets them before it builds the engine; from Python, set them
  before the first Neuron call. torch.profiler is not run there: the Neuron docs say not to combine
  it with the runtime's inspect capture, so those sessions have no trace.json / ops.txt.

A warm-up generation runs first, outside the profile, so graph compilation and first-call costs stay
out of the numbers. torch.profiler records every operator, which slows a CPU step (a bf16 step of
the default model: about 46 ms under it, 28 ms without); `trace=False` (`--no-trace`) leaves it out,
for step times as the benchmark sees them.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from neuron_peagle.backends.profilers import NEURON_PROFILE_DIR, neuron_capture_env, profiler_for
from neuron_peagle.capabilities import capabilities_of
from neuron_peagle.errors import ConfigError
from neuron_peagle.files import atomic_write_text
from neuron_peagle.output_dirs import OutputKind, claim_output_dir, marker_fields
from neuron_peagle.runtime.host_loop import StepRecord
from neuron_peagle.runtime.step_parts import PARTS

if TYPE_CHECKING:
    from neuron_peagle.runtime.engine import Engine, RequestOutput, SamplingParams

__all__ = ["NEURON_PROFILE_DIR", "SESSION", "SessionReport", "neuron_capture_env", "profile_generation", "summarize"]

# A session directory, as neuron_peagle.output_dirs knows it: what a session writes at its top.
SESSION = OutputKind("profiler session", "session.json", frozenset(
    {"session.json", "steps.jsonl", "trace.json", "ops.txt", "xla_metrics.txt", NEURON_PROFILE_DIR}))


def runs_torch_profiler(backend: str, trace: bool) -> bool:
    """Whether a session on `backend` records a torch.profiler trace: when asked, except on NeuronCores,
    where the runtime's inspect capture records the session and the Neuron docs say not to combine the two."""
    return profiler_for(capabilities_of(backend).on_neuron_cores, Path(), trace).traced


@dataclass(frozen=True)
class SessionReport:
    out_dir: Path
    summary: dict
    files: list[str]  # written into out_dir, relative to it
    viewer: str | None = None  # how to look at what the backend's own profiler recorded

    def describe(self) -> str:
        s = self.summary
        lines = [f"{s['num_steps']} decode steps, {s['decoded_tokens']} tokens, {s['tokens_per_s']:.1f} tokens/s, "
                 f"acceptance length {s['acceptance_length']:.2f}, step {s['step_ms_median']:.1f} ms (median)"]
        if s["part_ms_mean"]:
            lines.append("per step: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in s["part_ms_mean"].items()))
        if len(s["steps_per_k"]) > 1:
            lines.append("steps per K: " + ", ".join(f"K={k}: {n}" for k, n in s["steps_per_k"].items()))
            lines.append("K chosen per occupied slots: " + "; ".join(
                f"{occupied}: " + ", ".join(f"K={k} x{n}" for k, n in ks.items())
                for occupied, ks in s["k_by_occupancy"].items()))
        lines.append(f"written to {self.out_dir}: " + ", ".join(self.files))
        if self.viewer:
            lines.append(self.viewer)
        return "\n".join(lines)


def summarize(records: Sequence[StepRecord]) -> dict:
    """Decode-step statistics of a session (batch rows pooled; finished rows do not count)."""
    if not records:
        raise ConfigError("the profiled generation ran no decode step: ask for more than one new token")
    live_rows = sum(sum(c > 0 for c in r.counts) for r in records)
    committed = sum(sum(r.counts) for r in records)  # by the graphs: what acceptance is measured on
    kept = sum(sum(r.kept) for r in records)  # by the requests: their output, as `generate` counts it
    wall = sum(r.wall_s for r in records)
    parts = {name: sum(r.parts_s.get(name, 0.0) for r in records) for name in PARTS}
    timed = any(parts.values())
    return {
        "num_steps": len(records),
        "decoded_tokens": kept,
        "acceptance_length": committed / live_rows,
        "tokens_per_s": kept / wall if wall > 0 else 0.0,
        "step_ms_median": 1000 * statistics.median(r.wall_s for r in records),
        "step_ms_mean": 1000 * wall / len(records),
        # Inside the graph (eager only), and the host's share: the step's wall time less its parts.
        "part_ms_mean": ({**{n: 1000 * t / len(records) for n, t in parts.items()},
                          "host": 1000 * (wall - sum(parts.values())) / len(records)} if timed else {}),
        "steps_per_k": {str(k): n for k, n in sorted(Counter(r.num_speculative_tokens for r in records).items())},
        # K chosen by measured cost (runtime/k_choice.py): per number of occupied slots, steps per K, and
        # the step times the choice used.
        "k_by_occupancy": _k_by_occupancy(records),
        "step_seconds": next((r.choice["step_seconds"] for r in records if r.choice and r.choice["step_seconds"]), {}),
    }


def _k_by_occupancy(records: Sequence[StepRecord]) -> dict[str, dict[str, int]]:
    table: dict[str, Counter] = {}
    for r in records:
        occupied = sum(c > 0 for c in r.counts)
        table.setdefault(str(occupied), Counter())[str(r.num_speculative_tokens)] += 1
    return {occupied: dict(sorted(ks.items(), key=lambda item: -int(item[0])))
            for occupied, ks in sorted(table.items(), key=lambda item: int(item[0]))}


def engine_description(engine: "Engine") -> dict:
    build = engine.build
    return {"model_dir": str(engine.model_dir), "speculation": engine.speculation.to_dict(),
            "drafter": engine.drafter.describe() if engine.drafter is not None else None, "build": build.to_dict()}


def profile_generation(engine: "Engine", prompts: Sequence[Sequence[int]], params,
                       out_dir: Path, warmup: bool = True, trace: bool = True
                       ) -> tuple[list["RequestOutput"], SessionReport]:
    """Generate for `prompts` (token ids, already validated; `params`: one SamplingParams, or one per
    prompt) under the profilers of the engine's
    backend, and write the session into `out_dir`: a new or empty directory, or an earlier session's (whose
    files are replaced), locked while the session runs (neuron_peagle.output_dirs).
    `trace=False`: no torch.profiler (no trace.json, ops.txt), so step times carry no overhead; on
    NeuronCores it never runs (`runs_torch_profiler`; the backend's `profiler` decides)."""
    with claim_output_dir(out_dir, SESSION):
        return _profile(engine, prompts, params, out_dir, warmup, trace)


def _one_or_each(values: list):
    """One value where every request has it, else each request's."""
    return values[0] if len(set(values)) == 1 else values


def _profile(engine: "Engine", prompts: Sequence[Sequence[int]], params: "SamplingParams", out_dir: Path,
             warmup: bool, trace: bool) -> tuple[list["RequestOutput"], SessionReport]:
    from neuron_peagle.runtime.engine import SamplingParams, per_request

    requests = per_request(params, len(prompts))
    if warmup:
        engine.generate(list(prompts[: engine.build.batch_size]), SamplingParams(max_new_tokens=2, ignore_eos=True))
    records: list[StepRecord] = []
    profiler = engine.backend.profiler(out_dir, trace)
    with profiler:
        outputs = engine.generate(prompts, params, on_step=records.append)
    files: list[str] = []

    def write(name: str, text: str) -> None:
        atomic_write_text(out_dir / name, text)
        files.append(name)

    write("steps.jsonl", "".join(json.dumps(asdict(r)) + "\n" for r in records))
    notes = profiler.finish(write, files)
    summary = summarize(records)
    session = {**marker_fields(SESSION), "engine": engine_description(engine), "num_prompts": len(prompts),
               "max_new_tokens": _one_or_each([p.max_new_tokens for p in requests]),
               "temperature": _one_or_each([p.temperature for p in requests]), "traced": profiler.traced,
               "summary": summary, "notes": notes, "files": sorted(files + ["session.json"])}
    write("session.json", json.dumps(session, indent=2) + "\n")
    return outputs, SessionReport(out_dir, summary, sorted(files), profiler.viewer)
