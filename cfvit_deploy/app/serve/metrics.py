"""Prometheus metrics of the server, with the standard client library (one registry per app)."""

from __future__ import annotations

from typing import Any

from cfvit_deploy.extras import require

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """Requests by status, latency, answers by stage and the exit rate, batch sizes, queue depth."""

    def __init__(self) -> None:
        prom = require("prometheus_client", "serve", "cfvit serve")
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        # protocol: "v1" (POST /v1/classify) or "v2" (POST /v2/models/.../infer, N images a request)
        self.requests = prom.Counter(
            "cfvit_requests",
            "Classify and infer requests by HTTP status (499: client went away) and protocol",
            ["status", "protocol"],
            registry=r,
        )
        self.latency = prom.Histogram(
            "cfvit_request_latency_seconds",
            "Classify and infer latency by protocol: request in to answer out",
            ["protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.answers = prom.Counter(
            "cfvit_answers", "Answered images by the stage that answered them", ["stage"], registry=r
        )
        self.exit_rate = prom.Gauge(
            "cfvit_exit_rate", "Share of answered images that exited at the coarse stage", registry=r
        )
        self.exit_rate.set_function(self._exit_rate)
        self.batch_size = {
            stage: prom.Histogram(
                f"cfvit_{stage}_batch_size", f"Images per {stage} graph call", buckets=BATCH_BUCKETS, registry=r
            )
            for stage in ("coarse", "fine")
        }
        self.stage_seconds = prom.Histogram(
            "cfvit_stage_seconds", "Seconds per graph call", ["stage"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = prom.Gauge("cfvit_queue_depth", "Requests waiting for a stage", ["stage"], registry=r)
        self.in_engine = prom.Gauge("cfvit_requests_in_engine", "Requests accepted and not yet answered", registry=r)
        self._counts = {"coarse": 0, "fine": 0}

    def watch(self, engine: Any) -> None:
        """Read the queue depths from `engine` at every scrape."""
        for stage in ("coarse", "fine"):
            self.queue_depth.labels(stage=stage).set_function(lambda stage=stage: engine.depth(stage))
        self.in_engine.set_function(lambda: engine.pending)

    def _exit_rate(self) -> float:
        total = self._counts["coarse"] + self._counts["fine"]
        return self._counts["coarse"] / total if total else 0.0

    # observer callbacks --------------------------------------------------------------------------
    def on_batch(self, stage: str, size: int, seconds: float) -> None:
        self.batch_size[stage].observe(size)
        self.stage_seconds.labels(stage=stage).observe(seconds)

    def on_answer(self, stage: str) -> None:
        self._counts[stage] += 1
        self.answers.labels(stage=stage).inc()

    def on_request(self, status: int, seconds: float, protocol: str = "v1") -> None:
        self.requests.labels(status=str(status), protocol=protocol).inc()
        self.latency.labels(protocol=protocol).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST
