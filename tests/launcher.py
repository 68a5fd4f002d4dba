"""The project's scripts (train.py, sample.py, evaluate.py) as real, separate processes, without paying their
imports (about 6 s of CPU each) every time: each is forked from one multiprocessing forkserver that imported the
three modules once. The forkserver is a clean single-threaded process (no pytest-xdist threads, no torch thread
pool started), which is what makes forking from it safe.

`Popen(script, argv, env)` is the part of subprocess.Popen the tests use: pid, poll(), wait(), kill(),
send_signal(), communicate() -> (stdout text, stderr text), returncode (the script's exit status; -N for a
signal). The child sets `env` as its os.environ (RANK, WORLD_SIZE, ... as a launcher would), writes stdout and
stderr to files the parent reads, optionally runs `before` (a function of this module: a fault to inject), then
calls the script's cli(argv). What a test checks about a run (its files, exit status, stderr, signals) is the
same as for `python train.py ...`, with one difference: what a module reads from the environment at import
time keeps the forkserver's value (the tests pass only what the scripts read at run time: RANK, WORLD_SIZE, ...).
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import tempfile
import time
import weakref

_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["train", "sample", "evaluate"])
    return _CONTEXT


def _child(script: str, argv: list[str], env: dict, files: tuple[str, str], before) -> None:
    os.environ.clear()
    os.environ.update(env)
    for fd, path in zip((1, 2), files):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
    if before is not None:
        before()
    importlib.import_module(script).cli(argv)


def slow_fsync() -> None:
    """A fault for the kill -9 tests: every fsync of a checkpoint save takes 0.15 s longer, so that a save lasts
    about a second and a kill lands inside it."""
    from training import checkpoint

    real = checkpoint._fsync
    checkpoint._fsync = lambda path: (time.sleep(0.15), real(path))


def _unlink(paths: list[str]) -> None:
    for path in paths:
        if os.path.exists(path):
            os.unlink(path)


class Popen:
    def __init__(self, script: str, argv: list, env: dict, before=None):
        self._files = []
        for name in ("stdout", "stderr"):
            handle, path = tempfile.mkstemp(prefix="launcher-", suffix="." + name)
            os.close(handle)
            self._files.append(path)
        # the two files go when communicate() has read them, or when this object goes (a test that never asked)
        self._remove_files = weakref.finalize(self, _unlink, list(self._files))
        self._process = _context().Process(target=_child, args=(script, [str(a) for a in argv], dict(env),
                                                                  tuple(self._files), before))
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self):
        return self._process.exitcode

    def poll(self):
        return self._process.exitcode

    def wait(self, timeout=None):
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise TimeoutError(f"process {self.pid} still running after {timeout} s")
        return self._process.exitcode

    def send_signal(self, sig):
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout=None):
        """(stdout, stderr) once the process has ended."""
        self.wait(timeout)
        if not hasattr(self, "_texts"):
            self._texts = []
            for path in self._files:
                with open(path, errors="replace") as f:
                    self._texts.append(f.read())
            self._remove_files()
        return tuple(self._texts)
