"""Scraping ferryd's metrics as Prometheus would: over HTTP, parsed by prometheus_client."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from ferry.config.host import MetricsConfig
from ferry.daemon.metrics import MetricsServer
from ferry.util.metrics import Metrics


def fetch(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def value(text: str, name: str, **labels: str) -> float:
    """The one sample ``name`` with exactly ``labels`` in an exposition."""
    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and s.labels == labels
    ]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return float(found[0])


async def scrape(metrics: Metrics) -> str:
    """One scrape through a real MetricsServer on a free port."""
    server = MetricsServer(MetricsConfig(port=0), metrics)
    await server.start()
    try:
        status, text = await asyncio.to_thread(fetch, server.port)
    finally:
        await server.close()
    assert status == 200, text
    return text
