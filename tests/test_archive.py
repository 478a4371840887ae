"""The repository's archive of training responses: round trip, merge, refusals, the committed file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from neuron_peagle.errors import ModelDirError
from neuron_peagle.training.archive import merge_archive, read_archive, write_archive
from neuron_peagle.training.data import Example, read_examples

ARCHIVE = Path(__file__).resolve().parents[1] / "training_data" / "SmolLM2-135M-Instruct.jsonl.gz"
VOCAB = 100


def _examples() -> list[Example]:
    return [Example("math", [5, 6], [7, 8, 9]), Example("code", [1, 2, 3], [4]), Example("chat", [9], []),
            Example("code", [1, 2, 3], [99])]  # a repeat of a prompt: the first answer is kept


def test_the_archive_keeps_one_answer_per_prompt_in_a_fixed_order_byte_for_byte(tmp_path):
    assert write_archive(_examples(), tmp_path / "a.jsonl.gz") == 3
    assert [e.record() for e in read_archive(tmp_path / "a.jsonl.gz", VOCAB)] == [
        Example("code", [1, 2, 3], [4]).record(), Example("math", [5, 6], [7, 8, 9]).record(),
        Example("chat", [9], []).record()]
    write_archive(list(reversed(_examples()[:3])), tmp_path / "b.jsonl.gz")
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()


def test_merging_adds_only_the_prompts_the_work_directory_lacks(tmp_path):
    write_archive(_examples(), tmp_path / "a.jsonl.gz")
    responses = tmp_path / "work" / "responses.jsonl"
    responses.parent.mkdir()
    responses.write_text(json.dumps(Example("math", [5, 6], [1]).record()) + "\n")  # answered here already
    assert merge_archive(tmp_path / "a.jsonl.gz", responses, VOCAB) == 2
    assert merge_archive(tmp_path / "a.jsonl.gz", responses, VOCAB) == 0
    held = read_examples(responses)
    assert [(e.prompt_ids, e.response_ids) for e in held] == [([5, 6], [1]), ([1, 2, 3], [4]), ([9], [])]


@pytest.mark.parametrize("content,problem", [
    (b"not gzip at all", "not a readable"),
    (gzip.compress(b'{"domain": "code", "prompt_ids": [1]}\n'), "not a readable"),
    (gzip.compress(b'{"domain": "code", "prompt_ids": [1], "response_ids": [100]}\n'), "line 1"),
    (gzip.compress(b'{"domain": "poetry", "prompt_ids": [1], "response_ids": [2]}\n'), "line 1"),
    (gzip.compress(b'{"domain": "code", "prompt_ids": [1], "response_ids": [2]}\n{"dom'), "not a readable"),
])
def test_a_broken_archive_is_refused_by_name_and_the_work_directory_is_untouched(tmp_path, content, problem):
    (tmp_path / "a.jsonl.gz").write_bytes(content)
    responses = tmp_path / "responses.jsonl"
    responses.write_text(json.dumps(Example("math", [5, 6], [1]).record()) + "\n")
    before = responses.read_bytes()
    with pytest.raises(ModelDirError, match=problem) as error:
        merge_archive(tmp_path / "a.jsonl.gz", responses, VOCAB)
    assert "a.jsonl.gz" in str(error.value)
    assert responses.read_bytes() == before
    with pytest.raises(FileNotFoundError, match="no training-response archive"):
        read_archive(tmp_path / "missing.jsonl.gz", VOCAB)


@pytest.mark.slow
def test_the_committed_archive_belongs_to_the_default_model_and_holds_no_heldout_prompt(default_model_dir):
    from neuron_peagle.tokenizer import encode_prompt, load_tokenizer
    from neuron_peagle.training.prompt_sets import load_prompts

    examples = read_archive(ARCHIVE, vocab_size=49152)
    assert len(examples) >= 1000 and {e.domain for e in examples} == {"code", "math", "chat"}
    assert ARCHIVE.stat().st_size < 20 * 2**20
    tokenizer = load_tokenizer(default_model_dir)
    heldout = {tuple(encode_prompt(tokenizer, p.text)) for p in load_prompts("heldout")}
    assert not heldout & {tuple(e.prompt_ids) for e in examples}
    eos = tokenizer.eos_token_id
    # The target's own answers (greedy or sampled): each ends at its end-of-sequence token or at the length cap.
    assert all(e.response_ids and (e.response_ids[-1] == eos or eos not in e.response_ids) for e in examples)


def test_sampled_answers_are_kept_beside_the_greedy_answer_of_the_same_prompt(tmp_path):
    greedy, first, second = (Example("code", [1, 2], [3], 0), Example("code", [1, 2], [4], 1),
                             Example("code", [1, 2], [5], 2))
    assert "sample" not in greedy.record() and first.record()["sample"] == 1  # greedy lines keep their bytes
    assert write_archive([second, greedy, first, Example("code", [1, 2], [9], 1)], tmp_path / "a.jsonl.gz") == 3
    assert read_archive(tmp_path / "a.jsonl.gz", VOCAB) == [greedy, first, second]
    responses = tmp_path / "responses.jsonl"
    responses.write_text(json.dumps(first.record()) + "\n")
    assert merge_archive(tmp_path / "a.jsonl.gz", responses, VOCAB) == 2
    assert sorted((e.sample, e.response_ids) for e in read_examples(responses)) == [(0, [3]), (1, [4]), (2, [5])]
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(
        b'{"domain": "code", "prompt_ids": [1], "response_ids": [2], "sample": -1}\n'))
    with pytest.raises(ModelDirError, match="line 1"):
        read_archive(tmp_path / "bad.jsonl.gz", VOCAB)


def test_a_line_cut_short_by_a_stop_is_dropped_before_more_is_appended(tmp_path):
    write_archive(_examples(), tmp_path / "a.jsonl.gz")
    responses = tmp_path / "responses.jsonl"
    whole = json.dumps(Example("math", [5, 6], [1]).record()) + "\n"
    responses.write_text(whole + '{"domain": "code", "prompt_ids": [1, 2')  # a stop in mid-write
    assert [e.prompt_ids for e in read_examples(responses)] == [[5, 6]]
    assert merge_archive(tmp_path / "a.jsonl.gz", responses, VOCAB) == 2
    assert [e.prompt_ids for e in read_examples(responses)] == [[5, 6], [1, 2, 3], [9]]


def test_the_data_stage_uses_the_repositorys_archive_unless_told_otherwise(tmp_path):
    from scripts.train_drafter import archive_path

    model = tmp_path / "SmolLM2-135M-Instruct"
    assert archive_path(None, model) == ARCHIVE
    assert archive_path(Path("none"), model) is None
    assert archive_path(tmp_path / "mine.jsonl.gz", model) == tmp_path / "mine.jsonl.gz"
