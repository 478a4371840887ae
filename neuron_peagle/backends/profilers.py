"""The profilers of a session, per backend (`Backend.profiler`): what runs around a profiled generation
and what it leaves in the session directory (neuron_peagle.profiling writes the rest).

- CPU backends (eager, inductor) and xla: torch.profiler when a trace is asked for: `trace.json` (Chrome
  trace format) and `ops.txt` (operators by self time); xla adds torch-xla's metrics report.
- On NeuronCores (neuron, nxd): the Neuron runtime's own capture, switched on by its inspect settings
  (`neuron_capture_env`), which must be in the environment before the runtime starts. torch.profiler is
  not run there: the Neuron docs say not to combine it with the runtime's inspect capture.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from neuron_peagle.files import atomic_path

NEURON_PROFILE_DIR = "neuron"
# Writes one file of the session (name relative to the session directory, its text).
Write = Callable[[str, str], None]


class ProfilerSession(Protocol):
    """What `Backend.profiler` returns: a context around the profiled generation, then its files."""

    traced: bool  # a torch.profiler trace was recorded
    viewer: str | None  # how to look at what the backend's own profiler recorded, beyond the files

    def __enter__(self) -> "ProfilerSession": ...

    def __exit__(self, *exc) -> None: ...

    def finish(self, write: Write, files: list[str]) -> list[str]:
        """Write what was recorded (`write(name, text)`, or append to `files` a file written another way);
        the session's notes."""


def profiler_for(on_neuron_cores: bool, out_dir: Path, trace: bool) -> "ProfilerSession":
    """The one rule: the Neuron runtime's capture on NeuronCores, torch.profiler elsewhere (when asked)."""
    return NeuronCapture(out_dir, trace) if on_neuron_cores else TorchProfiler(out_dir, trace)


def neuron_capture_env(out_dir: Path) -> dict[str, str]:
    """Environment that makes the Neuron runtime capture the whole session (system trace and one device
    trace of everything it runs) into `out_dir/neuron`; read once, when the runtime starts.

    `NEURON_RT_INSPECT_DEVICE_PROFILE=session`, not `1`: mode 1 records only the first execution of each
    NEFF, which a profile session spends on its warm-up."""
    return {"NEURON_RT_INSPECT_ENABLE": "1", "NEURON_RT_INSPECT_DEVICE_PROFILE": "session",
            "NEURON_RT_INSPECT_OUTPUT_DIR": str(out_dir / NEURON_PROFILE_DIR)}


class TorchProfiler:
    """torch.profiler over the generation, when `trace`; its trace and operator table at the end."""

    def __init__(self, out_dir: Path, trace: bool) -> None:
        self.out_dir = out_dir
        self.traced = trace
        self.viewer: str | None = None  # how to look at what the session recorded, beyond its files
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if trace else None

    def __enter__(self) -> "TorchProfiler":
        if self._profiler is not None:
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._profiler is not None:
            self._profiler.__exit__(*exc)

    def finish(self, write: Write, files: list[str]) -> list[str]:
        """Write what the profilers recorded (`write`, or into `files` for a file written another way);
        returns notes for the session."""
        if self._profiler is not None:
            with atomic_path(self.out_dir / "trace.json") as tmp:  # whole or not at all
                self._profiler.export_chrome_trace(str(tmp))
            files.append("trace.json")
            write("ops.txt", self._profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40) + "\n")
        return []


class XlaMetrics(TorchProfiler):
    """torch.profiler as on CPU, and torch-xla's metrics report (compilations, executions, transfers)."""

    def finish(self, write: Write, files: list[str]) -> list[str]:
        import torch_xla.debug.metrics as metrics

        notes = super().finish(write, files)
        write("xla_metrics.txt", metrics.metrics_report())
        return notes


class NeuronCapture:
    """The Neuron runtime's inspect capture (set up by `neuron_capture_env` before the runtime started): no
    torch.profiler; the device profiles it wrote are listed with the session's files."""

    def __init__(self, out_dir: Path, trace: bool) -> None:
        self.out_dir = out_dir
        self.trace_asked = trace
        self.traced = False
        self.viewer = f"device profiles: neuron-explorer view -d {out_dir / NEURON_PROFILE_DIR}"

    def __enter__(self) -> "NeuronCapture":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def finish(self, write: Write, files: list[str]) -> list[str]:
        notes = []
        if self.trace_asked:
            notes.append("no torch.profiler trace on a Neuron backend: the Neuron runtime's session capture "
                         f"({NEURON_PROFILE_DIR}/) records the session, and the two are not to be combined")
        device_dir = self.out_dir / NEURON_PROFILE_DIR
        device_files = sorted(str(p.relative_to(self.out_dir)) for p in device_dir.rglob("*") if p.is_file()) \
            if device_dir.is_dir() else []
        files.extend(device_files)
        if not device_files:
            notes.append(f"the Neuron runtime wrote no device profile into {device_dir}: its inspect settings "
                         f"({', '.join(neuron_capture_env(self.out_dir))}) must be set before the runtime starts")
        elif os.environ.get("NEURON_RT_INSPECT_OUTPUT_DIR") != str(device_dir):
            notes.append("device profiles found, but this process's NEURON_RT_INSPECT_OUTPUT_DIR points elsewhere")
        return notes
