"""The JSONL data readers (tasks, RL prompts, SFT examples) over npr.jsonl.read_rows: blank lines
skipped, and each kind of bad row refused with its file and line."""
import json

import pytest

from npr.jsonl import read_rows
from npr.tasks import read_jsonl
from npr.train.data import load_jsonl
from npr.train.sft import load_sft_jsonl


def _sft(path):
    from tiny import tiny_tokenizer

    return load_sft_jsonl(path, tiny_tokenizer())


READERS = {  # reader, a good row, its required keys
    "tasks": (read_jsonl, {"problem": "1+1", "answer": 2}, ("problem", "answer")),
    "prompts": (load_jsonl, {"problem": "1+1", "answer": 2}, ("problem", "answer")),
    "sft": (_sft, {"prompt": "hi", "response": "yes", "parallel": False}, ("prompt", "response")),
}


def test_read_rows_skips_blank_lines_and_numbers_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n\n  \n{"a": 2, "b": 3}\n')
    assert list(read_rows(str(p), ("a",))) == [(1, {"a": 1}), (4, {"a": 2, "b": 3})]


@pytest.mark.parametrize("name", READERS)
def test_readers_take_good_rows(tmp_path, name):
    read, good, _ = READERS[name]
    p = tmp_path / "good.jsonl"
    p.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    assert len(read(str(p))) == 2


@pytest.mark.parametrize("name", READERS)
@pytest.mark.parametrize("bad,match", [
    ("{not json", "bad.jsonl:3: not JSON"), ("[1, 2]", "bad.jsonl:3: a row needs the keys"),
    ("{}", "bad.jsonl:3: a row needs the keys")])
def test_readers_name_the_bad_line(tmp_path, name, bad, match):
    read, good, keys = READERS[name]
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(good) + "\n\n" + bad + "\n")
    with pytest.raises(ValueError, match=match) as e:
        read(str(p))
    assert all(f"'{k}'" in str(e.value) for k in keys) or "not JSON" in match


@pytest.mark.parametrize("name", READERS)
def test_readers_refuse_an_empty_file(tmp_path, name):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        READERS[name][0](str(p))
