"""Per-request parameters (issue 35, part 2): `generate(prompts, params)` takes one SamplingParams or one per
prompt, and a prompts file may carry each line's max_new_tokens, temperature, top_k, top_p, seed and stop;
a request's tokens do not depend on its neighbours' parameters (greedy: the tokens it gets alone; sampled:
its seeded stream), and a bad setting is refused, naming the line and field, before any model loads."""

from __future__ import annotations

import json

import pytest

from conftest import save_tiny_model
from neuron_peagle.cli import main
from neuron_peagle.config import DrafterConfig, ModelConfig
from neuron_peagle.errors import ConfigError, PromptError
from neuron_peagle.models.drafter_io import save_drafter
from neuron_peagle.models.target import default_feature_layers
from neuron_peagle.runtime.drafter_choice import random_drafter
from neuron_peagle.runtime.engine import SamplingParams
from spec_helpers import make_engine
from test_reliability import no_model_loads  # noqa: F401  (fixture)

PROMPTS = [[4, 7, 12], [20, 21, 22, 23], [5, 7, 13, 5, 7], [9, 9, 3], [11, 40, 2]]
MIXED = [SamplingParams(max_new_tokens=20, ignore_eos=True),
         SamplingParams(max_new_tokens=20, ignore_eos=True, temperature=0.8, top_k=20, seed=3),
         SamplingParams(max_new_tokens=5, ignore_eos=True),
         SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=1.1, top_p=0.9, seed=9),
         SamplingParams(max_new_tokens=16, ignore_eos=True, stop_token_ids=(3,))]


@pytest.fixture(scope="module")
def model_and_drafter(tmp_path_factory):
    root = tmp_path_factory.mktemp("per_request")
    model_dir = save_tiny_model(root / "model", "llama", vocab_size=64, seed=7, num_hidden_layers=2)
    target = ModelConfig.from_dir(model_dir)
    drafter = DrafterConfig.for_target(target, default_feature_layers(2), draft_vocab_size=64, intermediate_size=64)
    return model_dir, save_drafter(random_drafter(drafter, 96, seed=3), root / "drafter")


@pytest.mark.parametrize("mode", ["plain", "parallel"])
def test_each_request_gets_what_it_gets_alone_whatever_its_neighbours_ask(model_and_drafter, mode):
    model_dir, drafter_dir = model_and_drafter
    options = dict(mode=mode, num_speculative_tokens=3) if mode == "parallel" else dict(mode="plain")
    engine = make_engine(model_dir, drafter_dir if mode == "parallel" else None, batch_size=2, max_length=96,
                         prefill_buckets=(16,), **options)
    together = engine.generate(PROMPTS, MIXED)  # three groups of two, each mixing greedy and sampled rows
    alone = [engine.generate([prompt], params)[0] for prompt, params in zip(PROMPTS, MIXED)]
    assert [o.output_ids for o in together] == [o.output_ids for o in alone]
    assert [len(o.output_ids) for o in together][:4] == [20, 20, 5, 12]
    assert 3 not in together[4].output_ids[:-1]  # its own stop token ended it, or its length did


def test_params_must_be_one_or_one_per_prompt(model_and_drafter):
    engine = make_engine(model_and_drafter[0], batch_size=2, max_length=96, prefill_buckets=(16,), mode="plain")
    with pytest.raises(ConfigError, match="one SamplingParams per prompt: 5 prompts, 2 params"):
        engine.generate(PROMPTS, MIXED[:2])
    with pytest.raises(ConfigError, match="params 2 must be a SamplingParams, got dict"):
        engine.generate(PROMPTS[:2], [MIXED[0], {"temperature": 0.5}])
    with pytest.raises(PromptError, match="prompt 2: 4 prompt tokens \\+ max_new_tokens 95"):  # per request
        engine.generate(PROMPTS[:2], [MIXED[0], SamplingParams(max_new_tokens=95)])


ARGS = ["--max-length", "96", "--prefill-buckets", "16", "--backend", "eager", "--no-chat-template", "--json",
        "--ignore-eos", "--mode", "plain", "--max-new-tokens", "6"]


def test_a_prompts_file_line_carries_its_own_settings(tiny_llama_dir, tmp_path, capsys):
    model_dir = tiny_llama_dir  # the default model's vocabulary: the prompts are text
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "a b c"}, {"prompt": "d e", "max_new_tokens": 3},
        {"prompt": "f g h", "temperature": 0.7, "top_k": 10, "top_p": 0.95, "seed": 5, "max_new_tokens": 9},
        {"prompt": "i", "id": "kept aside"}]) + "\n")
    assert main(["generate", "--prompts-file", str(prompts), "--model", str(model_dir), *ARGS]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(r["output_ids"]) for r in records] == [6, 3, 9, 6]
    engine = make_engine(model_dir, batch_size=1, max_length=96, prefill_buckets=(16,), mode="plain")
    want = engine.generate([records[2]["prompt_ids"]], SamplingParams(max_new_tokens=9, temperature=0.7, top_k=10,
                                                                        top_p=0.95, seed=5, ignore_eos=True))[0]
    assert records[2]["output_ids"] == want.output_ids  # the line's seeded stream


@pytest.mark.parametrize("line, message", [
    ({"prompt": "x", "top_p": 2}, "p.jsonl:2 (prompt 2): top_p"),
    ({"prompt": "x", "max_new_tokens": "ten"}, "p.jsonl:2 (prompt 2): max_new_tokens"),
    ({"prompt": "x", "temperature": -1}, "p.jsonl:2 (prompt 2): temperature"),
    ({"prompt": "x", "seed": 1.5}, "p.jsonl:2 (prompt 2): seed"),
    ({"prompt": "x", "stop": [""]}, "p.jsonl:2 (prompt 2): stop strings must be non-empty"),
    ({"prompt": "x", "max_new_tokens": 200}, "prompt 2: 1 prompt tokens + "),  # its own length, checked per request
])
def test_a_bad_setting_on_a_line_is_refused_before_any_model_loads(tiny_llama_dir, tmp_path, capsys, line,
                                                                   message, no_model_loads):  # noqa: F811
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(line) + "\n")
    assert main(["generate", "--prompts-file", str(prompts), "--model", str(tiny_llama_dir), *ARGS]) == 2
    assert message in capsys.readouterr().err
