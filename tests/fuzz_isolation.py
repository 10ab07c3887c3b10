"""Each fuzz case in a process of its own, cheaply: a long-lived worker forks a child per case.

Spawning Python and importing torch per case costs seconds; forking a worker that has imported them
costs milliseconds. The worker itself never computes (no PyTorch op, no OpenMP region, no thread of
the C extensions is ever started in it), so every child starts from a single-threaded process and
builds its own thread pools: GNU OpenMP, which the quantized kernels use, can hang in a child forked
after a parallel region.

A case is ``(module, function, params)``: the child imports the test module (the worker imported
it before forking, so this is free), calls ``function(params)`` and reports what happened:

* ``{"kind": "ok", "detail": ...}``: the function returned (it compared the C result with the
  PyTorch reference itself; an ``AssertionError`` there is ``"wrong"``);
* ``{"kind": "refused", "type": "ValueError", "message": ...}``: a ValueError or TypeError;
* ``{"kind": "exception", ...}``: any other exception, with its traceback;
* ``{"kind": "crash", "status": ..., "stderr": ...}``: the child died (a signal, an abort, an
  AddressSanitizer report) or exited without a result; ``"hang"`` after ``CASE_TIMEOUT`` seconds.

Run as a script, this file is the worker (``main``); :data:`POOL` starts and talks to workers.
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

CASE_TIMEOUT = float(os.environ.get("NEOXJA_FUZZ_CASE_TIMEOUT", "60"))
TESTS = Path(__file__).resolve().parent


def _send(stream: Any, obj: Any) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream: Any) -> Any:
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size))


def _child(module: str, function: str, params: dict, result_fd: int) -> None:
    try:
        detail = getattr(importlib.import_module(module), function)(params)
        result = {"kind": "ok", "detail": detail}
    except (ValueError, TypeError) as error:
        result = {"kind": "refused", "type": type(error).__name__, "message": str(error)}
    except AssertionError as error:
        result = {"kind": "wrong", "message": str(error)[-3000:]}
    except BaseException as error:  # every other outcome is reported, not raised
        result = {
            "kind": "exception",
            "type": type(error).__name__,
            "traceback": traceback.format_exc()[-3000:],
        }
    data = pickle.dumps(result)
    view = memoryview(data)
    while view:
        view = view[os.write(result_fd, view) :]


def _run_forked(module: str, function: str, params: dict) -> dict:
    read_fd, write_fd = os.pipe()
    with tempfile.TemporaryFile() as stderr:
        pid = os.fork()
        if pid == 0:  # the child: report, then leave without running the worker's cleanup
            os.close(read_fd)
            os.dup2(stderr.fileno(), 2)
            code = 0
            try:
                _child(module, function, params, write_fd)
            except BaseException:  # the pipe broke: the parent reports a crash
                code = 3
            os._exit(code)
        os.close(write_fd)
        chunks, deadline, status = [], time.monotonic() + CASE_TIMEOUT, None
        while True:
            ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(read_fd)
                return {"kind": "hang", "seconds": CASE_TIMEOUT}
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
        stderr.seek(0)
        text = stderr.read().decode("utf-8", "replace")
        tail = text if len(text) <= 6000 else text[:3000] + "\n[...]\n" + text[-3000:]
    data = b"".join(chunks)
    if status != 0 or not data:
        how = (
            f"signal {os.WTERMSIG(status)}"
            if os.WIFSIGNALED(status)
            else f"exit {os.waitstatus_to_exitcode(status)}"
        )
        return {"kind": "crash", "status": how, "stderr": tail}
    result = pickle.loads(data)
    if "ERROR: AddressSanitizer" in tail:  # a report from a child that went on (halt_on_error=0)
        return {"kind": "crash", "status": "AddressSanitizer report", "stderr": tail}
    return result


def main() -> None:
    """The worker: read cases from stdin, answer each on the original stdout."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, never into the answers
    sys.path.insert(0, str(TESTS))
    import numpy  # noqa: F401 - imported once here, inherited by every child
    import torch._dynamo  # noqa: F401 - a custom op's first call imports it (2 s)

    _send(out, "ready")
    while (case := _receive(sys.stdin.buffer)) is not None:
        module, function, params = case
        importlib.import_module(module)  # before the fork: children inherit it
        _send(out, _run_forked(module, function, params))


def fuzz(default: int) -> Any:
    """Hypothesis settings of a fuzz test: ``default`` examples, or ``NEOXJA_FUZZ_EXAMPLES`` for a long
    run; no deadline (a case is a process)."""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=int(os.environ.get("NEOXJA_FUZZ_EXAMPLES", default)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def check_outcome(result: dict, names: set[str], case: Any) -> None:
    """A case without defects (``names`` empty) must have run and matched its reference; a case with
    defects must be refused by a ValueError or TypeError whose message names one of ``names``."""
    where = f"case {case!r}: {result}"
    if not names:
        assert result["kind"] == "ok", where
        return
    assert result["kind"] == "refused", f"expected a named refusal ({sorted(names)}); {where}"
    named = [n for n in names if re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", result["message"])]
    assert named, f"the message names none of {sorted(names)}; {where}"


# The environments of the workers: the C extensions pick their kernels at import.
VARIANTS = {
    "native": {},
    "avxvnni": {"NEOXJA_QUANT_KERNEL": "avxvnni", "NEOXJA_DECODE_KERNEL": "avxvnni"},
    "avx2": {"NEOXJA_QUANT_KERNEL": "avx2", "NEOXJA_DECODE_KERNEL": "avx2"},
    "scalar": {"NEOXJA_QUANT_KERNEL": "scalar", "NEOXJA_DECODE_KERNEL": "scalar"},
}


class Workers:
    """One worker per variant (``VARIANTS``), started on first use and shared by every fuzz test of
    the session (starting one costs the seconds of importing torch); killed at exit."""

    def __init__(self) -> None:
        self._processes: dict[str, subprocess.Popen] = {}
        self._ready: set[str] = set()
        atexit.register(self.close)

    def start(self, *variants: str) -> None:
        """Start these workers without waiting for them (their imports overlap)."""
        for name in variants:
            if name not in self._processes:
                self._processes[name] = subprocess.Popen(
                    [sys.executable, __file__],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env={**os.environ, **VARIANTS[name]},
                )

    def run(self, variant: str, module: str, function: str, params: dict) -> dict:
        """The outcome of ``module.function(params)`` in a child of the ``variant`` worker."""
        self.start(variant)
        process = self._processes[variant]
        if variant not in self._ready:
            if _receive(process.stdout) != "ready":
                raise RuntimeError(f"the fuzz worker {variant!r} did not start (exit {process.wait()})")
            self._ready.add(variant)
        _send(process.stdin, (module, function, params))
        result = _receive(process.stdout)
        if result is None:  # the next case starts a new one
            del self._processes[variant]
            self._ready.discard(variant)
            raise RuntimeError(f"the fuzz worker {variant!r} died (exit {process.wait()})")
        return result

    def close(self) -> None:
        """Kill the workers (idle between cases: nothing of theirs is lost)."""
        for process in self._processes.values():
            process.kill()
            process.wait()
        self._processes.clear()
        self._ready.clear()


POOL = Workers()


if __name__ == "__main__":
    main()
