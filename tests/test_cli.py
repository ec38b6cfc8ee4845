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


def _saved_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                      max_position_embeddings=512, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("parallel", ["off", "native"])
def test_generate_prints_what_the_engine_generates(tmp_path, capsys, parallel):
    """`npr generate` streams the same greedy tokens and reports the same finish reason, structure
    verdict and token counts as Engine.generate on the same folder and prompt."""
    import npr

    path = _saved_model(tmp_path)
    rc = cli.main(["generate", path, "--prompt", "abc", "--max-new-tokens", "12", "--device", "cpu",
                   "--parallel", parallel])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    eng = npr.Engine(path, device="cpu")
    c = eng.generate(["abc"], npr.SamplingParams(temperature=0, max_new_tokens=12,
                                                 parallel=parallel))[0].outputs[0]
    assert c.token_ids
    finish = next(x for x in lines if x.startswith("-- finish:"))
    assert finish.split()[2] == c.finish_reason
    verdict = next(x for x in lines if x.startswith("-- structure valid:"))
    assert verdict.startswith(f"-- structure valid: {c.structure_valid};")
    assert f"'generated_tokens': {c.stats['generated_tokens']}" in verdict
    engine_line = next(x for x in lines if x.startswith("-- engine:"))
    assert int(engine_line.split()[2]) >= 1  # steps
    if parallel == "off":  # no branches: the stream is the completion's text, token by token
        streamed = "\n".join(lines[: lines.index(finish)])
        assert streamed == c.text
