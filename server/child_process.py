"""How the server starts its helper processes, `python -m server.<module> ...`, and how they
read the command line it gives them.

The engine process (`server.engine_host`), the grammar process
(`server.structured.grammar_worker`) and the kernel seeding (`server.kernel_cache`) all start
this way: with this process's interpreter, this checkout's `server` package first on the path
(a source tree run without installing starts the same code), stdin closed, and this process's
log format and level, so their lines land on the same stderr in the same shape.

Stdlib only: the HTTP process spawns the engine before it imports anything heavy.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from server.logging_setup import current_settings, setup_logging

_ROOT = str(Path(__file__).resolve().parents[1])  # the directory holding `server`


def spawn_module(module: str, *args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start `python -m module *args --log-format F --log-level L`; raises OSError when the
    process cannot start (out of processes or memory, for instance)."""
    settings = current_settings()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, "-m", module, *args,
         "--log-format", settings["log_format"], "--log-level", settings["level"]],
        pass_fds=pass_fds, stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip


def child_arguments(module: str) -> argparse.ArgumentParser:
    """The parser of `python -m module`'s command line, with the flags `spawn_module` adds
    already in (the process adds its own)."""
    ap = argparse.ArgumentParser(prog=f"python -m {module}")
    ap.add_argument("--log-format", default="text")
    ap.add_argument("--log-level", default="info")
    return ap


def start_logging(args: argparse.Namespace) -> None:
    """Log as the parent does (its settings came in `child_arguments`' flags)."""
    setup_logging(args.log_format, args.log_level)
