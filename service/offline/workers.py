"""The real workers the offline tools run against: gateway settings from ports or URLs, the one-line checks for a
missing model or head, a started-and-stopped gateway around a batch job, the worker CLI flags, and the model
identity a bank or table records."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any


def gateway_settings(reward_backend: str, policy_port: int, reward_port: int, policy_url: str = "",
                     reward_url: str = "") -> Any:
    from ..config import Settings

    policy: dict[str, Any] = {"port": policy_port}
    reward: dict[str, Any] = {"port": reward_port}
    if policy_url:
        policy["urls"] = [policy_url]
    if reward_url:
        reward["urls"] = [reward_url]
    return Settings(policy=policy, reward=reward, reward_backend=reward_backend)


def check_prepared(settings: Any) -> None:
    """One clear line for each missing step before any worker starts."""
    from ..gateway import DEFAULT_PRM_HEAD, policy_model, reward_model

    uses_prm = "prm" in settings.reward_backend
    head = Path(settings.prm_head_path or DEFAULT_PRM_HEAD)
    if uses_prm and settings.reward.format == "head" and not head.is_file():
        raise SystemExit(f"PRM head {head} missing: train it with `ttc-gateway train-prm` or set TTC_PRM_HEAD_PATH")
    roles = [("policy", policy_model(settings))] + ([("reward", reward_model(settings))] if uses_prm else [])
    for role, model in roles:
        pool = getattr(settings, role)
        # An embedded bundled policy is prepared on start (with_gateway below); remote workers are not, and the
        # gateway still reads the folder for the tokenizer and the FLOPs shape.
        if not pool.model and not Path(model).is_dir() and not pool.embedded:
            raise SystemExit(f"{role} model folder {model} missing: run `ttc-gateway prepare-models` "
                             f"(or set TTC_MODELS_DIR to where it was prepared)")


async def with_gateway(settings: Any, fn: Any) -> Any:
    from ..gateway import Gateway
    from .prepare_models import prepare_bundled

    check_prepared(settings)  # one clear line (which command to run) instead of a hub-id traceback
    prepare_bundled(settings)
    gw = Gateway(settings)
    t0 = time.monotonic()
    # SIGTERM (a killed batch job) must stop the workers too, not orphan them: cancel, then the finally below runs.
    import signal

    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await gw.start()
        print(f"workers ready in {time.monotonic() - t0:.0f} s", flush=True)
        return await fn(gw)
    finally:
        await gw.stop()


def model_info(settings: Any) -> dict[str, Any]:
    import hashlib

    from ..gateway import DEFAULT_PRM_HEAD

    head = Path(settings.prm_head_path or DEFAULT_PRM_HEAD)
    return {"policy": settings.policy.served_name,
            "reward_head": f"{head.name} sha256:{hashlib.sha256(head.read_bytes()).hexdigest()[:16]}"
            if head.exists() else None}


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reward", default="prm*arith", choices=("arith", "prm", "prm*arith"), help="reward backend")
    p.add_argument("--policy-port", type=int, default=8401)
    p.add_argument("--reward-port", type=int, default=8411)
    p.add_argument("--policy-url", default="", help="use running workers instead of starting them")
    p.add_argument("--reward-url", default="")
    p.add_argument("--concurrency", type=int, default=6, help="problems in flight")
    p.add_argument("--seed", type=int, default=20261123, help="shuffle of the dataset pool")
