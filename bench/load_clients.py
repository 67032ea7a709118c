"""Open-loop load from several client processes, so the client does not limit what it measures.

One Python event loop parsing every SSE line of ~60 streams (~9,000 chunks a second on the 8B)
runs near a full core; when it falls behind, chunks wait in its socket buffers and the ITL tail
it reports is its own. Measured on the H200 (`bench.kv_serving` sweep, one client loop): ITL p99
25.7-34.0 ms while the engine's step-interval p99 was 10.0-14.7 ms and the server's event loop
was never more than 20 ms late more than twice in the run.

`run_open_loop` deals the requests round-robin over N processes, each with its own event loop and
connection pool, all timed against one shared start on the system-wide monotonic clock
(`time.perf_counter` is CLOCK_MONOTONIC on Linux, comparable across processes). It fills in the
same `Request` objects and reports each client loop's own lateness, so a report shows whether
the client kept up.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time

from bench.common import BenchError, client_limits, percentile
from bench.traffic import Request, stream_completion
from server.http.loop_lag import watch_loop_lag

# How often a client loop checks its own lateness (a late timer = a loop that was busy).
LAG_PERIOD_S = 0.005
# Between telling the processes the start time and that time: enough for a pipe message.
START_MARGIN_S = 0.2


async def watch_lag(lags: list[tuple[float, float]], period_s: float = LAG_PERIOD_S) -> None:
    """Until cancelled: every `period_s`, append (perf_counter, seconds the timer ran late):
    the server's own loop-lag timer (`server.http.loop_lag`, torch-free), timestamped."""
    await watch_loop_lag(lambda late: lags.append((time.perf_counter(), late)), period_s)


async def drive(url: str, reqs: list[Request], start: float,
                client=None, cap: int | None = None) -> list[tuple[float, float]]:
    """Send each request at `start + req.arrival` from this loop (on `client`, or a new one),
    with at most `cap` in flight (a request due while `cap` run waits for one to end; its
    `sent` says when it went); return the loop's lags."""

    lags: list[tuple[float, float]] = []
    watcher = asyncio.ensure_future(watch_lag(lags))
    slots = asyncio.Semaphore(cap) if cap else None

    async def one(client, req: Request) -> None:
        delay = start + req.arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if slots is None:
            await stream_completion(client, url, "", req)
            return
        async with slots:
            await stream_completion(client, url, "", req)

    try:
        if client is not None:
            await asyncio.gather(*(one(client, r) for r in reqs))
        else:
            async with new_client(len(reqs)) as client:
                await asyncio.gather(*(one(client, r) for r in reqs))
    finally:
        watcher.cancel()
    return lags


def new_client(connections: int):
    import httpx

    return httpx.AsyncClient(timeout=httpx.Timeout(300.0),
                             limits=client_limits(max(1, connections)))


async def _worker_async(url: str, reqs: list[Request], conn,
                        cap: int | None = None) -> list[tuple[float, float]]:
    async with new_client(cap or len(reqs)) as client:
        # Warm before the start: the client's first request pays its lazy imports and a new
        # connection (70-170 ms measured on the GPU box), which the timed requests must not.
        await client.get(f"{url}/health")
        conn.send("ready")
        start = await asyncio.to_thread(conn.recv)
        return await drive(url, reqs, start, client, cap)


def _worker(url: str, items: list[tuple[list[int], int, float, int | None]], conn,
            cap: int | None = None) -> None:
    """A client process: warm up, say ready, wait for the start time, drive its share, send
    the results back."""
    try:
        reqs = [Request(prompt, max_tokens, arrival, logprobs)
                for prompt, max_tokens, arrival, logprobs in items]
        lags = asyncio.run(_worker_async(url, reqs, conn, cap))
        fields = [(r.sent, r.chunks, r.done, r.completion_tokens, r.finish_reason, r.error,
                   r.chunk_tokens) for r in reqs]
        conn.send(("ok", fields, [lag for _, lag in lags]))
    except BaseException as exc:  # the parent reports it; a silent death would hang it
        conn.send(("error", repr(exc), []))
    finally:
        conn.close()


def lag_summary(lags: list[float]) -> dict:
    return {"client_loop_lag_p99_ms": (percentile(lags, 99) or 0.0) * 1e3 if lags else None,
            "client_loop_lag_max_ms": max(lags) * 1e3 if lags else None,
            "client_loop_lags_over_5ms": sum(lag > 0.005 for lag in lags)}


class ClientProcesses:
    """Client processes, one per share of requests, each with its own loop and pool.

    `ready()` waits until every process has imported its client and waits for a start time;
    `go(start)` releases them (each request is sent at `start + arrival`); `collect()` fills in
    the `Request` objects and returns the processes' loop-lag summary. Owned by one task.
    """

    def __init__(self, url: str, shares: list[list[Request]], cap: int | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")  # no copy of this process's loop or sockets
        self.shares = shares
        self._pipes, self._procs = [], []
        for share in shares:
            parent, child = ctx.Pipe()
            items = [(r.prompt, r.max_tokens, r.arrival, r.logprobs) for r in share]
            proc = ctx.Process(target=_worker, args=(url, items, child, cap), daemon=True)
            proc.start()
            child.close()
            self._pipes.append(parent)
            self._procs.append(proc)

    async def ready(self) -> None:
        try:
            for conn in self._pipes:
                if await asyncio.to_thread(conn.recv) != "ready":
                    raise BenchError("a load client process failed to start")
        except EOFError as exc:
            self.close()
            raise BenchError("a load client process died before it was ready") from exc

    def go(self, start: float) -> None:
        for conn in self._pipes:
            conn.send(start)

    async def collect(self) -> dict:
        try:
            answers = await asyncio.gather(*(asyncio.to_thread(c.recv) for c in self._pipes))
        except EOFError as exc:
            raise BenchError("a load client process died") from exc
        finally:
            self.close()
        all_lags: list[float] = []
        for share, (status, fields, lags) in zip(self.shares, answers, strict=True):
            if status != "ok":
                raise BenchError(f"a load client process failed: {fields}")
            for req, (sent, chunks, done, tokens, reason, error, chunk_tokens) in zip(
                    share, fields, strict=True):
                req.sent, req.chunks, req.done = sent, chunks, done
                req.completion_tokens, req.finish_reason, req.error = tokens, reason, error
                req.chunk_tokens = chunk_tokens
            all_lags += lags
        return {"client_processes": len(self.shares), **lag_summary(all_lags)}

    def close(self) -> None:
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


async def run_open_loop(url: str, reqs: list[Request], processes: int,
                        cap: int | None = None) -> tuple[float, dict]:
    """Run `reqs` (each sent at its `arrival` after a common start) from `processes` client
    processes (1: this process's loop), with at most `cap` in flight (split evenly over the
    processes, which get the requests round-robin). Returns (start perf_counter, client-side
    summary)."""
    if cap is not None and cap % max(1, processes):
        raise BenchError(f"cap {cap} does not split over {processes} client processes")
    if processes <= 1:
        start = time.perf_counter() + START_MARGIN_S
        lags = await drive(url, reqs, start, cap=cap)
        return start, {"client_processes": 1, **lag_summary([lag for _, lag in lags])}
    per_process = None if cap is None else cap // processes
    clients = ClientProcesses(url, [reqs[i::processes] for i in range(processes)], per_process)
    await clients.ready()
    start = time.perf_counter() + START_MARGIN_S
    clients.go(start)
    return start, await clients.collect()
