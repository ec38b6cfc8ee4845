"""The command line: bench suites write JSON rows; generate streams and prints stats."""
import json

import pytest
import torch

from npr import cli
from tiny import tiny_tokenizer


def test_bench_kv_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "kv.json"
    assert cli.main(["bench", "kv", "--quick", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["machine"]["torch"] == torch.__version__
    assert payload["rows"] and all(isinstance(r, dict) for r in payload["rows"])
    assert "== kv" in capsys.readouterr().out


def test_bench_help_lists_the_suites_options(capsys):
    assert cli.main(["bench", "speedup", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--repeat" in out and "--branches" in out
    with pytest.raises(SystemExit) as e:  # no suite named: argparse's usage error
        cli.main(["bench"])
    assert e.value.code == 2


def test_unknown_command_fails():
    assert cli.main(["frobnicate"]) == 2


def test_generate_on_a_saved_model(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                      max_position_embeddings=512, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rc = cli.main(["generate", str(tmp_path), "--prompt", "abc", "--max-new-tokens", "12", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "-- finish:" in out and "structure valid" in out
