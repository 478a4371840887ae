"""Make tests/fixtures/speculators: tiny drafters written by the speculators library itself, with the
logits its own forward computes, so the tests can hold our loader and Drafter to them.

    .venv/bin/python -m scripts.make_speculators_fixtures --venv DIR [--out tests/fixtures/speculators]

DIR is a throw-away virtual environment, made there if it does not exist (a temporary or cache
directory: never inside the project, never the project's .venv). It gets the pinned speculators
release (SPECULATORS) and the torch / transformers it needs (TORCH, TRANSFORMERS) from the public
package index. pip cannot pick a CPU-only torch from that index: the Linux wheel there brings its CUDA
libraries (about 6 GB in DIR); nothing here uses a GPU. scripts/speculators_fixture_worker.py runs in
DIR and does everything that imports speculators; this script, in the project's environment, runs it,
copies the fixtures, checks that our loader reproduces the recorded logits, and checks that drafters
our `save_drafter` writes load in speculators (fixtures.json, "save_drafter_in_speculators").

Each fixture: NAME/drafter/{config.json, model.safetensors} as speculators' save_pretrained wrote
them (it also writes config.py, a copy of speculators' config source, left out here), NAME/target/
config.json (the tiny target it drafts for; speculators reads the verifier named in the drafter's
config, "target", from there: the worker also gives it random embedding and head weights, not kept),
NAME/io.safetensors (the recorded call's inputs and speculators' logits; see the worker's docstring).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "speculators_fixture_worker.py"
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "speculators"
SPECULATORS, TORCH, TRANSFORMERS = "0.9.0", "2.14.1", "5.19.0"
PINS = (f"speculators=={SPECULATORS}", f"torch=={TORCH}", f"transformers=={TRANSFORMERS}")
COMMAND = "python -m scripts.make_speculators_fixtures --venv VENV_DIR"
FIXTURE_FILES = ("drafter/config.json", "drafter/model.safetensors", "target/config.json", "io.safetensors")


def _layer(vocab: int, layers: int = 1, head_dim: int = 8, **extra) -> dict:
    """A tiny transformer_layer_config: hidden 32, 4 query heads, 2 KV heads, MLP 64."""
    return {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": head_dim, "max_position_embeddings": 256,
            **extra}


def _target(layer_type: str, layer: dict) -> dict:
    """The tiny 8-layer target (a Hugging Face config.json) a drafter with `layer` fits."""
    return {"architectures": ["LlamaForCausalLM" if layer_type == "llama" else "Qwen3ForCausalLM"],
            "model_type": layer_type, "vocab_size": layer["vocab_size"], "hidden_size": layer["hidden_size"],
            "intermediate_size": 96, "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 8, "rms_norm_eps": layer.get("rms_norm_eps", 1e-6), "max_position_embeddings": 256,
            "tie_word_embeddings": False}


def _spec(name: str, kind: str, layer_type: str, layer: dict, seed: int, **extra) -> dict:
    """One fixture: P-EAGLE forwards run 12 tokens through 4 COD depths, EAGLE-3 forwards 10 tokens
    through 3 training-time-test steps; features from target layers [2, 4, 5] (speculators' default
    for 8 layers)."""
    spec = {"name": name, "kind": kind, "layer_type": layer_type, "layer": layer, "seed": seed,
            "draft_vocab_size": layer["vocab_size"], "aux_layer_ids": [2, 4, 5], "target": _target(layer_type, layer)}
    if kind == "peagle":
        spec.update(seq_len=12, num_depths=4, cod_seed=seed, speculative_tokens=4,
                    mask_token_id=layer["vocab_size"] - 1)
    else:
        spec.update(seq_len=10, ttt_steps=3, speculative_tokens=3)
    return {**spec, **extra}


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
FIXTURES = [
    _spec("peagle_llama", "peagle", "llama", _layer(128, rms_norm_eps=1e-5, rope_parameters=LLAMA3_ROPE), seed=1),
    _spec("peagle_qwen3_3layers", "peagle", "qwen3",
          _layer(128, layers=3, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), seed=2,
          norm_before_residual=True, mask_token_id=7),
    _spec("peagle_norm_before_fc", "peagle", "llama", _layer(128), seed=3, norm_before_fc=True),
    _spec("peagle_reduced_vocab", "peagle", "qwen3", _layer(256, head_dim=16), seed=4, draft_vocab_size=64),
    _spec("eagle3_fc_norm_norm_output", "eagle3", "llama", _layer(128), seed=5, fc_norm=True, norm_output=True,
          draft_vocab_size=64),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, required=True,
                        help="throw-away virtual environment for speculators (made if missing; outside the project)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixtures directory (default: %(default)s)")
    return parser.parse_args(argv)


def check_venv_location(venv: Path) -> Path:
    """The venv's absolute path; refused inside the project (its .venv included)."""
    venv = venv.expanduser().resolve()
    if venv == ROOT or ROOT in venv.parents:
        raise SystemExit(f"--venv {venv} is inside the project: give a temporary or cache directory")
    return venv


def ensure_venv(venv: Path) -> Path:
    """The venv's python, with the pinned packages installed (made with this interpreter's venv module)."""
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet", *PINS], check=True)
    return python


def run_worker(python: Path, *args: str) -> None:
    """The worker in the throw-away environment, offline for transformers' hub look-ups."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run([str(python), str(WORKER), *args], check=True, env=env)


def copy_fixtures(made: Path, out: Path) -> dict[str, dict[str, int]]:
    """The committed files of every fixture, from the worker's output; their sizes in bytes."""
    sizes = {}
    for spec in FIXTURES:
        target_dir = out / spec["name"]
        if target_dir.exists():
            shutil.rmtree(target_dir)
        sizes[spec["name"]] = {}
        for name in FIXTURE_FILES:
            (target_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(made / spec["name"] / name, target_dir / name)
            sizes[spec["name"]][name] = (target_dir / name).stat().st_size
    return sizes


def our_logits(fixture_dir: Path, spec: dict):
    """Our loader's drafter of a fixture and its logits on the recorded inputs (speculators_calls)."""
    import torch
    from safetensors.torch import load_file

    from neuron_peagle.config import ModelConfig
    from neuron_peagle.models.drafter_io import load_drafter
    from neuron_peagle.models.speculators_calls import eagle3_ttt_logits, peagle_logits

    drafter = load_drafter(fixture_dir / "drafter", ModelConfig.from_dir(fixture_dir / "target"), 64)
    io = load_file(str(fixture_dir / "io.safetensors"))
    with torch.no_grad():
        if spec["kind"] == "peagle":
            logits = peagle_logits(drafter, io["hidden_states"][0], io["input_ids"][0], io["document_ids"][0],
                                   io["anchor_pos"], io["depth"]).unsqueeze(0)
        else:
            logits = eagle3_ttt_logits(drafter, io["hidden_states"][0], io["input_ids"][0], io["document_ids"][0],
                                       io["position_ids"][0], spec["ttt_steps"])
    return drafter, logits, io["logits"]


def save_ours(made: Path, work: Path) -> tuple[list[dict], dict[str, float]]:
    """Every fixture loaded by our loader and written back by our save_drafter (float32, verifier
    "target", beside a copy of the target), plus one drafter sharing the target's embedding (what our
    trainer writes by default): the worker's check entries, and per fixture how far our loader's
    logits are from speculators'."""
    import dataclasses

    import torch

    from neuron_peagle.models.drafter import Drafter
    from neuron_peagle.models.drafter_io import save_drafter

    entries, ours = [], {}
    for spec in FIXTURES:
        drafter, logits, recorded = our_logits(made / spec["name"], spec)
        ours[spec["name"]] = float((logits - recorded).abs().max())
        check_dir = work / "check" / spec["name"]
        shutil.copytree(made / spec["name"] / "target", check_dir / "target")
        save_drafter(drafter, check_dir / "ours", verifier="target", dtype=torch.float32)
        entries.append({"name": spec["name"], "fixture": spec["name"], "dir": str(check_dir / "ours"), "spec": spec,
                        "io": str(made / spec["name"] / "io.safetensors")})
    spec = FIXTURES[0]
    drafter, _, _ = our_logits(made / spec["name"], spec)
    shared = Drafter(dataclasses.replace(drafter.config, shares_target_embedding=True), drafter.max_length)
    shared.load_state_dict({k: v for k, v in drafter.state_dict().items() if not k.startswith("embed_tokens.")},
                           strict=False)
    check_dir = work / "check" / "shared_embedding"
    shutil.copytree(made / spec["name"] / "target", check_dir / "target")
    save_drafter(shared, check_dir / "ours", verifier="target", dtype=torch.float32)
    entries.append({"name": f"{spec['name']} (shares_target_embedding)", "fixture": spec["name"],
                    "dir": str(check_dir / "ours"), "spec": spec, "io": str(made / spec["name"] / "io.safetensors")})
    return entries, ours


def check_results(results: list[dict], made: Path) -> list[dict]:
    """The worker's results, with speculators' logits on our files compared to the recorded ones (and
    no machine paths)."""
    from safetensors.torch import load_file

    for result in results:
        logits_file = result.pop("logits_file", None)
        fixture = result.pop("fixture")
        if logits_file is not None:
            recorded = load_file(str(made / fixture / "io.safetensors"))["logits"]
            theirs = load_file(logits_file)["logits"]
            result["max_abs_diff_to_recorded_logits"] = float((theirs - recorded).abs().max())
    return results


def write_metadata(out: Path, sizes: dict, ours: dict[str, float], check: list[dict]) -> None:
    """fixtures.json (what made them, per fixture its spec, files and the recorded call) and README.md."""
    calls = {"peagle": "PEagleDraftModel.forward(hidden_states, input_ids, document_ids, "
                       "verifier_last_hidden_states=..., num_depths=num_depths, loss_config=eager kl_div) after "
                       "torch.manual_seed(cod_seed); logits [1, E, draft_vocab] of the E COD elements "
                       "(anchor_pos, depth recorded)",
             "eagle3": "Eagle3DraftModel.forward(hidden_states, input_ids, document_ids, position_ids=position_ids, "
                       "ttt_steps=ttt_steps); logits [ttt_steps, S, draft_vocab]"}
    meta = {
        "made_by": COMMAND,
        "speculators_version": SPECULATORS, "torch_version": TORCH, "transformers_version": TRANSFORMERS,
        "attention": "transformers 'eager' (set on transformer_layer_config before the model is built)",
        "fixtures": {spec["name"]: {"recorded_call": calls[spec["kind"]], "files": sizes[spec["name"]],
                                    "our_loader_max_abs_diff": ours[spec["name"]], "spec": spec}
                     for spec in FIXTURES},
        "save_drafter_in_speculators": check,
    }
    (out / "fixtures.json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(sum(files.values()) for files in sizes.values())
    rows = "\n".join(f"| {spec['name']} | {spec['kind']} | {spec['layer_type']} x {spec['layer']['num_hidden_layers']} | "
                     f"{_switches(spec)} | {sum(sizes[spec['name']].values()) // 1024} KiB |" for spec in FIXTURES)
    checks = "\n".join(f"- {r['name']}: " + _check_line(r) for r in check)
    (out / "README.md").write_text(README.format(command=COMMAND, speculators=SPECULATORS, torch=TORCH,
                                                 transformers=TRANSFORMERS, rows=rows, total=total // 1024,
                                                 checks=checks))


def _check_line(result: dict) -> str:
    """One README line of the save_drafter -> speculators check."""
    if not result["loads"]:
        return f"does not load: {result['error']}"
    line = (f"loads; tensors speculators ignored: {result['ignored_tensors'] or 'none'}; optional tensors not in "
            f"the file: {result['missing_but_optional'] or 'none'}; ")
    if "max_abs_diff_to_recorded_logits" in result:
        return line + f"max |logits - recorded| {result['max_abs_diff_to_recorded_logits']:.2g}"
    return line + result.get("note", "logits not compared")


def _switches(spec: dict) -> str:
    on = [k for k in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output") if spec.get(k)]
    if spec["draft_vocab_size"] != spec["layer"]["vocab_size"]:
        on.append(f"draft vocab {spec['draft_vocab_size']} of {spec['layer']['vocab_size']} (d2t/t2d)")
    return ", ".join(on) or "-"


README = """# Drafters written by the speculators library

Made by `{command}` (scripts/make_speculators_fixtures.py) with speculators {speculators}, torch {torch} and
transformers {transformers}, in a throw-away environment: each drafter built with speculators' own config and
model classes, random weights from a fixed seed, saved by its own `save_pretrained`, loaded back by its own
`from_pretrained`, and run by its own `forward` on fixed random inputs. tests/test_speculators_fixtures.py
loads each with our `load_drafter` and matches the recorded logits (neuron_peagle/models/speculators_calls.py
runs our Drafter on the same inputs as speculators' forward does). fixtures.json has every spec, the recorded
calls and the check results.

| fixture | speculators_model_type | layers | switches | size |
| --- | --- | --- | --- | --- |
{rows}

Total {total} KiB. Per fixture: `drafter/` (config.json, model.safetensors as speculators wrote them; it also
writes config.py, a copy of its config class's source, not kept), `target/config.json` (the tiny target the
drafter fits, the verifier "target" its config names; speculators' loader also reads the verifier's embedding,
head and final norm, which the script makes at random and does not keep) and `io.safetensors` (inputs, the
recorded P-EAGLE COD sample, speculators' logits).

Drafters written by our `save_drafter` (each fixture loaded by our loader and saved back in float32, and one
sharing the target's embedding, as our trainer saves by default), loaded by speculators' `from_pretrained`
and run on the fixture's recorded inputs:

{checks}

A drafter sharing the target's embedding has no embed_tokens.weight, and speculators ignores its
`mask_embedding`: at best (see the note) its mask slots take the target's row of the mask token, not the
learned one. For speculators and vLLM, save with `save_drafter(..., full_embedding_from=target.embed_tokens.weight)`,
which writes the whole table with the learned row patched in. An EAGLE-3 drafter of ours keeps its (unused)
`mask_hidden`, which speculators ignores.
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    venv = check_venv_location(args.venv)
    python = ensure_venv(venv)
    with tempfile.TemporaryDirectory(prefix="speculators-fixtures-") as tmp:
        work = Path(tmp)
        (work / "specs.json").write_text(json.dumps(FIXTURES))
        run_worker(python, "make", str(work / "specs.json"), str(work / "made"))
        entries, ours = save_ours(work / "made", work)
        (work / "check.json").write_text(json.dumps(entries))
        run_worker(python, "check", str(work / "check.json"), str(work / "checked.json"))
        check = check_results(json.loads((work / "checked.json").read_text()), work / "made")
        args.out.mkdir(parents=True, exist_ok=True)
        sizes = copy_fixtures(work / "made", args.out)
        write_metadata(args.out, sizes, ours, check)
    for name, diff in ours.items():
        print(f"{name}: our loader's logits within {diff:.2g} of speculators'")
    for result in check:
        print(f"save_drafter -> speculators, {result['name']}: " + ("loads" if result["loads"] else "does not load"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
