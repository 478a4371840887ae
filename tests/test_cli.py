"""The command line is scriptable: JSON lines, prompt files, clear errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from neuron_peagle.cli import main
from spec_helpers import make_engine

TINY_ARGS = ["--max-length", "64", "--prefill-buckets", "16,32", "--max-new-tokens", "5", "--backend", "eager"]


def test_generate_json_lines_from_a_prompts_file(tmp_path, tiny_llama_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["hello", "two words", "x"]) + "\n")
    code = main(["generate", "--prompts-file", str(prompts), "--model", str(tiny_llama_dir), "--json",
                 "--batch-size", "2", "--no-chat-template", *TINY_ARGS])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in lines] == ["hello", "two words", "x"]
    for record in lines:
        assert record["model_dir"] == str(tiny_llama_dir)
        assert 1 <= len(record["output_ids"]) <= 5
        assert record["prompt_ids"] and record["tokens_per_s"] >= 0
        assert isinstance(record["text"], str)


def test_cli_tokens_equal_api_tokens(tiny_llama_dir, capsys):
    from neuron_peagle.runtime.engine import SamplingParams

    main(["generate", "hello there", "--model", str(tiny_llama_dir), "--json", *TINY_ARGS])
    record = json.loads(capsys.readouterr().out)
    engine = make_engine(tiny_llama_dir, max_length=64, prefill_buckets=(16, 32))
    expected = engine.generate(["hello there"], SamplingParams(max_new_tokens=5))[0]
    assert record["output_ids"] == expected.output_ids
    assert record["prompt_ids"] == expected.prompt_ids


def test_prompt_too_long_is_a_clear_error(tiny_llama_dir, capsys):
    code = main(["generate", "word " * 100, "--model", str(tiny_llama_dir), *TINY_ARGS])
    assert code == 2
    assert "largest prefill bucket (32)" in capsys.readouterr().err


def test_bad_prompts_file_line_is_named(tmp_path, tiny_llama_dir, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    code = main(["generate", "--prompts-file", str(prompts), "--model", str(tiny_llama_dir), *TINY_ARGS])
    assert code == 2
    assert "p.jsonl:2" in capsys.readouterr().err


def test_missing_model_dir_is_a_clear_error(tmp_path, capsys):
    code = main(["generate", "hi", "--model", str(tmp_path / "absent"), *TINY_ARGS])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_context_lookup_is_on_by_default_in_speculative_modes_and_off_in_plain(tiny_llama_dir, capsys):
    from neuron_peagle.speculation import DEFAULT_LOOKUP_NGRAM

    records = {}
    for mode in ("parallel", "plain"):
        assert main(["generate", "hello there", "--model", str(tiny_llama_dir), "--json", "--mode", mode,
                     *TINY_ARGS]) == 0
        records[mode] = json.loads(capsys.readouterr().out)
    assert DEFAULT_LOOKUP_NGRAM >= 2
    assert records["parallel"]["lookup_ngram"] == DEFAULT_LOOKUP_NGRAM
    assert records["plain"]["lookup_ngram"] == 0
    assert records["parallel"]["output_ids"] == records["plain"]["output_ids"]
    assert main(["generate", "hello there", "--model", str(tiny_llama_dir), "--json", "--lookup-ngram", "0",
                 *TINY_ARGS]) == 0
    assert json.loads(capsys.readouterr().out)["lookup_ngram"] == 0


def test_the_short_k_and_plain_step_are_on_by_default_on_cpu_and_where_lookup_is_and_k_is_longer(tiny_llama_dir,
                                                                                                capsys):
    from neuron_peagle.speculation import DEFAULT_SHORT_DRAFT_TOKENS, SpeculationConfig

    def chosen(*args: str) -> tuple[int, bool]:
        assert main(["generate", "hello there", "--model", str(tiny_llama_dir), "--json", *args, *TINY_ARGS]) == 0
        out = json.loads(capsys.readouterr().out)
        return out["short_draft_tokens"], out["plain_step"]

    def short_k(*args: str) -> int:
        return chosen(*args)[0]

    assert 0 < DEFAULT_SHORT_DRAFT_TOKENS < 7
    assert chosen() == (DEFAULT_SHORT_DRAFT_TOKENS, True)  # K=7, a CPU backend at batch 1: K chosen by cost
    assert short_k("-k", str(DEFAULT_SHORT_DRAFT_TOKENS)) == 0  # nothing shorter to switch to
    assert chosen("--lookup-ngram", "0") == (DEFAULT_SHORT_DRAFT_TOKENS, True)  # the drafter alone too, on CPU
    assert chosen("--plain-step", "off") == (DEFAULT_SHORT_DRAFT_TOKENS, False)
    assert short_k("--mode", "plain") == 0
    # A backend that does not choose K at batch 1 (NeuronCores): only where lookup is on without a datastore.
    for lookup, short in ((0, 0), (5, DEFAULT_SHORT_DRAFT_TOKENS)):
        spec = SpeculationConfig(lookup_ngram=lookup).resolved(False, 1, k_choice_at_batch_1=False)
        assert (spec.short_draft_tokens, spec.plain_step) == (short, False)
        assert SpeculationConfig(lookup_ngram=lookup).resolved(False, 2).plain_step  # above batch 1: always
    assert short_k("--short-draft-tokens", "2") == 2
    assert short_k("--lookup-ngram", "0", "--short-draft-tokens", "2") == 2  # chosen by cost, lookup or not
    assert main(["generate", "hi", "--model", str(tiny_llama_dir), "--short-draft-tokens", "7", *TINY_ARGS]) == 2
    assert "(a second K) must be below --num-speculative-tokens 7, got 7" in capsys.readouterr().err


def test_datastore_option_is_auto_by_default_and_refused_where_there_is_none(tiny_llama_dir, capsys):
    def datastore(*args: str) -> bool:
        assert main(["generate", "hello there", "--model", str(tiny_llama_dir), "--json", *args, *TINY_ARGS]) == 0
        return json.loads(capsys.readouterr().out)["datastore"]

    assert datastore() is False  # auto: the tiny model's random-init drafter has no datastore
    assert datastore("--datastore", "off") is False
    assert main(["generate", "hi", "--model", str(tiny_llama_dir), "--datastore", "on", *TINY_ARGS]) == 2
    assert "drafter is random-init" in capsys.readouterr().err
    assert main(["generate", "hi", "--datastore", "maybe"]) == 2
    assert "expected auto, on or off" in capsys.readouterr().err


def test_backend_is_inductor_by_default_and_help_names_every_backend(capsys):
    from neuron_peagle.cli import build_parser
    from neuron_peagle.capabilities import BACKENDS

    from neuron_peagle.cli import backend_of

    assert backend_of(build_parser().parse_args(["generate", "hi"])) == "inductor"
    assert backend_of(build_parser().parse_args(["generate", "hi", "--tp-degree", "2"])) == "inductor"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    assert all(f"{name}:{''.join(caps.help.split())}" in text for name, caps in BACKENDS.items())
