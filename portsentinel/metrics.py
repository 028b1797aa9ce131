"""Counters for `portsentinel status` and, when METRICS_ADDRESS is set, a
Prometheus endpoint (prometheus-client, its own registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.probes = Counter("portsentinel_probes", "Probes seen, by protocol and type",
                              ["protocol", "kind"], registry=r)
        self.alerts = Counter("portsentinel_alerts", "Scans detected (the trigger was reached)",
                              ["protocol"], registry=r)
        self.bans = Counter("portsentinel_bans", "Bans made, by origin", ["origin"], registry=r)
        self.unbans = Counter("portsentinel_unbans", "Bans lifted, by cause", ["cause"],
                              registry=r)
        self.decoys = Counter("portsentinel_suspected_decoys",
                              "Stateless probes from handshake peers, not blocked", registry=r)
        self.rate_limited = Counter("portsentinel_rate_limited",
                                    "Detections not blocked: the ban rate limit was reached",
                                    registry=r)
        self.fleet_received = Counter("portsentinel_fleet_bans_applied",
                                      "Bans received from fleet members and applied",
                                      registry=r)
        self.fleet_rejected = Counter("portsentinel_fleet_rejected",
                                      "Fleet messages and keys ignored, by reason",
                                      ["reason"], registry=r)
        self.active_bans = Gauge("portsentinel_active_bans", "Bans in force", registry=r)
        self.dropped = Counter("portsentinel_dropped_events",
                               "Events not fully handled, by reason", ["reason"], registry=r)
        self.kernel_bans = Counter("portsentinel_kernel_bans",
                                   "Bans the kernel trap made by itself, as reported by NFLOG",
                                   registry=r)
        self.replies = Counter("portsentinel_replies_ignored",
                               "Packets to trap ports that answered this host's own traffic",
                               registry=r)
        self.drift = Counter("portsentinel_firewall_drift",
                             "Bans found in only one of the kernel sets and the state, fixed "
                             "by reconciliation", ["where"], registry=r)
        self.ban_set_fill = Gauge("portsentinel_ban_set_fill_ratio",
                                  "Bans in force over BAN_SET_SIZE (per-family sets)",
                                  registry=r)
        self.ban_latency = Histogram(
            "portsentinel_ban_latency_seconds",
            "From the probe's kernel timestamp to the ban in the firewall (userspace path)",
            buckets=LATENCY_BUCKETS, registry=r)

    def serve(self, address: tuple[str, int]) -> None:
        start_http_server(address[1], addr=address[0], registry=self.registry)

    def snapshot(self) -> dict[str, float]:
        """Flat name{labels} -> value, for `status`."""
        values = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith(("_created", "_bucket")):
                    continue
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return values
