"""A process that has imported torch and forks one child per `lowmerge` command the tests run (conftest.run_cli).

Most of a tiny CLI run is the interpreter's start and torch's import (about 2 s of one core here, against 0.03 s for
a fork): the suite runs a few hundred of them. Each child is a real process that runs ``python -m lowmem_merge ARGS``
as the interpreter would (``runpy``, ``__main__``), in the caller's working directory, with stdin from /dev/null and
stdout and stderr to the caller's files, and exits with the CLI's exit status (a traceback and 1 for an uncaught
exception, as Python does). torch and ``lowmem_merge.cli`` (what every command imports first) are imported here,
before the fork: the caller forks a child only when its environment is the one this process started with, but for
variables those imports do not read (conftest.run_cli), and gives the child its environment as it is.

Protocol: one JSON request per line on stdin, {"args", "env", "cwd", "stdout", "stderr", "timeout"}; one JSON reply per
line on stdout, {"rc": N} or {"timeout": true} (the child killed). The process exits when stdin closes.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch  # noqa: F401  (the point of this process: imported once, before any fork)

import lowmem_merge.cli  # noqa: F401,E402


def _child(req: dict) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["cwd"])
        sys.path[0] = req["cwd"]     # where `python -m` looks first (here: this file's folder)
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_TRUNC),
                                (2, req["stderr"], os.O_WRONLY | os.O_TRUNC)):
            new = os.open(path, flags)
            os.dup2(new, fd)
            os.close(new)
        sys.stdin = open(0, encoding="utf-8", closefd=False)
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
        sys.argv = ["-m", *req["args"]]   # runpy puts the module's path first, as `python -m` does
        import atexit
        import runpy
        import traceback
        try:
            runpy.run_module("lowmem_merge", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:       # noqa: BLE001 - what the interpreter prints for an uncaught exception
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(req)
        deadline = time.monotonic() + req["timeout"]
        reply: dict = {}
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                reply = {"rc": os.waitstatus_to_exitcode(status)}
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                reply = {"timeout": True}
                break
            time.sleep(0.005)
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
