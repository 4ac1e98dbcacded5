"""Real processes without the import bill: :class:`WarmPython` keeps one interpreter that has imported
the modules a test's processes need and forks a child per :meth:`WarmPython.start` — its own pid,
session, working directory, environment, stdout/stderr files and exit status, killable with SIGKILL
like any process — that runs ``python -m <module> <args>`` from there on as a fresh start would.

What it saves is the import (torch, diffusers and accelerate: ~6 s of CPU a start on 2 cores, most of a
tiny run's cost). What it cannot show is what a fresh start imports: tests of that (a refusal before
torch is loaded) start fresh processes. The forking interpreter has only imported — no torch op has run,
so no OpenMP pool exists to be copied half-started into a child.

Example::

    with WarmPython("fcr_eval.cli,fcr_eval.run.runner", env=ENV) as warm:
        child = warm.start("fcr_eval.cli", ["run", "exp.toml", "--store", "r/fcr.duckdb"], cwd=tmp_path)
        for line in child.stderr_lines():        # as they are written
            ...
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -9
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

SERVER = r"""
import importlib, json, os, runpy, sys, traceback
for name in filter(None, sys.argv[1].split(",")):
    importlib.import_module(name)
reply = os.fdopen(os.dup(1), "w")  # requests on stdin, one JSON line each; replies on a copy of stdout
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "start":
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: as `python -m module args` started in its own session would be
            rc = 1
            try:
                reply.close()  # the pipe back to the test is the server's alone
                os.setsid()
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                for fd, path in ((1, req["out"]), (2, req["err"])):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
                os.chdir(req["cwd"])
                for key, value in req["env"].items():  # None: unset
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
                if req["module"]:
                    sys.argv = [req["module"], *req["args"]]
                    sys.modules.pop(req["module"], None)  # run as __main__, as `python -m` does, unwarned
                    runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
                else:  # `python -c code args` (sys.argv[0] "-c", or what the caller names)
                    sys.argv = [req["argv0"], *req["args"]]
                    exec(compile(req["code"], "<string>", "exec"), {"__name__": "__main__"})
                rc = 0
            except SystemExit as e:  # as the interpreter ends on sys.exit
                rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except BaseException:  # what escapes: printed, exit 1, as an uncaught exception would be
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        print(json.dumps({"pid": pid}), file=reply, flush=True)
    elif req["op"] == "poll":
        pid, status = os.waitpid(req["pid"], os.WNOHANG)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status) if pid else None}), file=reply, flush=True)
"""


class WarmChild:
    """One forked child: ``pid``, :meth:`poll`, :meth:`wait`, its output as files and as lines."""

    def __init__(self, warm: WarmPython, pid: int, out: Path, err: Path) -> None:
        self.pid, self.out_path, self.err_path = pid, out, err
        self._warm = warm
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit status (negative: the signal that ended it), or ``None`` while it runs."""
        if self.returncode is None:
            self.returncode = self._warm._ask({"op": "poll", "pid": self.pid})["rc"]
        return self.returncode

    def wait(self, timeout: float = 600) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"warm child {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def stderr_lines(self, timeout: float = 600) -> Iterator[str]:
        """stderr's lines as the child writes them (it runs unbuffered), until it has ended and all
        are read."""
        return self._lines(self.err_path, timeout)

    def stdout_lines(self, timeout: float = 600) -> Iterator[str]:
        """stdout's lines, as :meth:`stderr_lines`."""
        return self._lines(self.out_path, timeout)

    def _lines(self, path: Path, timeout: float) -> Iterator[str]:
        deadline = time.monotonic() + timeout
        with path.open() as f:
            partial = ""
            while True:
                chunk = f.readline()
                if chunk:
                    partial += chunk
                    if partial.endswith("\n"):
                        yield partial
                        partial = ""
                    continue
                if self.poll() is not None:
                    rest = partial + f.read()
                    if rest:
                        yield rest
                    return
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(f"warm child {self.pid}", timeout)
                time.sleep(0.05)


class WarmPython:
    """An interpreter that has imported ``preload`` (comma-separated modules) under ``env``, forking
    children on request. Use it in ``with``: the server ends with the block."""

    def __init__(self, preload: str, env: dict[str, str] | None = None) -> None:
        env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
        self._logs = Path(tempfile.mkdtemp(prefix="warm-python-"))
        self._proc = subprocess.Popen([sys.executable, "-c", SERVER, preload], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=env)
        self._count = 0
        self._talk = threading.Lock()  # one request and its reply at a time

    def _ask(self, request: dict) -> dict:
        with self._talk:
            assert self._proc.poll() is None, f"the warm interpreter ended ({self._proc.returncode})"
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        assert line, "the warm interpreter ended without replying (an import failed?)"
        return json.loads(line)

    def start(self, module: str | None, args: list[str], *, code: str | None = None, argv0: str = "-c",
              cwd: str | os.PathLike = ".", env: dict[str, str | None] | None = None) -> WarmChild:
        """Fork a child that runs ``python -m module *args`` (or, with ``module=None``, ``python -c code
        *args``, ``sys.argv[0]`` being ``argv0``) in ``cwd`` with ``env``'s changes (``None`` unsets a
        variable)."""
        assert (module is None) != (code is None), "a module or code, not both"
        self._count += 1
        out, err = self._logs / f"{self._count}.stdout", self._logs / f"{self._count}.stderr"
        out.touch()
        err.touch()  # readable at once, before the child opens it
        pid = self._ask({"op": "start", "module": module, "code": code, "argv0": argv0, "args": [str(a) for a in args],
                         "cwd": str(Path(cwd).resolve()), "env": env or {}, "out": str(out),
                         "err": str(err)})["pid"]
        return WarmChild(self, pid, out, err)

    def close(self) -> None:
        """End the server (children still running are left to finish) and remove the output files."""
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)
        shutil.rmtree(self._logs, ignore_errors=True)

    def __enter__(self) -> WarmPython:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
