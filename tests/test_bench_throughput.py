"""`npr bench throughput --quick` through the command line: every case of the quick grid is there,
with consistent token counts and timings, and npr and HF decoded the same weights (greedy plain
decoding writes the same tokens)."""
import json
import time

import pytest
import torch

from npr import cli


def test_bench_throughput_quick_rows(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    assert cli.main(["bench", "throughput", "--quick", "--json", str(out)]) == 0
    assert "== throughput" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    cases = {(r["model"], r["mode"], r["rows"], r["temperature"]) for r in rows}
    assert cases == {("tiny", m, n, t) for m in ("plain", "parallel") for n in (1, 8) for t in (0.0, 1.0)}
    assert len(rows) == len(cases)
    per_request = {}
    for r in rows:
        for who in ("npr", "hf"):
            assert r[f"{who}_tok_s"] > 0 and r[f"{who}_steps"] >= 1
            assert 0 <= r[f"{who}_host_ms_per_step"] <= r[f"{who}_ms_per_step"]
            assert 0 <= r[f"{who}_host_share"] <= 1
            # tokens/s and ms per step describe the same wall time
            wall = r["tokens"] / r[f"{who}_tok_s"]
            assert wall == pytest.approx(r[f"{who}_ms_per_step"] * r[f"{who}_steps"] / 1e3, rel=1e-6)
        assert r["speedup_vs_hf"] == pytest.approx(r["npr_tok_s"] / r["hf_tok_s"])
        assert r["npr_preemptions"] == 0  # the KV pool is sized for the case
        assert r["read_gbs"] > 0 and r["gemm_gflops"] > 0 and r["roofline_tok_s"] > 0
        # a lower bound on time: npr / HF cannot beat it by much (the GEMM reference is torch.mm)
        assert 0 < r["npr_share_of_roofline"] < 1.5 and 0 < r["hf_share_of_roofline"] < 1.5
        if r["mode"] == "plain":
            assert r["branches"] == 1 and r["tokens"] == 16 * r["rows"]  # --quick: 16 new tokens
            assert r["hf_steps"] == 16  # one forward per token
            assert 16 <= r["npr_steps"] <= 17  # one step per token (and maybe one for the prompt)
            if r["temperature"] == 0:
                assert r["greedy_agree"] == 1.0  # same weights, same argmax
        else:
            assert r["branches"] == 8 and r["tokens"] % r["rows"] == 0
            per_request.setdefault(r["mode"], set()).add(r["tokens"] // r["rows"])
            assert r["hf_steps"] == r["tokens"] // r["rows"]  # HF writes as many per sequence
            # 8 branches decode side by side: fewer steps than tokens per request
            assert r["npr_steps"] < r["tokens"] // r["rows"]
    assert len(per_request["parallel"]) == 1  # the forced structure fixes the token count
    assert per_request["parallel"].pop() > 8 * 2  # 8 branches of 2 content tokens, tags, labels
    assert not any(r["npr_decode_graphs"] for r in rows)


def test_bench_throughput_decode_graphs_flag(tmp_path):
    # on CPU the flag runs the graphs' eager twin: same tokens, same step count
    out = tmp_path / "throughput.json"
    assert cli.main(["bench", "throughput", "--quick", "--no-hf", "--modes", "plain",
                     "--temperatures", "0", "--decode-graphs",
                     "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["npr_decode_graphs"] for r in rows)
    for r in rows:  # --quick keeps its grid: 16 tokens a sequence
        assert r["tokens"] == 16 * r["rows"] and 16 <= r["npr_steps"] <= 17


def test_bench_throughput_smollm2_from_a_folder(tmp_path):
    # where no GGUF is (a GPU machine), --smollm2 takes an HF folder: here the tiny one
    from npr.bench.throughput import tiny_model_folder

    folder = tiny_model_folder(str(tmp_path / "stand-in"))
    out = tmp_path / "throughput.json"
    assert cli.main(["bench", "throughput", "--models", "smollm2", "--smollm2", folder,
                     "--rows", "2", "--modes", "plain", "--temperatures", "1",
                     "--prompt-tokens", "4", "--new-tokens", "5", "--repeat", "1", "--no-hf",
                     "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["rows"]
    assert r["model"] == "smollm2" and r["weights"] == "stand-in" and r["tokens"] == 2 * 5


SMALL = ["--models", "tiny", "--modes", "plain", "--temperatures", "0", "--prompt-tokens", "4",
         "--new-tokens", "5", "--repeat", "1"]


def test_bench_throughput_device_busy_fields(tmp_path, monkeypatch):
    # measured on GPUs only; here the profiler's CPU twin (ops on CPU) runs the same code
    from npr.bench import throughput

    monkeypatch.setattr(throughput, "_measures_busy", lambda device: True)
    out = tmp_path / "throughput.json"
    assert cli.main(["bench", "throughput", *SMALL, "--rows", "2", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["rows"]
    for m in ("npr", "hf"):
        assert 0 < r[f"{m}_device_ms_per_step"] < 1e3 and 0 < r[f"{m}_device_share"] < 10


def test_bench_throughput_no_busy_fields_on_cpu(tmp_path):
    out = tmp_path / "throughput.json"
    assert cli.main(["bench", "throughput", *SMALL, "--rows", "1", "--no-hf",
                     "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["rows"]
    assert "npr_device_share" not in r


def test_union_seconds_and_busy_twin():
    from npr.bench.common import busy_s, union_seconds

    assert union_seconds([(3, 4), (0, 1), (0.5, 2), (3.2, 3.5)]) == pytest.approx(3.0)
    assert union_seconds([]) == 0.0

    def work():
        a = torch.randn(256, 256)
        for _ in range(10):
            a = (a @ a) / 256
        time.sleep(0.2)  # not busy
        return 7

    t0 = time.perf_counter()
    out, busy = busy_s(work, "cpu")
    assert out == 7 and 0 < busy < time.perf_counter() - t0 - 0.15


@pytest.mark.parametrize("argv,match", [
    (["--rows", "0"], "--rows"), (["--rows", "a"], "--rows"), (["--models", "gpt"], "tiny"),
    (["--modes", "fast"], "plain"), (["--temperatures", "-1"], "temperatures"),
    (["--branches", "9"], "branches")])
def test_bench_throughput_bad_options(argv, match):
    with pytest.raises(ValueError, match=match):
        cli.main(["bench", "throughput", *argv])


def test_linear_params_counts_every_linear_weight(tmp_path):
    import npr
    from npr.bench.throughput import linear_params, roofline_s, tiny_model_folder

    model = npr.load_model(tiny_model_folder(str(tmp_path / "tiny")))
    cfg = model.config
    want = sum(p.numel() for name, p in model.named_parameters()
               if p.dim() == 2 and "embed" not in name) + (cfg.vocab_size * cfg.hidden_size
                                                           if cfg.tie_word_embeddings else 0)
    assert linear_params(cfg) == want
    # compute-bound at many tokens, bandwidth-bound at few
    w = linear_params(cfg)
    assert roofline_s(cfg, 10**6, 1, 1.0, 1.0) == pytest.approx(2.0 * w * 10**6 / 1e9)
    assert roofline_s(cfg, 1, 10**6, 1.0, 1e9) == pytest.approx(10**6 * 4.0 * w / 1e9)
