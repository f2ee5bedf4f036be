"""Integration fixtures of their own: a real vLLM-CPU pooling (reward) worker, started once per session with the same
command line the gateway's supervisor uses (WorkerSpec(pooling=True)), on a free port, and stopped at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port


class PoolingWorker:
    def __init__(self, model_dir: Path, log_path: Path):
        from service.workers.supervisor import WorkerSpec, vllm_cpu_env

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.spec = WorkerSpec(role="reward", model_dir=str(model_dir), served_name="prm", port=self.port,
                               pooling=True)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(self.spec.command(), env=vllm_cpu_env(self.spec, "auto"), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pooling worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"pooling worker not healthy after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def pooling_worker(prepared_policy_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    worker = PoolingWorker(prepared_policy_dir, tmp_path_factory.mktemp("pooling") / "pooling.log")
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()
