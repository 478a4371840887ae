"""Reliability: every bad value is refused, before any model loads, with one line and exit
code 2; an interrupted run keeps every finished record; options given are told apart from defaults."""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import edited_model_dir

from compile.build import build_parser as build_compile_parser
from compile.build import main as build_main
from neuron_peagle.runtime.manifest import Manifest, WeightsInfo, installed_versions
from neuron_peagle.cli import build_parser, main
from neuron_peagle.cli_args import given as given_options
from neuron_peagle.config import BuildConfig
from neuron_peagle.errors import ConfigError, PromptError
from neuron_peagle.runtime.engine import Engine, GenerationInterrupted, SamplingParams
from neuron_peagle.speculation import SpeculationConfig
from spec_helpers import DRAFTER_ALONE, make_engine

REPO = Path(__file__).resolve().parent.parent
TINY = ["--max-length", "64", "--prefill-buckets", "16,32", "--max-new-tokens", "5", "--backend", "eager", "--no-chat-template"]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Make loading a target model an error: a refusal must come before it."""
    from neuron_peagle.models.target import TargetModel

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad value was refused")

    monkeypatch.setattr(TargetModel, "from_pretrained", refuse)


def _refused(capsys, argv: list[str], command=main) -> str:
    """Run a command line that must be refused: exit 2, nothing on stdout, one line on stderr."""
    code = command(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"{argv}: exit {code}, stderr {err!r}"
    assert out == "", f"{argv}: printed {out!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in err, f"{argv}: {err!r}"
    return lines[0]


# ---- the property: random bad values for every option -----------------------------------------------

def _not(convert) -> callable:
    """A filter: True where `convert(text)` fails, as argparse's type would."""

    def fails(text: str) -> bool:
        try:
            convert(text)
        except ValueError:
            return True
        return False

    return fails


NON_INTEGER = st.one_of(st.text(max_size=8).filter(_not(int)),
                        st.floats(allow_nan=True).filter(lambda x: not x.is_integer() if math.isfinite(x) else True)
                        .map(repr))
BELOW_ONE = st.integers(max_value=0).map(str)
NEGATIVE = st.integers(max_value=-1).map(str)
NON_FLOAT = st.text(max_size=8).filter(_not(float))


def _paths(tmp: Path) -> dict[str, Path]:
    """Bad paths of every kind, made once per test run."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "a_file").write_text("x")
    (tmp / "empty_dir").mkdir(exist_ok=True)
    (tmp / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    (tmp / "number.jsonl").write_text('{"prompt": 123}\n')
    (tmp / "surrogate.jsonl").write_text('{"prompt": "half \\ud800 pair"}\n')
    return {"missing": tmp / "missing", "file": tmp / "a_file", "dir": tmp / "empty_dir",
            "latin1": tmp / "latin1.jsonl", "number": tmp / "number.jsonl", "surrogate": tmp / "surrogate.jsonl"}


def _bad_values(paths: dict[str, Path]) -> dict[str, st.SearchStrategy[str]]:
    """Option -> a strategy of values it must refuse (with the other options as in TINY)."""
    path = lambda *kinds: st.sampled_from([str(paths[k]) for k in kinds])  # noqa: E731
    return {
        "--max-new-tokens": st.one_of(BELOW_ONE, NON_INTEGER, st.just("60")),  # 60: no room in max_length 64
        "--num-speculative-tokens": st.one_of(BELOW_ONE, NON_INTEGER),
        "--batch-size": st.one_of(BELOW_ONE, NON_INTEGER, st.just(str(10**9))),  # 10**9: out of memory
        "--max-length": st.one_of(st.integers(max_value=31).map(str), NON_INTEGER, st.just(str(10**12))),
        "--tp-degree": st.one_of(BELOW_ONE, NON_INTEGER),
        "--top-k": st.one_of(NEGATIVE, NON_INTEGER),
        "--seed": st.one_of(NEGATIVE, NON_INTEGER, st.just(str(2**64))),
        "--lookup-ngram": st.one_of(NEGATIVE, NON_INTEGER),
        "--short-draft-tokens": st.one_of(NEGATIVE, NON_INTEGER, st.just("9")),  # 9: not below K=7
        "--temperature": st.one_of(st.sampled_from(["nan", "inf", "-inf", "-0.5"]), NON_FLOAT),
        "--top-p": st.one_of(st.sampled_from(["0", "1.5", "nan", "inf", "-1"]), NON_FLOAT),
        "--prefill-buckets": st.sampled_from(["", "a,b", "0", "32,16", "16,16", "-4", "128", "1.5"]),
        "--dtype": st.text(max_size=8).filter(lambda t: t not in ("float32", "bfloat16")),
        "--backend": st.text(max_size=8).filter(lambda t: t not in ("eager", "inductor", "neuron", "xla", "nxd")),
        "--kernels": st.text(max_size=8).filter(lambda t: t not in ("auto", "reference", "nki", "interpreter")),
        "--lnc": st.text(max_size=8).filter(lambda t: t not in ("auto", "1")),  # 2: not off NeuronCores
        "--mode": st.text(max_size=8).filter(lambda t: t not in ("plain", "sequential", "parallel")),
        "--datastore": st.text(max_size=8).filter(lambda t: t not in ("auto", "on", "off")),
        "--plain-step": st.text(max_size=8).filter(lambda t: t not in ("auto", "on", "off")),
        "--overlap-host": st.text(max_size=8).filter(lambda t: t not in ("auto", "on", "off")),
        "--model": path("missing", "file", "dir"),
        "--drafter": path("missing", "file", "dir"),
        "--artifacts": path("missing", "file", "dir"),
        "--prompts-file": path("missing", "dir", "latin1", "number", "surrogate"),
        "--out": path("file"),
        "prompt": st.sampled_from(["", "bad \udce9 byte", "half \ud800 pair"]),
    }


VALUELESS = {"--json", "--no-chat-template", "--ignore-eos", "--no-warmup", "--no-trace", "--help"}


def _value_options(parser) -> set[str]:
    names = set()
    for sub in [parser, *parser.commands.values()]:
        for action in sub.options:
            flags = action.option_strings or [action.dest]
            longest = max(flags, key=len)
            if longest not in VALUELESS:
                names.add(longest)
    return names


def test_every_option_has_bad_values_in_the_property_test(tmp_path):
    bad = _bad_values(_paths(tmp_path))
    assert _value_options(build_parser()) <= set(bad)
    assert _value_options(build_compile_parser()) - {"--target"} <= set(bad)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_bad_value_of_any_option_is_one_line_and_exit_2(data, tiny_llama_dir, tmp_path_factory, capsys,
                                                           no_model_loads):
    paths = _paths(tmp_path_factory.getbasetemp() / "bad_paths")
    bad = _bad_values(paths)
    command = data.draw(st.sampled_from(["generate", "profile"]))
    generate_only = {"--tp-degree", "--overlap-host"}
    options = sorted(_value_options(build_parser()) - (generate_only if command == "profile" else {"--out"}))
    option = data.draw(st.sampled_from(options))
    value = data.draw(bad[option])
    args = {"prompt": "hello", "--model": str(tiny_llama_dir), "--max-length": "64", "--prefill-buckets": "16,32",
            "--max-new-tokens": "5", "--backend": "eager", "--out": str(tmp_path_factory.mktemp("session"))}
    if command == "generate":
        del args["--out"]
    if option == "--prompts-file":
        del args["prompt"]
    args[option] = value
    argv = [command] + ([args.pop("prompt")] if "prompt" in args else [])
    argv += [item for flag, v in args.items() for item in (flag, v)] + ["--no-chat-template"]
    if value.startswith("-") and option != "prompt":  # as a user writes a value that looks like an option
        argv = [a if a != value else f"{option}={value}" for a in argv]
        argv.remove(option)
    _refused(capsys, argv)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_bad_value_of_any_build_option_is_one_line_and_exit_2(data, tiny_llama_dir, tmp_path_factory,
                                                                 capsys, no_model_loads):
    bad = _bad_values(_paths(tmp_path_factory.getbasetemp() / "bad_paths"))
    option = data.draw(st.sampled_from(sorted(_value_options(build_compile_parser()) - {"--target", "--out"})))
    value = data.draw(bad[option])
    args = {"--model": str(tiny_llama_dir), "--out": str(tmp_path_factory.mktemp("out")), "--max-length": "64",
            "--prefill-buckets": "16,32", option: value}
    _refused(capsys, [f"{flag}={v}" for flag, v in args.items()], command=build_main)


# ---- single behaviours ------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_temperature_is_refused_everywhere(value, capsys, tiny_llama_dir, no_model_loads):
    line = _refused(capsys, ["generate", "hi", "--model", str(tiny_llama_dir), f"--temperature={value}", *TINY])
    assert "--temperature must be a finite number" in line
    with pytest.raises(ConfigError, match="temperature must be a finite number"):
        SamplingParams(temperature=float(value))


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
    ({"top_k": 1.0}, "top_k must be an integer"),
    ({"top_p": float("nan")}, "top_p must be a finite number"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"stop": ("",)}, "stop strings must be non-empty"),
    ({"stop": ("\ud800",)}, "not valid UTF-8"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids must be >= 0"),
    ({"stop_token_ids": (2.0,)}, "stop_token_ids must be an integer"),
    ({"ignore_eos": "yes"}, "ignore_eos must be True or False"),
])
def test_sampling_params_refuse_wrong_types_and_ranges(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 1.5}, "batch_size must be an integer"),
    ({"max_length": "64"}, "max_length must be an integer"),
    ({"prefill_buckets": (16.5,)}, "prefill_buckets must be an integer"),
    ({"prefill_buckets": 16}, "prefill_buckets must be a sequence"),
    ({"num_speculative_tokens": 2.0}, "num_speculative_tokens must be an integer"),
    ({"tp_degree": 0}, "tp_degree must be >= 1"),
    ({"lookup_ngram": "3"}, "lookup_ngram must be an integer"),
    ({"datastore": 1}, "datastore must be True, False or 'auto'"),
    ({"max_length": 10**12, "prefill_buckets": (16,)}, r"needs about .* GiB .* more than the .* GiB of memory"),
])
def test_engine_refuses_wrong_types_ranges_and_sizes_before_loading(kwargs, match, tiny_llama_dir, no_model_loads):
    with pytest.raises(ConfigError, match=match):
        make_engine(tiny_llama_dir, **{"max_length": 64, "prefill_buckets": (16, 32), **kwargs})


def test_memory_refusal_names_the_option_and_the_number(capsys, tiny_llama_dir, no_model_loads):
    line = _refused(capsys, ["generate", "hi", "--model", str(tiny_llama_dir), *TINY, "--max-length", str(10**11)])
    assert "GiB of memory available" in line and "--max-length (100000000000)" in line


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return make_engine(tiny_llama_dir, mode="plain", max_length=64, prefill_buckets=(16, 32))


@pytest.mark.parametrize("prompts, match", [
    ([[1.5, 2.0]], "prompt 1: token 0 is 1.5, not an integer token id"),
    ([[5, 6], [True, 7]], "prompt 2: token 0 is True"),
    ([123], "prompt 1 is a int"),
    ([None], "prompt 1 is null"),
    (["fine", "bad \udce9"], "prompt 2: it is not valid UTF-8"),
    (3.5, "prompts must be text"),
])
def test_generate_refuses_prompts_of_the_wrong_type(engine, prompts, match):
    with pytest.raises(PromptError, match=match):
        engine.generate(prompts, SamplingParams(max_new_tokens=2))


def test_stop_token_ids_outside_the_vocabulary_are_refused(engine):
    with pytest.raises(ConfigError, match="stop_token_ids .* outside the vocabulary"):
        engine.generate([[5, 6]], SamplingParams(max_new_tokens=2, stop_token_ids=(10**7,)))


@pytest.mark.parametrize("value", [123, None, ["a"], True, {"x": 1}])
def test_non_string_prompt_in_a_prompts_file_is_refused_naming_the_line(value, tmp_path, capsys, tiny_llama_dir,
                                                                       no_model_loads):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n\n' + json.dumps({"prompt": value}) + "\n")
    line = _refused(capsys, ["generate", "--prompts-file", str(prompts), "--model", str(tiny_llama_dir), *TINY])
    assert "p.jsonl:3 (prompt 2)" in line and "not text" in line


def test_text_that_is_not_utf8_is_refused(tmp_path, capsys, tiny_llama_dir, no_model_loads):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    line = _refused(capsys, ["generate", "--prompts-file", str(latin), "--model", str(tiny_llama_dir), *TINY])
    assert "latin.jsonl:2: not valid UTF-8 (byte 0xe9" in line
    surrogate = tmp_path / "half.jsonl"
    surrogate.write_text('{"prompt": "half \\ud800 pair"}\n')
    line = _refused(capsys, ["generate", "--prompts-file", str(surrogate), "--model", str(tiny_llama_dir), *TINY])
    assert "half.jsonl:1 (prompt 1): it is not valid UTF-8" in line
    # A command-line argument of undecodable bytes, as the shell passes it.
    result = subprocess.run([sys.executable, "-m", "neuron_peagle.cli", "generate", b"caf\xe9",
                             "--model", str(tiny_llama_dir), *TINY], capture_output=True, cwd=REPO, timeout=300)
    assert result.returncode == 2 and result.stdout == b""
    assert result.stderr.decode().strip() == "neuron-peagle: error: prompt 1: it is not valid UTF-8 (character 4 is " \
                                             "'\\udce9')"


def test_standard_input_as_a_prompts_file(monkeypatch, capsys, tiny_llama_dir):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"prompt": "hello"}\n{"prompt": "x"}\n')))
    assert main(["generate", "--prompts-file", "-", "--model", str(tiny_llama_dir), "--json", *TINY]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prompt_number"], r["prompt"]) for r in records] == [(1, "hello"), (2, "x")]


def test_ignore_eos_on_the_command_line(tmp_path, capsys, tiny_llama_dir):
    first = json.loads(_json_run(capsys, tiny_llama_dir, "--mode", "plain"))["output_ids"][0]
    stops_at_first = edited_model_dir(tiny_llama_dir, tmp_path / "model", lambda c: {**c, "eos_token_id": first})
    stopped = json.loads(_json_run(capsys, stops_at_first, "--mode", "plain"))
    assert stopped["output_ids"] == [first] and stopped["finish_reason"] == "stop"
    ignored = json.loads(_json_run(capsys, stops_at_first, "--mode", "plain", "--ignore-eos"))
    assert len(ignored["output_ids"]) == 5 and ignored["finish_reason"] == "length"


def _json_run(capsys, model_dir, *args) -> str:
    assert main(["generate", "hello there", "--model", str(model_dir), "--json", *TINY, *args]) == 0
    return capsys.readouterr().out


# ---- interrupted runs keep every finished record -----------------------------------------------------

def _interrupt_at_admission(monkeypatch, number: int) -> None:
    """Ctrl-C when the `number`-th request (from 1) is about to enter a slot."""
    from neuron_peagle.runtime import host_loop

    admitted = []
    real_admit = host_loop._admit

    def admit(*args, **kwargs):
        admitted.append(1)
        if len(admitted) == number:
            raise KeyboardInterrupt
        return real_admit(*args, **kwargs)

    monkeypatch.setattr(host_loop, "_admit", admit)


def test_interrupt_keeps_the_finished_records_in_order(monkeypatch, tmp_path, capsys, tiny_llama_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt number {i}"}) + "\n" for i in range(7)))
    # Two slots, every request 5 tokens: requests 3 and 4 finish together, then request 5 would enter.
    _interrupt_at_admission(monkeypatch, 5)
    code = main(["generate", "--prompts-file", str(prompts), "--model", str(tiny_llama_dir), "--json",
                 "--batch-size", "2", "--ignore-eos", *TINY])
    out, err = capsys.readouterr()
    assert code == 130, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt_number"] for r in records] == [1, 2, 3, 4]
    assert err.strip().splitlines()[-1] == ("neuron-peagle: interrupted: 4 of 7 prompts finished (their records "
                                            "are printed)")


def test_the_api_hands_over_finished_outputs_when_interrupted(engine, monkeypatch):
    seen = []
    _interrupt_at_admission(monkeypatch, 3)  # one slot: requests 0 and 1 are finished by then
    with pytest.raises(GenerationInterrupted) as stop:
        engine.generate([[5, 6], [7, 8], [9, 10]], SamplingParams(max_new_tokens=3),
                        on_output=lambda i, out: seen.append(i))
    assert seen == [0, 1] and sorted(stop.value.outputs) == [0, 1] and stop.value.total == 3
    assert isinstance(stop.value, KeyboardInterrupt)


def test_outputs_stream_in_input_order_as_they_finish(engine):
    order = []
    outputs = engine.generate([[5, 6], [7, 8, 9], [10]], SamplingParams(max_new_tokens=3),
                              on_output=lambda i, out: order.append((i, out.output_ids)))
    assert order == [(i, out.output_ids) for i, out in enumerate(outputs)]


def _sigint_as_in_a_terminal() -> None:
    """The child starts with SIGINT at its default, as under a terminal: a suite run as a background job
    of a non-interactive shell has SIGINT ignored, which children inherit (and the CLI then respects)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_stops_a_real_run_exits_130_and_keeps_what_finished(tmp_path, tiny_llama_dir):
    prompts = tmp_path / "p.jsonl"
    # Enough prompts that the run cannot finish before the signal lands, even on a loaded machine.
    prompts.write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(3000)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "neuron_peagle.cli", "generate", "--prompts-file", str(prompts),
                                "--model", str(tiny_llama_dir), "--json", *TINY, "--max-new-tokens", "20",
                                "--ignore-eos"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=_sigint_as_in_a_terminal)
    first = process.stdout.readline()
    process.send_signal(signal.SIGINT)
    rest, err = process.communicate(timeout=300)
    lines = [first] + rest.splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert process.returncode == 130, err
    assert [r["prompt_number"] for r in records] == list(range(1, len(records) + 1))
    assert 1 <= len(records) < 3000
    assert err.strip().splitlines()[-1] == (f"neuron-peagle: interrupted: {len(records)} of 3000 prompts finished "
                                            "(their records are printed)")
    assert "Traceback" not in err


# ---- options given explicitly are told apart from defaults -------------------------------------------

def test_given_options_are_told_apart_from_defaults():
    assert given_options(build_parser, ["generate", "hi", "-k", "7"]) == {"prompt", "num_speculative_tokens"}
    assert given_options(build_parser, ["generate", "--max-length=1024", "--json"]) == {"max_length", "json"}
    assert given_options(build_parser, ["profile", "hi", "--out", "d"]) == {"prompt", "out"}


@pytest.fixture
def k3_artifacts(tmp_path, tiny_llama_dir):
    """A manifest for K=3 (no graphs: every refusal below comes before any graph is looked at)."""
    out = tmp_path / "artifacts"
    out.mkdir()
    Manifest(backend="inductor", versions=installed_versions("inductor"),
             build=BuildConfig(max_length=64, prefill_buckets=(16, 32), backend="inductor"),
             speculation=SpeculationConfig(num_speculative_tokens=3, **DRAFTER_ALONE), tp_degree=1, target="trn1", model=WeightsInfo.of_dir(tiny_llama_dir),
             drafter=WeightsInfo(None, random_seed=0), graphs=(), audit_notes=()).save(out)
    return out


@pytest.mark.parametrize("option, message", [
    (["-k", "7"], "--num-speculative-tokens 3 (requested: 7)"),
    (["--max-length", "1024"], "--max-length 64 (requested: 1024)"),
    (["--kernels", "nki"], "kernels reference (requested: nki)"),
    (["--datastore", "on"], "datastore False (requested: True)"),
])
def test_an_option_given_at_its_default_value_must_match_the_artifacts(option, message, k3_artifacts, capsys,
                                                                       no_model_loads):
    line = _refused(capsys, ["generate", "hi", "--artifacts", str(k3_artifacts), *option])
    assert "the artifacts were built for" in line and message in line


@pytest.mark.parametrize("edit, match", [
    (lambda c: [c], "expected a JSON object"),
    (lambda c: {**c, "hidden_size": "wide"}, "hidden_size must be an integer, got 'wide'"),
    (lambda c: {**c, "eos_token_id": "two"}, "a field has a value of the wrong type"),
])
def test_a_malformed_model_config_is_refused_naming_it(edit, match, tmp_path, tiny_llama_dir, capsys, no_model_loads):
    model = edited_model_dir(tiny_llama_dir, tmp_path / "model", edit)
    line = _refused(capsys, ["generate", "hi", "--model", str(model), *TINY])
    assert "config.json" in line and re.search(match, line)


def test_a_corrupt_tokenizer_is_refused_naming_the_model(tmp_path, tiny_llama_dir, capsys, no_model_loads):
    model = edited_model_dir(tiny_llama_dir, tmp_path / "model", files={"tokenizer.json": "{not json"})
    line = _refused(capsys, ["generate", "hi", "--model", str(model), *TINY])
    assert "its tokenizer cannot be loaded" in line


def test_the_public_api_is_importable_from_the_package():
    import neuron_peagle

    assert neuron_peagle.Engine is Engine and neuron_peagle.SamplingParams is SamplingParams
    assert neuron_peagle.GenerationInterrupted is GenerationInterrupted
    with pytest.raises(AttributeError):
        neuron_peagle.NoSuchThing  # noqa: B018
