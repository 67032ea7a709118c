"""How the server starts its helper processes: `python -m server.<module> ...`.

The engine process (`server.engine_host`), the grammar process
(`server.structured.grammar_worker`) and the kernel seeding (`server.kernel_cache`) all start
this way: with this process's interpreter, this checkout's `server` package first on the path
(a source tree run without installing starts the same code), stdin closed, and this process's
log format and level, so their lines land on the same stderr in the same shape.

Stdlib only: the HTTP process spawns the engine before it imports anything heavy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from server.logging_setup import current_settings

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
