"""Answer checkers: exact match, and math-verify in a worker process with a timeout per answer.

math-verify (sympy underneath) can run for minutes on a hostile answer such as 9^{9^{9^{9}}},
and its own timeouts are SIGALRM-based: main thread only, and a signal cannot interrupt one long
C-level integer operation anyway. So the checks run in a child process (spawn: no fork of a
trainer's threads or CUDA state); the parent waits at most `timeout_s` per answer, kills the
child when it is exceeded and starts a fresh one on the next call. A timeout, a crash or a parse
failure scores as wrong; the trainer never hangs.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from collections.abc import Sequence

_BOXED = "\\boxed{"


def _boxed(s: str) -> str:
    return s if _BOXED in s else _BOXED + s + "}"


def normalize_exact(s: str) -> str:
    """Exact-match normal form: surrounding whitespace and inner runs of whitespace ignored."""
    return " ".join(s.split())


class ExactMatch:
    """answer == gold after whitespace normalisation (synthetic tasks with one spelling)."""

    def __call__(self, answers: Sequence[str | None], golds: Sequence[str]) -> list[bool]:
        _check_lengths(answers, golds)
        return [a is not None and normalize_exact(a) == normalize_exact(g)
                for a, g in zip(answers, golds)]


def _check_lengths(answers: Sequence[str | None], golds: Sequence[str]) -> None:
    if len(answers) != len(golds):
        raise ValueError(f"checker: {len(answers)} answers but {len(golds)} gold answers")


def _worker(conn) -> None:  # runs in the child process
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings
    from math_verify import parse, verify

    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        answer, gold = msg
        try:
            # Timeouts are the parent's job (it kills this process); none here.
            g = parse(_boxed(gold), parsing_timeout=None)
            a = parse(_boxed(answer), parsing_timeout=None)
            ok = bool(g) and bool(a) and bool(verify(g, a, timeout_seconds=None))
        except Exception:  # a parse failure is a wrong answer
            ok = False
        conn.send(ok)


class MathVerifier:
    """math-verify equivalence of answers (the content of \\boxed{...}) with gold answers.

    Both sides are wrapped in \\boxed{} (unless they hold one) and parsed as LaTeX/expressions.
    timeout_s bounds each answer; start_timeout_s bounds the child's start (imports sympy).
    Usable as a context manager; close() stops the child. Thread-safe (one check at a time).
    """

    def __init__(self, timeout_s: float = 5.0, start_timeout_s: float = 120.0,
                 start_method: str = "spawn") -> None:
        if not timeout_s > 0:
            raise ValueError(f"MathVerifier: timeout_s must be > 0, got {timeout_s}")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"MathVerifier: start_method must be spawn or forkserver, got "
                             f"{start_method!r} (fork would copy the trainer's threads)")
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self._ctx = mp.get_context(start_method)
        self._proc = None
        self._conn = None
        self._lock = threading.Lock()
        self.timeouts = 0  # answers that ran out of time (the child was restarted)

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker, args=(child,), daemon=True,
                                 name="npr-math-verify")
        proc.start()
        child.close()
        if not parent.poll(self.start_timeout_s):
            proc.kill()
            proc.join()
            raise RuntimeError(f"MathVerifier: the worker did not start within "
                               f"{self.start_timeout_s} s (is math-verify installed?)")
        try:
            parent.recv()
        except EOFError as e:
            proc.join()
            raise RuntimeError("MathVerifier: the worker died while starting (is math-verify "
                               "installed? pip install math-verify)") from e
        self._proc, self._conn = proc, parent

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
            self._conn.close()
        self._proc = self._conn = None

    def check(self, answer: str | None, gold: str) -> bool:
        if answer is None or not answer.strip():
            return False
        if not isinstance(gold, str) or not gold.strip():
            raise ValueError(f"MathVerifier: gold answer must be a non-empty string, got {gold!r}")
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._kill()
                self._start()
            try:
                self._conn.send((answer, gold))
                if self._conn.poll(self.timeout_s):
                    return bool(self._conn.recv())
            except (EOFError, BrokenPipeError, OSError):
                self._kill()  # the child crashed on this answer: wrong, fresh child next time
                return False
            self.timeouts += 1
            self._kill()
            return False

    def __call__(self, answers: Sequence[str | None], golds: Sequence[str]) -> list[bool]:
        _check_lengths(answers, golds)
        return [self.check(a, g) for a, g in zip(answers, golds)]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
                self._proc.join(timeout=5)
            self._kill()

    def __enter__(self) -> "MathVerifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._kill()
        except Exception:
            pass
