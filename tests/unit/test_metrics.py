"""Metrics: plain counters for `status`; prometheus-client only to serve them."""

import subprocess
import sys

from prometheus_client import CollectorRegistry, generate_latest

from portsentinel.metrics import Metrics, _Collector


def test_a_daemon_without_metrics_or_fleet_loads_neither_library():
    code = ("import sys, portsentinel.cli, portsentinel.daemon, portsentinel.metrics;"
            "portsentinel.metrics.Metrics().alerts.labels('tcp').inc();"
            "print(sorted(m for m in ('prometheus_client', 'redis') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_status_names_and_the_prometheus_text_agree():
    metrics = Metrics()
    metrics.alerts.labels("tcp").inc()
    metrics.dropped.labels("report queue full").inc(2)
    metrics.active_bans.set(3)
    metrics.active_bans.dec()
    for seconds in (0.0002, 0.0003, 0.02, 5.0, 0.001):  # an edge is in its bucket (le)
        metrics.ban_latency.observe(seconds)
    snapshot = metrics.snapshot()
    assert snapshot["portsentinel_alerts_total{protocol=tcp}"] == 1
    assert snapshot["portsentinel_dropped_events_total{reason=report queue full}"] == 2
    assert snapshot["portsentinel_active_bans"] == 2
    assert snapshot["portsentinel_kernel_bans_total"] == 0  # unlabelled: there from the start
    assert snapshot["portsentinel_ban_latency_seconds_count"] == 5
    registry = CollectorRegistry()
    registry.register(_Collector(metrics))
    text = generate_latest(registry).decode()
    assert 'portsentinel_alerts_total{protocol="tcp"} 1.0' in text
    assert "portsentinel_active_bans 2.0" in text
    assert "# TYPE portsentinel_ban_latency_seconds histogram" in text
    assert 'portsentinel_ban_latency_seconds_bucket{le="0.00025"} 1.0' in text  # cumulative
    assert 'portsentinel_ban_latency_seconds_bucket{le="0.0005"} 2.0' in text
    assert 'portsentinel_ban_latency_seconds_bucket{le="0.001"} 3.0' in text
    assert 'portsentinel_ban_latency_seconds_bucket{le="0.025"} 4.0' in text
    assert 'portsentinel_ban_latency_seconds_bucket{le="+Inf"} 5.0' in text
    assert "portsentinel_ban_latency_seconds_count 5.0" in text
