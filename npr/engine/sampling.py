"""The batched sampler: the logits of all sampling rows of a step -> tokens and logprobs, in a few
tensor ops on the logits' device.

Per row: logits processors (the only per-row Python, run by the engine before this), the in-step
repetition penalty (HF semantics), then greedy (argmax at temperature 1) or temperature, top-k,
top-p and one draw by inverse CDF. Draws are counter-based: a row's uniform is a hash of (the
request's key, sample index, branch id, counter), where the key comes from the request's seed (or
the engine's seed and the request id) and the counter is the position id of the token the row
samples from; a branch's positions strictly increase, so the counter names the token's index in
its branch. A seeded request thus gets the same tokens whatever else shares the batch, in any row
order, on any device (the hash runs on the host in uint64, the same bits everywhere).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from npr import _ext, env
from npr.engine.sampling_params import SamplingParams

# ------------------------------------------------------------------ counter-based uniforms
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def splitmix64(x: np.ndarray) -> np.ndarray:
    """x: uint64 [...] -> uint64 [...]: splitmix64's finaliser (a bijection; wraps mod 2**64)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def request_key(seed: int | None, engine_seed: int, request_id: int) -> int:
    """The 64-bit key of a request's random stream: from its own seed, or else from the engine's
    seed and the request id (a different domain, so seed=s is not engine seed s)."""
    if seed is not None:
        return int(splitmix64(np.uint64(seed & _MASK64)))
    k = splitmix64(np.uint64(engine_seed & _MASK64) ^ np.uint64(0xD1B54A32D192ED03))
    return int(splitmix64(k ^ np.uint64(request_id & _MASK64)))


def uniforms(keys: np.ndarray, samples: np.ndarray, branches: np.ndarray,
             counters: np.ndarray) -> np.ndarray:
    """All [S] -> float64 [S] in [0, 1): one uniform per row, a pure function of its four ints
    (53 random bits, as a double holds)."""
    h = splitmix64(np.asarray(keys, dtype=np.uint64) ^ np.asarray(samples).astype(np.uint64))
    h = splitmix64(h ^ np.asarray(branches).astype(np.uint64))
    h = splitmix64(h ^ np.asarray(counters).astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ------------------------------------------------------------------ per-row parameters
@dataclass
class Rows:
    """What the sampler needs per sampling row (host numpy arrays, all [S])."""

    temperature: np.ndarray   # float64; 0 = greedy
    top_k: np.ndarray         # int64; -1 = off
    top_p: np.ndarray         # float64; 1 = off
    penalty: np.ndarray       # float64; step repetition penalty (1 = off)
    processors: np.ndarray    # bool; the row's request has logits processors
    key: np.ndarray           # uint64; request_key of the row's request
    sample: np.ndarray        # int64; sample index in the request
    branch: np.ndarray        # int64; branch id (0 = trunk)
    counter: np.ndarray       # int64; position id of the token the row samples from
    in_step: np.ndarray       # bool; the row is a step child (the penalty applies)

    def __post_init__(self) -> None:
        n = len(self.temperature)
        for name, v in vars(self).items():
            if np.ndim(v) != 1 or len(v) != n:
                raise ValueError(f"Rows.{name}: expected shape [{n}], got {np.shape(v)}")

    def __len__(self) -> int:
        return len(self.temperature)

    def penalty_rows(self) -> np.ndarray:
        """int64 [P]: rows inside a step whose penalty is not 1 (they need their step tokens)."""
        return np.flatnonzero(self.in_step & (self.penalty != 1.0))

    @staticmethod
    def of(params: Sequence[SamplingParams], keys: Sequence[int], samples: Sequence[int],
           branches: Sequence[int], counters: Sequence[int],
           in_step: Sequence[bool] | None = None) -> "Rows":
        """One row per entry of params (tests and one-off callers; the engine uses Sampler.rows)."""
        n = len(params)
        return Rows(
            temperature=np.array([p.temperature for p in params], dtype=np.float64),
            top_k=np.array([p.top_k for p in params], dtype=np.int64),
            top_p=np.array([p.top_p for p in params], dtype=np.float64),
            penalty=np.array([p.step_repetition_penalty for p in params], dtype=np.float64),
            processors=np.array([bool(p.logits_processors) for p in params], dtype=bool),
            key=np.array([k & _MASK64 for k in keys], dtype=np.uint64),
            sample=np.asarray(samples, dtype=np.int64), branch=np.asarray(branches, dtype=np.int64),
            counter=np.asarray(counters, dtype=np.int64),
            in_step=np.zeros(n, dtype=bool) if in_step is None else np.asarray(in_step, dtype=bool),
        )


class Sampler:
    """Per-request sampling parameters in a table indexed by request id, so a step looks up all its
    rows with one searchsorted (no Python per row)."""

    _FLOATS = ("temperature", "top_p", "penalty")

    def __init__(self, engine_seed: int) -> None:
        self.engine_seed = int(engine_seed)
        self._rid = np.zeros(0, dtype=np.int64)                  # sorted request ids [R]
        self._f = np.zeros((0, len(self._FLOATS)), dtype=np.float64)
        self._top_k = np.zeros(0, dtype=np.int64)
        self._proc = np.zeros(0, dtype=bool)
        self._key = np.zeros(0, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self._rid)

    def add(self, request_id: int, params: SamplingParams) -> None:
        i = int(np.searchsorted(self._rid, request_id))
        if i < len(self._rid) and self._rid[i] == request_id:
            raise ValueError(f"Sampler: request {request_id} is already registered")
        key = request_key(params.seed, self.engine_seed, request_id)
        self._rid = np.insert(self._rid, i, request_id)
        self._f = np.insert(self._f, i, [params.temperature, params.top_p,
                                         params.step_repetition_penalty], axis=0)
        self._top_k = np.insert(self._top_k, i, params.top_k)
        self._proc = np.insert(self._proc, i, bool(params.logits_processors))
        self._key = np.insert(self._key, i, np.uint64(key))

    def forget(self, request_id: int) -> None:
        i = int(np.searchsorted(self._rid, request_id))
        if i < len(self._rid) and self._rid[i] == request_id:
            self._rid = np.delete(self._rid, i)
            self._f = np.delete(self._f, i, axis=0)
            self._top_k = np.delete(self._top_k, i)
            self._proc = np.delete(self._proc, i)
            self._key = np.delete(self._key, i)

    def rows(self, request_ids: np.ndarray, samples: np.ndarray, branches: np.ndarray,
             counters: np.ndarray, in_step: np.ndarray) -> Rows:
        """All [S] (numpy) -> Rows; raises KeyError naming a request that was never added."""
        request_ids = np.asarray(request_ids, dtype=np.int64)
        i = np.searchsorted(self._rid, request_ids)
        if len(self._rid):
            bad = (i >= len(self._rid)) | (self._rid[np.minimum(i, len(self._rid) - 1)] != request_ids)
        else:
            bad = np.ones(len(request_ids), dtype=bool)
        if bad.any():
            raise KeyError(f"Sampler: request {int(request_ids[np.argmax(bad)])} was never added "
                           "(or already forgotten)")
        f = self._f[i]
        return Rows(temperature=f[:, 0], top_p=f[:, 1], penalty=f[:, 2], top_k=self._top_k[i],
                    processors=self._proc[i], key=self._key[i],
                    sample=np.asarray(samples, dtype=np.int64),
                    branch=np.asarray(branches, dtype=np.int64),
                    counter=np.asarray(counters, dtype=np.int64),
                    in_step=np.asarray(in_step).astype(bool))


# ------------------------------------------------------------------ tensor ops
def _device_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array -> a tensor on device (one host-to-device copy)."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def repetition_penalty_rows(logits: torch.Tensor, rows: np.ndarray, tokens: Sequence[Sequence[int]],
                            penalty: np.ndarray) -> torch.Tensor:
    """logits: [S, V] -> [S, V] (a new tensor). rows: [P] row indices; tokens[j]: the tokens
    row rows[j] has already sampled in its step; penalty: [P]. HF semantics: a seen token's
    positive logit is divided by the penalty, a negative one multiplied (each token once)."""
    S, V = logits.shape
    lens = np.array([len(t) for t in tokens], dtype=np.int64)
    if len(rows) != len(tokens) or len(penalty) != len(rows):
        raise ValueError(f"repetition_penalty_rows: {len(rows)} rows, {len(tokens)} token lists, "
                         f"{len(penalty)} penalties")
    if not lens.sum():
        return logits
    r = np.repeat(np.asarray(rows, dtype=np.int64), lens)
    t = np.concatenate([np.asarray(x, dtype=np.int64) for x in tokens if len(x)])
    if (t < 0).any() or (t >= V).any() or (r < 0).any() or (r >= S).any():
        raise ValueError(f"repetition_penalty_rows: a row outside [0, {S}) or a token outside [0, {V})")
    flat = np.unique(r * V + t)                     # each (row, token) once
    row_pen = np.ones(S, dtype=np.float32)          # the penalty of each unique pair, by row
    row_pen[np.asarray(rows, dtype=np.int64)] = np.asarray(penalty, dtype=np.float32)
    idx = _device_tensor(flat, logits.device)
    p = _device_tensor(row_pen, logits.device)[idx // V]
    out = logits.clone(memory_format=torch.contiguous_format)
    flat_out = out.view(-1)
    seen = flat_out[idx]
    flat_out[idx] = torch.where(seen > 0, seen / p, seen * p)
    return out


def top_k_top_p(logits: torch.Tensor, top_k: np.ndarray, top_p: np.ndarray) -> torch.Tensor:
    """logits: [R, V] (already divided by temperature); top_k: [R] host int64, -1 or >= V = off;
    top_p: [R] host float, 1 = off -> [R, V] with dropped tokens at -inf.

    top_k keeps the tokens at or above the k-th largest logit; then top_p drops a token when the
    probability mass of the tokens before it (largest first) already reaches top_p (the first
    always stays). top_p needs the tokens by decreasing probability only as far as the mass
    reaches top_p: the top 64, then 1024 are tried before a full sort (sorting 49k logits costs
    ~4 ms a row on a CPU core); every token past that prefix is dropped."""
    R, V = logits.shape
    if len(top_k) != R or len(top_p) != R:
        raise ValueError(f"top_k_top_p: {R} rows but {len(top_k)} top_k and {len(top_p)} top_p")
    dev = logits.device
    kon = (top_k > 0) & (top_k < V)
    if kon.any():
        kmax = int(top_k[kon].max())
        col = _device_tensor(np.where(kon, top_k, kmax) - 1, dev)[:, None]      # [R, 1]
        kth = torch.topk(logits, kmax, dim=-1).values.gather(1, col)            # [R, 1]
        kth = kth.masked_fill(~_device_tensor(kon, dev)[:, None], float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    pon = top_p < 1.0
    if not pon.any():
        return logits
    rows = None if pon.all() else _device_tensor(np.flatnonzero(pon), dev)
    x = logits if rows is None else logits.index_select(0, rows)              # [P, V]
    p = _device_tensor(top_p[pon].astype(np.float32), dev)[:, None]           # [P, 1]
    probs = torch.softmax(x, dim=-1)
    for c in (64, 1024, V):
        c = min(c, V)
        if c < V:
            vals, order = torch.topk(probs, c, dim=-1)
        else:
            vals, order = torch.sort(probs, dim=-1, descending=True)
        cum = torch.cumsum(vals, dim=-1)
        # Decided when the top c hold top_p of the mass (every later token is then dropped).
        if c == V or bool((cum[:, -1:] >= p).all()):
            break
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, (cum - vals) < p)
    x = x.masked_fill(~keep, float("-inf"))
    return x if rows is None else logits.index_copy(0, rows, x)


def sample_batch(logits: torch.Tensor, rows: Rows,
                 step_tokens: Sequence[Sequence[int]] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [S, V] (processors already applied) -> (tokens [S] int64, logprobs [S] fp32), both
    on logits' device. step_tokens[j]: the step tokens of row rows.penalty_rows()[j] (needed only
    when that is not empty). Every tensor op runs on logits' device; the host sends the per-row
    numbers over (no device-to-host reads, except top-p's check of how far to sort).

    logprobs are of the distribution sampled from: for sampled rows after penalty, temperature,
    top-k and top-p; for greedy rows, of the penalised logits at temperature 1 (top-k/top-p
    do not apply to greedy rows)."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"sample_batch: logits must be [{len(rows)}, V], got {list(logits.shape)}")
    S, V = logits.shape
    dev = logits.device
    x = logits.float()
    if S == 0:
        return torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, device=dev)
    pen_rows = rows.penalty_rows()
    if len(pen_rows):
        if step_tokens is None or len(step_tokens) != len(pen_rows):
            raise ValueError(f"sample_batch: {len(pen_rows)} rows need their step tokens, got "
                             f"{None if step_tokens is None else len(step_tokens)} lists")
        x = repetition_penalty_rows(x, pen_rows, step_tokens, rows.penalty[pen_rows])
    greedy = rows.temperature == 0
    cut = ~greedy & (((rows.top_k > 0) & (rows.top_k < V)) | (rows.top_p < 1.0))
    if _compiled(x):
        # One call draws every row (npr::sample_rows); rows with top-k / top-p are cut first, at
        # their temperature, and then drawn at temperature 1.
        temp = rows.temperature.astype(np.float64)  # a copy
        if cut.any():
            idx = np.flatnonzero(cut)
            it = torch.from_numpy(idx)
            t = torch.from_numpy(temp[idx]).float()[:, None]
            x = x.index_copy(0, it, top_k_top_p(x.index_select(0, it) / t, rows.top_k[idx], rows.top_p[idx]))
            temp[idx] = 1.0
        ints = [torch.from_numpy(np.ascontiguousarray(a).astype(np.int64, copy=False))
                for a in (rows.key.view(np.int64), rows.sample, rows.branch, rows.counter)]
        return torch.ops.npr.sample_rows(x, torch.from_numpy(temp), *ints)
    return _draw_reference(x, rows, greedy, cut)


if _ext.available():

    @torch.library.register_fake("npr::sample_rows")
    def _sample_rows_fake(logits: torch.Tensor, temperature: torch.Tensor, key: torch.Tensor,
                          sample: torch.Tensor, branch: torch.Tensor,
                          counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S = logits.shape[0]
        return logits.new_empty(S, dtype=torch.long), logits.new_empty(S)


def _compiled(x: torch.Tensor) -> bool:
    """The compiled draw applies: fp32 logits on the CPU, npr._C built, no forced reference."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and _ext.available()
            and not env.force_reference())


def _draw_reference(x: torch.Tensor, rows: Rows, greedy: np.ndarray,
                    cut: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [S, V] fp32 (after processors and penalty) -> (tokens [S], logprobs [S]) in tensor ops
    on x's device: the draw on GPUs and the reference npr::sample_rows is tested against."""
    S, V = x.shape
    dev = x.device
    if greedy.all():
        # max(dim) returns the first maximal index, as argmax does, in about half its time on CPU
        top, tok = torch.max(x, dim=-1)                                       # [S], [S]
        return tok, top - torch.logsumexp(x, dim=-1)
    # One upload of the per-row numbers: temperature (1 for greedy rows), uniform, greedy flag.
    u = uniforms(rows.key, rows.sample, rows.branch, rows.counter)
    temp = np.where(greedy, 1.0, rows.temperature)
    h = _device_tensor(np.stack([temp, u, greedy.astype(np.float64)], axis=1), dev)  # [S, 3] fp64
    if (temp != 1.0).any():
        x = x / h[:, 0:1].float()
    if cut.all():
        x = top_k_top_p(x, rows.top_k, rows.top_p)
    elif cut.any():
        idx = np.flatnonzero(cut)
        it = _device_tensor(idx, dev)
        x = x.index_copy(0, it, top_k_top_p(x.index_select(0, it), rows.top_k[idx], rows.top_p[idx]))
    logp = x - torch.logsumexp(x, dim=-1, keepdim=True)                       # [S, V]
    probs = logp.exp()
    # Inverse CDF in fp64 (an fp32 running sum over 49k tokens would distort small ones); the
    # target is scaled by the row's own total, so the sum need not be exactly 1, and kept below
    # it, so the first entry above it is always a token with mass.
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)                    # [S, V]
    total = cdf[:, -1:]
    target = torch.minimum(h[:, 1:2] * total, torch.nextafter(total, torch.zeros_like(total)))
    drawn = torch.searchsorted(cdf, target, right=True)[:, 0]
    tok = torch.where(h[:, 2] > 0, torch.max(x, dim=-1)[1], drawn) if greedy.any() else drawn
    return tok, logp.gather(1, tok[:, None])[:, 0]


# ------------------------------------------------------------------ one-row helpers
def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [V] (already divided by temperature) -> [V] with dropped tokens at -inf (top_k -1
    or >= V and top_p 1 are off). The batched top_k_top_p on one row."""
    return top_k_top_p(logits[None], np.array([top_k], dtype=np.int64),
                       np.array([top_p], dtype=np.float64))[0]


def apply_repetition_penalty(logits: torch.Tensor, tokens: Sequence[int], penalty: float) -> torch.Tensor:
    """logits: [V] -> [V] (new): HF-style penalty of the tokens seen (the batched op on one row)."""
    if penalty == 1.0 or not tokens:
        return logits
    return repetition_penalty_rows(logits[None], np.zeros(1, dtype=np.int64), [list(tokens)],
                                   np.array([penalty]))[0]


# ------------------------------------------------------------------ logits processors
class ProcessorError(ValueError):
    """A logits processor returned something that cannot be sampled from. The engine finishes
    that request with finish_reason "abort" and this message as finish_detail."""


def processor_name(fn: Callable) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{name}"


def check_logits(out: object, vocab: int, what: str) -> torch.Tensor:
    """out must be logits [vocab] of a floating dtype, without NaN or +inf, with at least one
    finite entry (-inf masks tokens). Returns it as fp32; raises ProcessorError naming `what`."""
    if not isinstance(out, torch.Tensor):
        raise ProcessorError(f"{what} returned a {type(out).__name__}, expected a tensor [{vocab}]")
    if tuple(out.shape) != (vocab,):
        raise ProcessorError(f"{what} returned shape {list(out.shape)}, expected [{vocab}] "
                             "(one logit per token of the vocabulary)")
    if not out.dtype.is_floating_point:
        raise ProcessorError(f"{what} returned dtype {out.dtype}, expected floating logits")
    out = out.float()
    # One reduction decides: the max is NaN if any logit is NaN, +inf if any is +inf, -inf if
    # all are -inf (processors mask with -inf, so a per-element finiteness test would flag
    # most rows and cost several passes over V each).
    top = float(out.max()) if vocab else float("-inf")
    if not math.isfinite(top):
        nan, pos = int(torch.isnan(out).sum()), int((out == float("inf")).sum())
        if nan or pos:
            raise ProcessorError(f"{what} returned {nan} NaN and {pos} +inf logits (of {vocab})")
        raise ProcessorError(f"{what} masked every token (all {vocab} logits are -inf)")
    return out


def run_processors(logits: torch.Tensor, processors: Sequence[Callable], visible: list[int],
                   where: str) -> torch.Tensor:
    """logits: [V] fp32 -> [V] fp32 after each processor fn(visible, logits) in turn. Raises
    ProcessorError when a result cannot be sampled from; an exception a processor raises
    propagates with a note naming it and `where` (e.g. "request 3 (sample 0, branch 1)")."""
    V = logits.shape[-1]
    for k, fn in enumerate(processors):
        what = f"logits processor #{k} ({processor_name(fn)}) of {where}"
        try:
            out = fn(visible, logits)
        except Exception as e:
            e.add_note(f"raised in {what}")
            raise
        logits = check_logits(out, V, what)
    return logits
