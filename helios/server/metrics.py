"""Prometheus metrics (prometheus-client) of one server: request outcomes, tokens and latencies are observed as
requests end; engine state (sequences, KV blocks, preemptions, exits, breaches, model and depth, control events,
energy) is read from the engine's last stats snapshot at scrape time, so a scrape never waits for a step."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from helios.async_llm import AsyncLLM, RequestTimes
from helios.engine.outputs import RequestOutput
from helios.server.energy import EnergyMeter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
disable_created_metrics()  # the *_created series only repeat the server's start time

STATUSES = ("stop", "length", "abort", "error", "invalid")  # finish reasons, engine failures, refused requests


class EngineCollector(Collector):
    def __init__(self, llm: AsyncLLM, energy: EnergyMeter | None, generated_tokens: Callable[[], int]):
        self.llm, self.energy, self.generated_tokens = llm, energy, generated_tokens

    def collect(self):
        stats = self.llm.stats()
        control = stats.get("control") or {}
        yield _gauge("helios_num_requests_running", "Sequences in the running batch", stats.get("num_running", 0))
        yield _gauge("helios_num_requests_waiting", "Sequences waiting for KV blocks or a profile",
                     stats.get("num_waiting", 0))
        total, free = stats.get("kv_blocks_total", 0), stats.get("kv_blocks_free", 0)
        yield _gauge("helios_kv_blocks_total", "KV-cache blocks in the pool", total)
        yield _gauge("helios_kv_blocks_used", "KV-cache blocks held by sequences", total - free)
        yield _gauge("helios_kv_cache_usage_ratio", "Share of KV-cache blocks in use", (total - free) / max(1, total))
        yield _counter("helios_num_preemptions", "Sequences preempted (recomputed) for lack of KV blocks",
                       stats.get("num_preemptions", 0))
        exits = CounterMetricFamily("helios_exit_layer_tokens", "Generated tokens by the 1-based layer they left "
                                    "the stack at (active engine)", labels=["layer"])
        for layer, count in (stats.get("exit_histogram") or {}).items():
            exits.add_metric([str(layer)], count)
        yield exits
        yield _counter("helios_breaches", "Tokens forced out at the truncated depth below their threshold",
                       control.get("breaches_total", stats.get("num_breaches", 0)))
        model = control.get("active_model") or stats.get("model")
        if model is not None:
            info = GaugeMetricFamily("helios_active_model", "The model serving requests (value 1)", labels=["model"])
            info.add_metric([str(model)], 1)
            yield info
        depth = control.get("depth") or stats.get("loaded_layers")
        if depth is not None:
            yield _gauge("helios_active_depth", "Decoder layers the active model runs", depth)
        if control:
            events = CounterMetricFamily("helios_control_events", "Control-plane decisions by kind", labels=["kind"])
            for kind, count in control.get("event_counts", {}).items():
                events.add_metric([kind], count)
            yield events
        if self.energy is not None:
            joules = self.energy.joules()
            yield _counter("helios_energy_joules", "GPU energy since the server started (NVML)", joules)
            tokens = self.generated_tokens()
            yield _gauge("helios_energy_joules_per_token", "GPU energy per generated token since the server started",
                         joules / tokens if tokens else 0.0)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


class ServerMetrics:
    def __init__(self, llm: AsyncLLM, energy: EnergyMeter | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("helios_requests", "Requests by outcome: finish reason (stop, length, abort), error "
                                "(the engine failed on it) or invalid (refused with 400)", ["status"], registry=r)
        for status in STATUSES:
            self.requests.labels(status)
        self.prompt_tokens = Counter("helios_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("helios_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("helios_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("helios_time_per_output_token_seconds", "Mean time between generated tokens, per "
                              "request", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("helios_e2e_request_latency_seconds", "Arrival to the last token", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.num_generated = 0
        r.register(EngineCollector(llm, energy, lambda: self.num_generated))

    def finished(self, output: RequestOutput | None, times: RequestTimes, status: str | None = None) -> None:
        """Observes one request that ended (output None: it failed before any output)."""
        reasons = [c.finish_reason for c in output.outputs] if output is not None else []
        if status is None:
            status = "length" if "length" in reasons else ("abort" if "abort" in reasons else "stop")
        self.requests.labels(status).inc()
        if output is None:
            return
        generated = sum(len(c.token_ids) for c in output.outputs)
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(generated)
        self.num_generated += generated
        if times.first_token is not None:
            self.ttft.observe(times.first_token - times.arrival)
            if times.finished is not None:
                self.e2e.observe(times.finished - times.arrival)
                per_seq = max(len(c.token_ids) for c in output.outputs)
                if per_seq > 1:
                    self.tpot.observe((times.finished - times.first_token) / (per_seq - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
