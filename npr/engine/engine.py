"""npr.Engine: native parallel decoding (spec/NPR.md §3) behind a vLLM-like API.

One step: the C++ scheduler plans a batch (rows = live branches of all requests) -> the runner
runs the model over the paged branch-tree KV cache -> the sampler picks tokens -> the scheduler
forks, joins and finishes. generate() loops steps until every request is done.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from npr import _ext
from npr import format as fmt
from npr.engine.decode_graphs import DecodeGraphs
from npr.engine.outputs import CompletionOutput, RequestOutput
from npr.engine.runner import ModelRunner
from npr.engine.sampling import ProcessorError, Sampler, run_processors, sample_batch
from npr.engine.sampling_params import MODE_IDS, SamplingParams, is_int, token_ids
from npr.tags import TAGS


@dataclass
class _Request:
    request_id: int
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    t_start: float = field(default_factory=time.perf_counter)
    stop_hit: dict[int, str] = field(default_factory=dict)   # sample -> the stop string hit
    trunk_tail: dict[int, str] = field(default_factory=dict)  # sample -> recent trunk text
    trunk_pos: dict[int, int] = field(default_factory=dict)   # sample -> position of its last token


@contextlib.contextmanager
def _serial_torch_ops(logits: torch.Tensor):
    """Sampling's torch ops on CPU logits ([rows, V]: a few MB) run on the calling thread: an
    OpenMP team's end-of-region barrier would wait a scheduler slice for any team thread a busy
    neighbour process has descheduled (several times per step), for a split worth well under a
    millisecond. npr's own kernels use npr's pool, which does not wait on such threads."""
    n = torch.get_num_threads()
    if n == 1 or not logits.is_cpu:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class Engine:
    def __init__(
        self,
        model: str | torch.nn.Module,
        tokenizer: Any = None,
        *,
        block_size: int = 16,
        kv_cache_tokens: int | None = None,
        max_rows: int | None = None,
        max_branches: int = 8,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
        max_tokens_per_step: int = 2048,
        decode_weights: str = "auto",
        decode_graphs: bool = False,
    ) -> None:
        """decode_weights (CPU): "auto" lets decode steps read the linear weights from packed
        copies in the decode kernel's layout (8-output panels, same precision as the model; the
        model object gets these copies; steps of up to 128 rows), "bf16" / "fp16" store those
        copies at half the bytes (faster, lower precision), "plain" reads the weights as they
        are. With "auto" copies of an fp32 model on an AVX-512 CPU, steps of 9-256 rows read a
        second copy laid out for npr's GEMM (npr.ops.GemmPanels): each copy costs the linears'
        memory once more, made on first use and again after the weights change.

        decode_graphs: decode steps (each row one token, every token sampled, up to 256 rows)
        replay CUDA graphs captured per batch-size bucket, attention eager between the layers'
        pieces (npr.engine.decode_graphs). Off by default: not yet run on a GPU. True on CPU
        runs the same padded piecewise path without graphs (a test twin, slower than the
        default)."""
        C = _ext.require("npr.Engine")
        if isinstance(model, str):
            from npr.models.loader import load_model, load_tokenizer

            path = model
            model = load_model(path, dtype=dtype, device=str(device or "cpu"))
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
        if block_size < 1 or block_size > 1024:
            raise ValueError(f"Engine: block_size must be in 1..1024, got {block_size}")
        if max_branches < 1:
            raise ValueError(f"Engine: max_branches must be >= 1, got {max_branches}")
        if decode_weights not in ("auto", "bf16", "fp16", "plain"):
            raise ValueError(f"Engine: decode_weights must be auto|bf16|fp16|plain, got {decode_weights!r}")
        self.model = model
        self.tokenizer = tokenizer
        model_device = next(model.parameters()).device
        self.device = torch.device(device) if device is not None else model_device
        if self.device.type != model_device.type:
            raise ValueError(f"Engine: the model is on {model_device} but device={self.device}; "
                             f"move the model first (model.to(device))")
        self.dtype = dtype or next(model.parameters()).dtype
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"Engine: dtype must be float32, bfloat16 or float16, got {self.dtype}")
        self.block_size = block_size
        self.max_branches = max_branches
        self.max_context = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        kv_tokens = kv_cache_tokens if kv_cache_tokens is not None else 16384
        if kv_tokens < block_size:
            raise ValueError(f"Engine: kv_cache_tokens must be >= block_size ({block_size}), got {kv_tokens}")
        self.num_blocks = kv_tokens // block_size
        self.max_rows = max_rows if max_rows is not None else 256
        if self.max_rows < 1:
            raise ValueError(f"Engine: max_rows must be >= 1, got {self.max_rows}")

        # the ids the model embeds: prompts, stop ids, tags and step labels are checked against it
        self.vocab_size = int(getattr(model.config, "vocab_size", 1 << 31))
        self.tag_ids: dict[str, int] | None = self._find_tag_ids(tokenizer)
        self.eos_ids = self._eos_ids(tokenizer, model)
        labels: list[list[int]] = []
        if self.tag_ids is not None:
            labels = [self._encode(f"{k}:") for k in range(1, max_branches + 1)]
            # the engine writes these itself: the forward does not check ids again
            vocab = self.vocab_size
            bad = [t for t in [*self.tag_ids.values(), *sum(labels, [])] if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"Engine: the tokenizer's tag / step-label token id {bad[0]} is "
                                 f"outside the model's vocabulary (size {vocab}): resize the "
                                 f"model's embeddings after adding the tags (npr.tokenizer."
                                 f"add_tag_tokens does both)")
        self.scheduler = C.Scheduler(
            num_blocks=self.num_blocks, block_size=block_size, max_rows=self.max_rows,
            max_tokens_per_step=max_tokens_per_step, max_branches=max_branches,
            tag_ids=[self.tag_ids[t] for t in TAGS] if self.tag_ids else [], step_labels=labels,
            max_model_len=self.max_context,
        )
        graphs = (DecodeGraphs(model, self.max_rows, self.device,
                               capture=self.device.type == "cuda") if decode_graphs else None)
        self.runner = ModelRunner(model, self.num_blocks, block_size, self.dtype, self.device,
                                  graphs)
        # attention work items split segments into chunks of about this many tokens
        self._kv_chunk = 256 if self.device.type == "cuda" else 1024
        if self.device.type == "cpu" and decode_weights != "plain" and hasattr(model, "pack_weights"):
            packed = {"auto": model.dtype, "bf16": torch.bfloat16, "fp16": torch.float16}[decode_weights]
            model.pack_weights(packed)
        self.sampler = Sampler(seed)
        self._requests: dict[int, _Request] = {}
        self._pending_finished: list[int] = []   # finished ids not yet returned by step()
        self._next_id = 0
        self._sleeping = False
        self._stop_requests: set[int] = set()   # requests with stop strings (checked per row)
        self.stats = {"steps": 0, "forward_s": 0.0, "rows": 0, "tokens": 0}
        # Optional streaming hook: fn(request_id, sample, branch_id, token) per sampled token.
        self.on_token: Callable[[int, int, int, int], None] | None = None

    # ---------------------------------------------------------------- tokenizer helpers
    @staticmethod
    def _find_tag_ids(tokenizer: Any) -> dict[str, int] | None:
        if tokenizer is None:
            return None
        vocab = tokenizer.get_vocab()
        if not all(t in vocab for t in TAGS):
            return None
        return {t: int(vocab[t]) for t in TAGS}

    @staticmethod
    def _eos_ids(tokenizer: Any, model: torch.nn.Module) -> list[int]:
        ids: list[int] = []
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        if isinstance(eos, int):
            ids.append(eos)
        elif isinstance(eos, (list, tuple)):
            ids.extend(int(e) for e in eos)
        return ids

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("Engine: a text prompt needs a tokenizer (or pass input_ids=)")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    # ---------------------------------------------------------------- request API
    def add_request(self, prompt: str | None = None, params: SamplingParams | None = None, *,
                    input_ids: Sequence[int] | None = None) -> int:
        """Queues one prompt; returns its request id. Raises ValueError on bad input."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"Engine: sampling params must be SamplingParams, got {type(params).__name__}")
        if self._sleeping:
            raise RuntimeError("Engine: sleeping; call wake_up() first")
        ids = (token_ids(input_ids, "input_ids") if input_ids is not None
               else self._encode(prompt if prompt is not None else ""))
        self._validate(ids, params)
        rid = self._next_id
        self._next_id += 1
        max_branch = params.max_branch_tokens if params.max_branch_tokens is not None else 1 << 30
        stop_ids = list(self.eos_ids) + [int(t) for t in (params.stop_token_ids or [])]
        self.scheduler.add_request(rid, ids, params.n, params.max_new_tokens, max_branch,
                                   MODE_IDS[params.parallel], stop_ids)
        self._requests[rid] = _Request(rid, prompt, ids, params)
        self.sampler.add(rid, params)
        if params.stop:
            self._stop_requests.add(rid)
        return rid

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        """ids: Python ints already (token_ids)."""
        if not ids:
            raise ValueError("Engine: empty prompt")
        vocab = self.vocab_size
        bad = [t for t in ids if not (0 <= t < vocab)]
        if bad:
            raise ValueError(f"Engine: prompt token id {bad[0]} is outside the vocabulary (size {vocab})")
        bad = [t for t in params.stop_token_ids or () if not t < vocab]
        if bad:
            raise ValueError(f"Engine: stop token id {bad[0]} is outside the vocabulary "
                             f"(size {vocab}); it could never be sampled")
        if len(ids) >= self.max_context:
            raise ValueError(f"Engine: prompt of {len(ids)} tokens is longer than the model's context "
                             f"({self.max_context} positions, one needed for generation)")
        if len(ids) + 1 > self.num_blocks * self.block_size:
            raise ValueError(f"Engine: prompt of {len(ids)} tokens does not fit the KV cache "
                             f"({self.num_blocks * self.block_size} tokens); raise kv_cache_tokens")
        if params.parallel != "off" and self.tag_ids is None:
            raise ValueError("Engine: parallel='%s' needs the eight tag tokens in the tokenizer "
                             "(npr.tokenizer.add_tag_tokens) or use parallel='off'" % params.parallel)

    def has_unfinished_requests(self) -> bool:
        return bool(self.scheduler.has_unfinished())

    def step(self) -> list[RequestOutput]:
        """One batch step; returns the requests that finished in it.

        A logits processor whose result cannot be sampled from (not a tensor [V] of floats, any
        NaN or +inf, every token at -inf) finishes its request, every sample, with
        finish_reason "abort" and a finish_detail naming the processor and the request; the
        other requests go on. An exception raised inside a processor propagates (with a note
        naming it and the request): the requests of the step are aborted, the engine stays
        usable."""
        failed: dict[int, str] = {}  # sampling row -> why its request was aborted
        try:
            # the whole step's plan, attention work items included, built in C++
            plan = self.scheduler.schedule(kv_chunk=self._kv_chunk)
            n_rows = plan.num_rows
            tokens: list[int] = []
            logprobs: list[float] = []
            if n_rows:
                t0 = time.perf_counter()
                logits = self.runner.forward(plan)
                self.stats["forward_s"] += time.perf_counter() - t0
                self.stats["steps"] += 1
                self.stats["rows"] += n_rows
                self.stats["tokens"] += plan.num_tokens
                with _serial_torch_ops(logits):
                    tokens, logprobs = self._sample(plan, logits, failed)
            for i, why in failed.items():  # before update(): these rows get no token
                rid = int(plan.sample_request[i])
                for s in range(self._requests[rid].params.n):
                    self.scheduler.finish_sample(rid, s, "abort", why)
        except BaseException:
            # Leave no half-done step behind: abort what was in it, keep the engine usable.
            cancelled = set(self.scheduler.cancel_step())
            for rid in self.scheduler.take_finished():
                if rid in cancelled:
                    self._drop(rid)
                else:
                    self._pending_finished.append(rid)
            raise
        finished = self._pending_finished + list(self.scheduler.update(tokens, logprobs))
        self._pending_finished = []
        if self.on_token is not None and tokens:  # the hook wants every row's token
            for i, (rid, s, b, tok) in enumerate(zip(plan.sample_request.tolist(),
                                                     plan.sample_index.tolist(),
                                                     plan.sample_branch.tolist(), tokens)):
                if i not in failed:
                    self.on_token(rid, s, b, tok)
        if self._stop_requests and tokens:
            finished += self._check_stop_strings(plan, tokens, failed)
        return [self._collect(rid) for rid in finished]

    def _sample(self, plan: Any, logits: torch.Tensor,
                failed: dict[int, str]) -> tuple[list[int], list[float]]:
        """logits: [S, V] for the sampling rows in plan order -> (tokens, logprobs) as lists.
        All rows are sampled in one batch (npr.engine.sampling.sample_batch); only rows with
        logits processors (their visible tokens) and rows inside a step with a repetition
        penalty (their step tokens) are visited one by one. Rows whose processors returned
        unusable logits go into failed (row -> message); their token is a placeholder."""
        req = plan.sample_request
        node = plan.sample_node
        counter = plan.sample_position  # position each row samples from
        rows = self.sampler.rows(req, plan.sample_index, plan.sample_branch, counter,
                                 plan.sample_in_step)
        proc_rows = np.flatnonzero(rows.processors)
        if len(proc_rows):
            logits = logits.float().clone()
            for i in proc_rows.tolist():
                r = self._requests[int(req[i])]
                where = (f"request {r.request_id} (sample {int(rows.sample[i])}, "
                         f"branch {int(rows.branch[i])})")
                try:
                    logits[i] = run_processors(logits[i], r.params.logits_processors,
                                               list(self.scheduler.visible_tokens(int(node[i]))), where)
                except ProcessorError as e:
                    failed[i] = str(e)
        step_tokens = [list(self.scheduler.step_tokens(int(node[i])))
                       for i in rows.penalty_rows().tolist()]
        tok, lp = sample_batch(logits, rows, step_tokens)
        if tok.is_cpu:
            return tok.tolist(), lp.tolist()
        both = torch.stack([tok.double(), lp.double()]).cpu()  # one device-to-host copy
        return both[0].long().tolist(), both[1].float().tolist()

    def _check_stop_strings(self, plan: Any, tokens: list[int],
                            failed: dict[int, str]) -> list[int]:
        """Stop strings apply to the trunk (steps are exempt): when a trunk row samples a token,
        the response's text in canonical order up to it is searched for a stop string that ends
        in the new token's text. The text is kept incrementally; where the trunk resumes after
        a join (its input position jumps), it is rebuilt from the row's visible tokens, so the
        steps and the injected `<takeaway>` stand between the text before the fork and after
        it, as in the output. Only the trunk rows of requests with stop strings are visited."""
        finished: list[int] = []
        req = plan.sample_request
        with_stop = np.fromiter(self._stop_requests, dtype=np.int64)
        want = np.isin(req, with_stop) & (plan.sample_in_step == 0)
        pos = plan.sample_position  # each row's input token's position
        sample_index, sample_node = plan.sample_index, plan.sample_node
        for i in np.flatnonzero(want).tolist():
            rid = int(req[i])
            r = self._requests.get(rid)
            if r is None or i in failed:
                continue
            sample = int(sample_index[i])
            if sample in r.stop_hit:
                continue
            keep = max(len(x) for x in r.params.stop) + 16
            p, prev = int(pos[i]), r.trunk_pos.get(sample)
            if prev is not None and p != prev + 1:  # after a join: steps + <takeaway> precede
                # the row's visible tokens, less the one just sampled (update() appended it)
                seen = list(self.scheduler.visible_tokens(int(sample_node[i])))[:-1]
                r.trunk_tail[sample] = self._decode(seen[len(r.prompt_ids):][-keep:])[-keep:]
            r.trunk_pos[sample] = p
            new = self._decode([tokens[i]])
            tail = r.trunk_tail.get(sample, "") + new
            r.trunk_tail[sample] = tail[-keep:]
            # only matches that end in the new text: a string wholly inside earlier text (e.g. in
            # a step) was either matched when it was written or is exempt
            hit = next((x for x in r.params.stop
                        if tail.find(x, max(0, len(tail) - len(new) - len(x) + 1)) != -1), None)
            if hit is not None and not self.scheduler.output(rid, sample)["finish_reason"]:
                r.stop_hit[sample] = hit
                self.scheduler.finish_sample(rid, sample, "stop", f"stop string {hit!r}")
                finished += self.scheduler.take_finished()
        return finished

    def _drop(self, rid: int) -> None:
        self.scheduler.release(rid)
        self._requests.pop(rid, None)
        self.sampler.forget(rid)
        self._stop_requests.discard(rid)

    def _collect(self, rid: int) -> RequestOutput:
        req = self._requests[rid]
        outs = []
        wall = time.perf_counter() - req.t_start
        for s in range(req.params.n):
            o = self.scheduler.output(rid, s)
            text = self._decode(o["token_ids"])
            if s in req.stop_hit:  # vLLM-style: the text ends before the stop string
                cut = text.rfind(req.stop_hit[s])
                text = text[:cut] if cut >= 0 else text
            lps = None
            if req.params.logprobs:
                lps = [None if inj else float(lp) for lp, inj in zip(o["logprobs"], o["injected"])]
            outs.append(CompletionOutput(
                index=s, text=text, token_ids=list(o["token_ids"]), logprobs=lps,
                position_ids=list(o["position_ids"]), branch_ids=list(o["branch_ids"]),
                injected=list(o["injected"]), finish_reason=o["finish_reason"],
                structure_valid=self._structure_valid(req, o, text),
                stats={"generated_tokens": o["generated_tokens"],
                       "critical_path_tokens": fmt.critical_path_tokens(o["position_ids"],
                                                                        len(req.prompt_ids)),
                       "forks": o["forks"], "wall_time_s": wall},
                finish_detail=o["finish_detail"],
            ))
        self._drop(rid)
        return RequestOutput(rid, req.prompt, req.prompt_ids, outs)

    def _structure_valid(self, req: _Request, o: dict[str, Any], text: str) -> bool:
        if o["finish_reason"] in ("invalid_structure", "abort"):
            return False
        if req.params.parallel == "off":
            try:
                fmt.parse(text)
                return True
            except fmt.FormatError:
                return False
        try:
            lay = fmt.layout(req.prompt_ids + list(o["token_ids"]), self.tag_ids,
                             prompt_len=len(req.prompt_ids), max_branches=self.max_branches)
        except fmt.FormatError:
            return False
        pos = [int(p) for p in lay.position_ids[len(req.prompt_ids):]]
        return pos == list(o["position_ids"])

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        input_ids: Sequence[Sequence[int]] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        if (prompts is None) == (input_ids is None):
            raise ValueError("Engine.generate: pass exactly one of prompts or input_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        items: list[tuple[str | None, list[int] | None]]
        if prompts is not None:
            bad = [p for p in prompts if not isinstance(p, str)]
            if bad:
                raise TypeError(f"Engine.generate: prompts must be strings (token ids go in "
                                f"input_ids=), got {type(bad[0]).__name__}")
            items = [(p, None) for p in prompts]
        else:
            if isinstance(input_ids, (str, bytes)) or not hasattr(input_ids, "__iter__"):
                raise TypeError("Engine.generate: input_ids must be a list of prompts, each a "
                                f"list of token ids; got {type(input_ids).__name__}")
            items = []
            for k, ids in enumerate(input_ids):
                if is_int(ids):
                    raise TypeError("Engine.generate: input_ids must be a list of prompts, each a "
                                    "list of token ids (got a flat list of ints: wrap it in [])")
                items.append((None, token_ids(ids, f"input_ids[{k}]")))
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(items)
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise ValueError(f"Engine.generate: {len(items)} prompts but {len(params)} SamplingParams")
        # Validate everything before queueing anything.
        encoded = [ids if ids is not None else self._encode(p or "") for p, ids in items]
        for ids, sp in zip(encoded, params):
            if not isinstance(sp, SamplingParams):
                raise TypeError(f"Engine: sampling params must be SamplingParams, got {type(sp).__name__}")
            self._validate(ids, sp)
        rids = [self.add_request(p, sp, input_ids=ids) for (p, _), ids, sp in zip(items, encoded, params)]
        results: dict[int, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(rids), desc="generate")
        try:
            while len(results) < len(rids):
                for out in self.step():
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        except BaseException:
            self.abort([r for r in rids if r not in results])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[r] for r in rids]

    # ---------------------------------------------------------------- RL plumbing
    def abort(self, request_ids: Iterable[int]) -> list[RequestOutput]:
        ids = [int(r) for r in request_ids if int(r) in self._requests]
        finished = self.scheduler.abort(ids)
        return [self._collect(rid) for rid in finished]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]
                       | Mapping[str, torch.Tensor]) -> None:
        """Loads new weights (HF parameter names, any subset; (name, tensor) pairs or a dict)
        and makes every later step use them. Atomic: every name, shape and dtype is checked
        first (unknown names, wrong shapes and non-floating dtypes raise naming the tensor,
        leaving the weights and the KV cache as they were); then all are applied. Then the
        packed decode copies are dropped (re-made lazily from the new weights, so a trainer
        that changed the shared parameters in place, even through `.data`, is covered too) and
        all cached KV is dropped: in-flight requests keep the tokens they have and are
        recomputed under the new weights."""
        self.model.load_hf_state_dict(named_tensors, atomic=True)
        if self.runner.graphs is not None:  # (in-place loads keep the graphs' addresses; cheap)
            self.runner.graphs.reset()
        if getattr(self.model, "packed_dtype", None) is not None:
            self.model.pack_weights(self.model.packed_dtype)
        self.scheduler.preempt_all()

    def sleep(self) -> None:
        """Frees the KV cache tensors (between rollouts); wake_up() re-allocates them."""
        if self.has_unfinished_requests():
            raise RuntimeError("Engine.sleep: requests are still running; abort or finish them first")
        self.runner.release()
        self._sleeping = True

    def wake_up(self) -> None:
        if self._sleeping:
            self.runner.allocate()
            self._sleeping = False

    def pool_stats(self) -> dict[str, int]:
        return dict(self.scheduler.pool_stats())
