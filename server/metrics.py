"""Prometheus metrics: request-side instruments plus a collector reading the engine at scrape time.

Each app gets its own `CollectorRegistry` (never the process-global one), so tests can build many
apps in one process. Engine-side numbers (queue depths, graph coverage, capture timings, decode
step kinds) are pulled from `engine.stats()` and `engine.graph_report()` only when Prometheus
scrapes, so the engine carries no Prometheus code. Every key is optional: a missing or malformed
value drops that metric from the scrape instead of failing it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from server.health import PHASES, READY, Lifecycle

logger = logging.getLogger("graphserve.metrics")

# Token latencies span a fast GPU decode step (~1 ms) to a stalled CPU prefill (~10 s).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)
# The event loop's lag: well under a millisecond when healthy, a body parse or a GIL wait can
# take tens of milliseconds.
LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
# Whole requests run from milliseconds to minutes (long generations on a busy server).
DURATION_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The request-side instruments of one app, and the registry they live in."""

    def __init__(self, lifecycle: Lifecycle, engine_getter: Callable[[], Any]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "graphserve_requests",
            "OpenAI API requests by endpoint and HTTP status (499: client went away).",
            ["endpoint", "status"], registry=r,
        )
        self.aborted = Counter(
            "graphserve_requests_aborted",
            "Admitted requests aborted before they finished, by cause.",
            ["cause"], registry=r,
        )
        self.ttft = Histogram(
            "graphserve_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "graphserve_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.duration = Histogram(
            "graphserve_request_duration_seconds",
            "Time from request arrival to its last token, for admitted generation requests.",
            buckets=DURATION_BUCKETS, registry=r,
        )
        self.loop_lag = Histogram(
            "graphserve_event_loop_lag_seconds",
            "How late the HTTP event loop ran a timer due every 10 ms: time it spent on other "
            "work (request parsing, streaming) or waiting for the GIL; every stream's next "
            "token waits as long.",
            buckets=LAG_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter(
            "graphserve_prompt_tokens", "Prompt tokens of admitted requests.", registry=r
        )
        self.generation_tokens = Counter(
            "graphserve_generation_tokens", "Generated tokens streamed to clients.", registry=r
        )
        r.register(EngineCollector(lifecycle, engine_getter))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _number(value: Any) -> float | None:
    """A finite float from an int/float (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _by_label(family, source: dict[str, Any], labels: tuple[str, ...], key: str):
    """`family` (one label) with a sample per label whose `source[key.format(label)]` is a
    number; None when none is, so a scrape never shows a family without samples."""
    found = False
    for label in labels:
        value = _number(source.get(key.format(label)))
        if value is not None:
            family.add_metric([label], value)
            found = True
    return family if found else None


def _step_intervals(snapshot: Any):
    """`server.step_timing.StepIntervals.snapshot()` as one histogram family (None when the
    engine reports none or it is malformed)."""
    if not isinstance(snapshot, dict):
        return None
    family = HistogramMetricFamily(
        "graphserve_step_interval_seconds",
        "Time between two consecutive engine steps' tokens reaching the host while busy: what "
        "a running stream waits on the engine's side (device step, host bookkeeping, graph "
        "captures, any pause of the engine thread), by the kind of step read.",
        labels=["kind"],
    )
    found = False
    for kind, h in snapshot.items():
        try:
            buckets = [(_le(bound), float(n)) for bound, n in h["buckets"]]
            total = float(h["sum"])
        except (KeyError, TypeError, ValueError):
            continue
        family.add_metric([str(kind)], buckets, total)
        found = True
    return family if found else None


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class EngineCollector(Collector):
    """Reads lifecycle, `engine.stats()` and `engine.graph_report()` when Prometheus scrapes."""

    def __init__(self, lifecycle: Lifecycle, engine_getter: Callable[[], Any]):
        self._lifecycle = lifecycle
        self._engine = engine_getter

    def describe(self) -> list[Metric]:
        # Families depend on what the engine reports; an empty description keeps registration
        # from calling collect() (and the engine) at construction time.
        return []

    def collect(self) -> Iterator[Metric]:
        phase = self._lifecycle.phase
        ready = GaugeMetricFamily("graphserve_ready", "1 when the server accepts /v1 requests.")
        ready.add_metric([], 1.0 if phase == READY else 0.0)
        yield ready
        phases = GaugeMetricFamily(
            "graphserve_phase", "Lifecycle phase (1 for the current one).", labels=["phase"]
        )
        for p in PHASES:
            phases.add_metric([p], 1.0 if p == phase else 0.0)
        yield phases

        engine = self._engine()
        if engine is None:
            return
        yield from self._stats(engine)
        yield from self._graphs(engine)

    def _stats(self, engine: Any) -> Iterator[Metric]:
        try:
            stats = engine.stats()
        except Exception:
            logger.debug("engine.stats() failed during scrape", exc_info=True)
            return
        if not isinstance(stats, dict):
            return
        for key, name, doc in (
            ("running", "graphserve_requests_running", "Requests holding a decode slot."),
            ("waiting", "graphserve_requests_waiting", "Requests queued for a decode slot."),
        ):
            value = _number(stats.get(key))
            if value is not None:
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], value)
                yield g
        for key, name, doc in (
            ("step_errors", "graphserve_step_errors", "Engine steps that raised."),
            ("grammar_restarts", "graphserve_grammar_process_restarts",
             "Grammar processes started again after one died or stopped answering (each "
             "failed the constrained requests it was serving)."),
            (
                "discarded_tokens",
                "graphserve_discarded_tokens",
                "Tokens computed one step ahead for sequences that had already stopped.",
            ),
            ("preemptions", "graphserve_preemptions",
             "Sequences preempted for lack of KV blocks (recomputed when blocks free up)."),
            ("scheduled_tokens", "graphserve_step_tokens",
             "Tokens computed by engine steps (decode rows plus prompt tokens): divided by "
             "graphserve_steps_total, the tokens per step."),
            ("prefix_query_tokens", "graphserve_prefix_cache_queried_tokens",
             "Prompt tokens looked up in the prefix cache at admission."),
            ("prefix_hit_tokens", "graphserve_prefix_cache_hit_tokens",
             "Prompt tokens whose KV came from the prefix cache."),
        ):
            value = _number(stats.get(key))
            if value is not None:
                c = CounterMetricFamily(name, doc)
                c.add_metric([], value)
                yield c
        steps = _by_label(CounterMetricFamily(
            "graphserve_steps",
            "Engine steps by kind: decode (decode rows only, on a CUDA graph once ready) or mixed "
            "(prompt chunks with or without decode rows; graphserve_mixed_steps_total says how "
            "they ran).",
            labels=["kind"],
        ), stats, ("decode", "mixed"), "{}_steps")  # fmt: skip
        if steps is not None:
            yield steps
        intervals = _step_intervals(stats.get("step_intervals"))
        if intervals is not None:
            yield intervals
        blocks = _by_label(GaugeMetricFamily(
            "graphserve_kv_blocks",
            "KV-cache blocks by state: used (held by sequences), free (allocatable now, cached "
            "ones included) and cached (free but still holding a reusable prefix).",
            labels=["state"],
        ), stats, ("used", "free", "cached"), "kv_blocks_{}")  # fmt: skip
        if blocks is not None:
            yield blocks
        queried = _number(stats.get("prefix_query_tokens"))
        hit = _number(stats.get("prefix_hit_tokens"))
        if queried is not None and hit is not None:
            g = GaugeMetricFamily(
                "graphserve_prefix_cache_hit_rate",
                "Share of looked-up prompt tokens served from the prefix cache since start.",
            )
            g.add_metric([], hit / queried if queried else 0.0)
            yield g

    def _graphs(self, engine: Any) -> Iterator[Metric]:
        try:
            report = engine.graph_report()
        except Exception:
            logger.debug("engine.graph_report() failed during scrape", exc_info=True)
            return
        if not isinstance(report, dict):
            return

        coverage = report.get("coverage")
        if isinstance(coverage, dict):
            ratio = _number(coverage.get("ratio"))
            if ratio is not None:
                g = GaugeMetricFamily(
                    "graphserve_graph_coverage_ratio",
                    "Fraction of the configured decode batch sizes with a captured CUDA graph.",
                )
                g.add_metric([], ratio)
                yield g

        pool = _number(report.get("pool_bytes_total"))
        if pool is not None:
            g = GaugeMetricFamily(
                "graphserve_graph_pool_bytes", "Bytes held by the shared CUDA graph memory pool."
            )
            g.add_metric([], pool)
            yield g

        complete = report.get("complete")
        if isinstance(complete, bool):
            g = GaugeMetricFamily(
                "graphserve_graph_capture_complete", "1 once every configured size is captured."
            )
            g.add_metric([], 1.0 if complete else 0.0)
            yield g

        pending = report.get("pending_demand")
        if isinstance(pending, list):  # per-size entries: {"size": .., "demand": ..}
            demands = [_number(e.get("demand")) for e in pending if isinstance(e, dict)]
            pending = sum(d for d in demands if d is not None) if demands else None
        pending = _number(pending)
        if pending is not None:
            g = GaugeMetricFamily(
                "graphserve_graph_pending_demand",
                "Decode steps that ran padded or eager for lack of an exact graph, not yet served.",
            )
            g.add_metric([], pending)
            yield g

        traffic = report.get("traffic")
        if isinstance(traffic, dict):
            steps = _by_label(CounterMetricFamily(
                "graphserve_decode_steps",
                "Decode steps by how they ran: exact graph, padded into a larger graph, or eager.",
                labels=["kind"],
            ), traffic, ("exact", "padded", "eager"), "{}_steps")  # fmt: skip
            if steps is not None:
                yield steps

        mixed = report.get("mixed")
        mixed_traffic = mixed.get("traffic") if isinstance(mixed, dict) else None
        if isinstance(mixed_traffic, dict):
            steps = _by_label(CounterMetricFamily(
                "graphserve_mixed_steps",
                "Mixed steps (prompt tokens, with or without decode rows) by how they ran: "
                "replaying a mixed-step graph of a token bucket, or eager.",
                labels=["dispatch"],
            ), mixed_traffic, ("graph", "eager"), "{}_steps")  # fmt: skip
            if steps is not None:
                yield steps

        sizes = report.get("sizes")
        if isinstance(sizes, list):
            yield from self._sizes([s for s in sizes if isinstance(s, dict)])

    @staticmethod
    def _sizes(sizes: list[dict[str, Any]]) -> Iterator[Metric]:
        captures = CounterMetricFamily(
            "graphserve_graph_captures",
            "CUDA graph captures by result (one per batch size that reached that state).",
            labels=["result"],
        )
        states = [s.get("state") for s in sizes]
        captures.add_metric(["captured"], float(states.count("captured")))
        captures.add_metric(["failed"], float(states.count("failed")))
        yield captures

        seconds = GaugeMetricFamily(
            "graphserve_graph_capture_seconds",
            "How long the capture of each batch size's graph took.",
            labels=["size"],
        )
        replays = CounterMetricFamily(
            "graphserve_graph_replays", "Replays of each batch size's graph.", labels=["size"]
        )
        wasted = CounterMetricFamily(
            "graphserve_graph_padded_tokens_wasted",
            "Padding slots computed by replaying each size's graph for a smaller batch.",
            labels=["size"],
        )
        any_seconds = any_replays = any_wasted = False
        for entry in sizes:
            size = entry.get("size")
            if isinstance(size, bool) or not isinstance(size, int):
                continue
            label = [str(size)]
            ms = _number(entry.get("capture_ms"))
            if ms is not None and entry.get("state") == "captured":
                seconds.add_metric(label, ms / 1000.0)
                any_seconds = True
            count = _number(entry.get("replays"))
            if count is not None:
                replays.add_metric(label, count)
                any_replays = True
            pad = _number(entry.get("padded_tokens_wasted"))
            if pad is not None:
                wasted.add_metric(label, pad)
                any_wasted = True
        if any_seconds:
            yield seconds
        if any_replays:
            yield replays
        if any_wasted:
            yield wasted
