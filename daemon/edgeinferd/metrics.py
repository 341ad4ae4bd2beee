"""Counters and latency histograms, kept cheaply on the hot path and read on demand.

The data plane updates plain Python numbers from the event loop (no locks,
no label lookups in prometheus-client per call); the Prometheus endpoint and
the GetStats RPC read them when asked. Status labels are gRPC code names, so
operators see the same vocabulary as callers.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import resource
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgeinferd.errors import status_name

if TYPE_CHECKING:
    from edgeinferd.budgets import ConnectionBudgets
    from edgeinferd.models import ModelManager

#: Seconds; from 50 µs (a fast batch-1 call) to 10 s.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
PHASES = ("queue", "compute", "total")
#: The one bucket for calls naming a model that does not exist or a name that is
#: invalid (no model name can contain parentheses).
UNKNOWN_MODEL = "(unknown)"
#: Keys kept at most; beyond it calls are counted in the unknown bucket. The data
#: plane already keys only by served models, this is the backstop.
MAX_KEYS = 4096


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: (upper bound, count of observations <= bound)."""
        running, result = 0, []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            result.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return result


@dataclass
class ModelCounters:
    requests: Counter[str] = field(default_factory=Counter)
    latency: dict[str, Histogram] = field(default_factory=lambda: {p: Histogram() for p in PHASES})


class Metrics:
    def __init__(self, stream_budgets: ConnectionBudgets | None = None) -> None:
        self.started = time.monotonic()
        self.in_flight = 0
        #: Read for the stream gauges; owned by the data plane.
        self.stream_budgets = stream_budgets
        self.models: dict[tuple[str, str], ModelCounters] = {}

    def record(
        self,
        model: str,
        version: str,
        error: BaseException | None,
        total_s: float,
        queue_s: float | None = None,
        compute_s: float | None = None,
    ) -> None:
        counters = self.models.get((model, version))
        if counters is None:
            if len(self.models) >= MAX_KEYS:
                model, version = UNKNOWN_MODEL, ""
                counters = self.models.get((model, version))
            if counters is None:
                counters = self.models[(model, version)] = ModelCounters()
        counters.requests[status_name(error)] += 1
        if error is None:
            counters.latency["total"].observe(total_s)
            if queue_s is not None and compute_s is not None:
                counters.latency["queue"].observe(queue_s)
                counters.latency["compute"].observe(compute_s)

    def record_success(
        self, model: str, version: str, total_s: float, queue_s: float, compute_s: float
    ) -> None:
        """``record`` for a call that was answered: the one every served call takes."""
        counters = self.models.get((model, version))
        if counters is None:
            self.record(model, version, None, total_s, queue_s, compute_s)
            return
        counters.requests["OK"] += 1
        latency = counters.latency
        latency["total"].observe(total_s)
        latency["queue"].observe(queue_s)
        latency["compute"].observe(compute_s)

    def snapshot(self) -> list[tuple[tuple[str, str], ModelCounters]]:
        # list() of a dict's items is one C call: safe to take from the metrics thread.
        return list(self.models.items())


def resident_memory_bytes() -> int:
    """Current RSS (not the peak that getrusage reports)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


class PrometheusCollector:
    """A prometheus-client collector that reads Metrics and the model states at scrape time."""

    def __init__(self, metrics: Metrics, models: ModelManager) -> None:
        self.metrics = metrics
        self.models = models

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        requests = CounterMetricFamily(
            "edgeinfer_requests",
            "Inference calls answered, by model, version and gRPC status.",
            labels=["model", "version", "status"],
        )
        latency = HistogramMetricFamily(
            "edgeinfer_request_duration_seconds",
            "Inference call latency in the daemon: queue (waiting for a batch), compute"
            " (the forward pass) and total (decode to encode).",
            labels=["model", "version", "phase"],
        )
        for (model, version), counters in self.metrics.snapshot():
            for status, count in list(counters.requests.items()):
                requests.add_metric([model, version, status], count)
            for phase, histogram in counters.latency.items():
                latency.add_metric([model, version, phase], histogram.cumulative(), histogram.total)
        yield requests
        yield latency

        batches = HistogramMetricFamily(
            "edgeinfer_batch_size", "Rows per forward pass.", labels=["model", "version"]
        )
        states = GaugeMetricFamily(
            "edgeinfer_model_state", "1 for each model's current state.", labels=["model", "state"]
        )
        queued = GaugeMetricFamily(
            "edgeinfer_queued_requests", "Calls waiting for a batch.", labels=["model"]
        )
        inline = CounterMetricFamily(
            "edgeinfer_inline_passes",
            "Forward passes run on the event loop instead of a worker thread.",
            labels=["model", "version"],
        )
        loaded = 0
        for entry in self.models.entries():
            states.add_metric([entry.name, entry.state.value], 1)
            serving = entry.serving
            if serving is None:
                continue
            loaded += 1
            batcher = getattr(serving, "batcher", None)
            if batcher is None:
                continue
            queued.add_metric([entry.name], batcher.queued)
            inline.add_metric([entry.name, serving.version], batcher.inline_passes)
            sizes = sorted(batcher.stats.sizes.items())
            running, buckets = 0, []
            for size, count in sizes:
                running += count
                buckets.append((str(size), running))
            buckets.append(("+Inf", running))
            batches.add_metric(
                [entry.name, serving.version], buckets, float(sum(s * c for s, c in sizes))
            )
        yield batches
        yield inline
        yield states
        yield queued
        yield GaugeMetricFamily("edgeinfer_models_loaded", "Models serving.", value=loaded)
        yield GaugeMetricFamily(
            "edgeinfer_in_flight_requests", "Calls being served now.", value=self.metrics.in_flight
        )
        budgets = self.metrics.stream_budgets
        if budgets is not None:
            yield GaugeMetricFamily(
                "edgeinfer_stream_request_bytes",
                "Request bytes held by every stream, all together.",
                value=budgets.held,
            )
            yield GaugeMetricFamily(
                "edgeinfer_stream_local_request_bytes",
                "Request bytes held by the streams on the Unix socket, which share one budget.",
                value=budgets.local_held,
            )
            yield GaugeMetricFamily(
                "edgeinfer_stream_connection_request_bytes_max",
                "Request bytes held by the streams of the budget holding the most "
                "(a TCP connection's, or the Unix socket's).",
                value=budgets.most_held,
            )
            yield GaugeMetricFamily(
                "edgeinfer_stream_connections",
                "Stream budgets in use now: a TCP connection with a stream open is one, "
                "all Unix-socket streams together one.",
                value=budgets.connections,
            )


#: HTTP connections served at once; more are closed at once (a scrape is one connection).
MAX_METRICS_CONNECTIONS = 16
#: Seconds a connection may take to send its request and read the answer.
METRICS_TIMEOUT_S = 5.0
#: Longest request head accepted, in bytes.
MAX_REQUEST_HEAD = 8192


class MetricsEndpoint:
    """/metrics over HTTP from the event loop: no thread per connection.

    prometheus-client's own server starts a thread for every connection, so
    300 half-sent requests made 300 threads. Here a connection is a coroutine,
    at most ``MAX_METRICS_CONNECTIONS`` of them, each with a deadline; the
    exposition text is built on one worker thread, never on the loop.
    """

    def __init__(
        self,
        metrics: Metrics,
        models: ModelManager,
        max_connections: int = MAX_METRICS_CONNECTIONS,
        timeout_s: float = METRICS_TIMEOUT_S,
    ) -> None:
        from prometheus_client import CollectorRegistry, ProcessCollector

        self.registry = CollectorRegistry()
        self.registry.register(PrometheusCollector(metrics, models))
        ProcessCollector(registry=self.registry)
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.open_connections = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="metrics")
        self._server: asyncio.base_events.Server | None = None

    async def start(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._server = await asyncio.start_server(
            self._serve, host.strip("[]"), int(port), limit=MAX_REQUEST_HEAD
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open_connections >= self.max_connections:
            writer.close()
            return
        self.open_connections += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
                parts = head.split(b"\r\n", 1)[0].split()
                path = parts[1].split(b"?")[0] if len(parts) == 3 else b""
                if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
                    status, body, kind = b"405 Method Not Allowed", b"GET /metrics only\n", b""
                elif path not in (b"/metrics", b"/"):
                    status, body, kind = b"404 Not Found", b"GET /metrics only\n", b""
                else:
                    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                    loop = asyncio.get_running_loop()
                    body = await loop.run_in_executor(
                        self._executor, generate_latest, self.registry
                    )
                    status, kind = b"200 OK", CONTENT_TYPE_LATEST.encode()
                writer.write(
                    b"HTTP/1.1 " + status + b"\r\nContent-Type: " + (kind or b"text/plain")
                    + b"\r\nContent-Length: " + str(len(body)).encode()
                    + b"\r\nConnection: close\r\n\r\n"
                    + (b"" if parts[:1] == [b"HEAD"] else body)
                )  # fmt: skip
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a slow, truncated or oversized request: the connection is dropped
        finally:
            self.open_connections -= 1
            writer.close()


async def start_metrics_server(
    address: str, metrics: Metrics, models: ModelManager
) -> MetricsEndpoint:
    """Serve /metrics on ``host:port`` from the event loop (see MetricsEndpoint)."""
    endpoint = MetricsEndpoint(metrics, models)
    await endpoint.start(address)
    return endpoint
