"""Counters for `portsentinel status` and, when METRICS_ADDRESS is set, a
Prometheus endpoint. The counters are plain Python; prometheus-client (about
12 MiB and 80 ms to import) is loaded only to serve them, through a collector
that reads these values, so a configuration without metrics never pays for it."""

from __future__ import annotations

import threading
from bisect import bisect_left

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)


class _Value:
    __slots__ = ("value", "_lock")

    def __init__(self):
        self.value, self._lock = 0.0, threading.Lock()

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)

    def set(self, value: float) -> None:
        self.value = float(value)


class _Observations:
    __slots__ = ("buckets", "counts", "total", "_lock")

    def __init__(self, buckets):
        self.buckets, self.counts = buckets, [0] * (len(buckets) + 1)
        self.total, self._lock = 0.0, threading.Lock()

    def observe(self, value: float) -> None:
        index = bisect_left(self.buckets, value)  # the first edge >= value
        with self._lock:
            self.counts[index] += 1
            self.total += value


class Metric:
    """One metric, with labels or without (then it is its own only child)."""

    def __init__(self, kind: str, name: str, documentation: str, labelnames=(), buckets=()):
        self.kind, self.name, self.documentation = kind, name, documentation
        self.labelnames, self.buckets = tuple(labelnames), tuple(buckets)
        self._children: dict[tuple, object] = {}
        self._lock = threading.Lock()
        if not self.labelnames:
            self._only = self.labels()

    def _child(self):
        return _Observations(self.buckets) if self.kind == "histogram" else _Value()

    def labels(self, *values):
        child = self._children.get(values)  # label values are mostly str already
        if child is None:
            key = tuple(str(v) for v in values)
            with self._lock:
                child = self._children.setdefault(key, self._child())
        return child

    def children(self) -> list[tuple[tuple, object]]:
        with self._lock:
            return list(self._children.items())

    # without labels, the metric is its own child
    def inc(self, amount: float = 1.0) -> None:
        self._only.inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._only.dec(amount)

    def set(self, value: float) -> None:
        self._only.set(value)

    def observe(self, value: float) -> None:
        self._only.observe(value)


class Metrics:
    def __init__(self):
        self.all: list[Metric] = []
        c, g = self._counter, self._gauge
        self.probes = c("portsentinel_probes", "Probes seen, by protocol and type",
                        ["protocol", "kind"])
        self.alerts = c("portsentinel_alerts", "Scans detected (the trigger was reached)",
                        ["protocol"])
        self.bans = c("portsentinel_bans", "Bans made, by origin", ["origin"])
        self.bans_by_evidence = c("portsentinel_bans_by_evidence",
                                  "Bans made, by what made them (handshake, repeated, single, "
                                  "fleet, manual)", ["evidence"])
        self.unbans = c("portsentinel_unbans", "Bans lifted, by cause", ["cause"])
        self.decoys = c("portsentinel_suspected_decoys",
                        "Stateless probes from handshake peers, not blocked")
        self.rate_limited = c("portsentinel_rate_limited",
                              "Detections not blocked: the ban rate limit was reached")
        self.fleet_received = c("portsentinel_fleet_bans_applied",
                                "Bans received from fleet members and applied")
        self.fleet_rejected = c("portsentinel_fleet_rejected",
                                "Fleet messages and keys ignored, by reason", ["reason"])
        self.active_bans = g("portsentinel_active_bans", "Bans in force")
        self.banned_dropped = g("portsentinel_banned_packets_dropped",
                                "Packets dropped from the sources banned now, by their bans "
                                "(their set elements' counters, at the last reconciliation)")
        self.bypassed = g("portsentinel_ban_bypass_packets",
                          "Packets from the sources banned now that a bridge forwarded past "
                          "the IP firewall (at the last reconciliation; bridges.py)")
        self.dropped = c("portsentinel_dropped_events", "Events not fully handled, by reason",
                         ["reason"])
        self.kernel_bans = c("portsentinel_kernel_bans",
                             "Bans the kernel trap made by itself, as reported by NFLOG")
        self.replies = c("portsentinel_replies_ignored",
                         "Packets to trap ports that answered this host's own traffic")
        self.drift = c("portsentinel_firewall_drift",
                       "Bans found in only one of the kernel sets and the state, fixed by "
                       "reconciliation", ["where"])
        self.held = c("portsentinel_first_contacts_held",
                      "Strangers' first SYNs held (FIRST_CONTACT_HOLD)")
        self.held_late = c("portsentinel_first_contacts_held_late",
                           "Held SYNs released more than 50 ms after their time")
        self.hold_passed = c("portsentinel_first_contacts_unheld",
                             "SYNs the kernel let pass unheld: the queue was full or the "
                             "daemon fell behind (fail open)")
        self.hold_lapsed = c("portsentinel_first_contacts_lapsed",
                             "New sources that passed unheld because the daemon did not "
                             "release their first SYN in time (it stalled; fail open)")
        self.ban_set_fill = g("portsentinel_ban_set_fill_ratio",
                              "Bans in force over BAN_SET_SIZE (per-family sets)")
        self.ban_latency = self._add(Metric(
            "histogram", "portsentinel_ban_latency_seconds",
            "From the probe's kernel timestamp to the ban in the firewall (userspace path)",
            buckets=LATENCY_BUCKETS))

    def _add(self, metric: Metric) -> Metric:
        self.all.append(metric)
        return metric

    def _counter(self, name, documentation, labelnames=()) -> Metric:
        return self._add(Metric("counter", name, documentation, labelnames))

    def _gauge(self, name, documentation, labelnames=()) -> Metric:
        return self._add(Metric("gauge", name, documentation, labelnames))

    def snapshot(self) -> dict[str, float]:
        """Flat name{labels} -> value, for `status` (counters end in _total)."""
        values = {}
        for metric in self.all:
            for key, child in metric.children():
                labels = ",".join(f"{n}={v}" for n, v in sorted(zip(metric.labelnames, key)))
                suffix = f"{{{labels}}}" if labels else ""
                if metric.kind == "counter":
                    values[f"{metric.name}_total{suffix}"] = child.value
                elif metric.kind == "gauge":
                    values[f"{metric.name}{suffix}"] = child.value
                else:
                    values[f"{metric.name}_count{suffix}"] = float(sum(child.counts))
                    values[f"{metric.name}_sum{suffix}"] = child.total
        return values

    def serve(self, address: tuple[str, int]) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        registry.register(_Collector(self))
        start_http_server(address[1], addr=address[0], registry=registry)


class _Collector:
    """Our values as prometheus-client metric families, read at each scrape."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        families = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
                    "histogram": HistogramMetricFamily}
        for metric in self.metrics.all:
            family = families[metric.kind](metric.name, metric.documentation,
                                           labels=metric.labelnames)
            for key, child in metric.children():
                if metric.kind == "histogram":
                    edges = [*(repr(float(b)) for b in metric.buckets), "+Inf"]
                    running, buckets = 0, []
                    for edge, count in zip(edges, child.counts):
                        running += count
                        buckets.append((edge, running))
                    family.add_metric(list(key), buckets, child.total)
                else:
                    family.add_metric(list(key), child.value)
            yield family
