"""A real Prometheus server (Debian's package) scrapes the gateway and finds its metrics."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest

from ..conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture()
def prometheus(gateway, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus binary not installed (Debian package prometheus; scripts/setup.sh installs it)")
    target = gateway.base_url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: ttc-gateway\n"
                      f"    static_configs:\n      - targets: ['{target}']\n")
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(20)


def test_prometheus_scrapes_gateway_metrics(prometheus, client, model_name):
    client.completions.create(model=model_name, prompt="Scrape me", max_tokens=3)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            r = httpx.get(prometheus + "/api/v1/query", params={"query": 'sum(ttc_flops_total{role="policy"})'})
            result = r.json()["data"]["result"] if r.status_code == 200 else []
            if result and float(result[0]["value"][1]) > 0:
                up = httpx.get(prometheus + "/api/v1/query", params={"query": "up"}).json()["data"]["result"]
                assert up and up[0]["value"][1] == "1"
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise AssertionError("Prometheus never scraped ttc_flops_total from the gateway")
