"""The floor under the gateway's overhead: the least a Python ASGI proxy on this stack can cost per request.

    python benchmarks/fake_vllm.py --port 8199 --step-ms 40 &
    python benchmarks/floor_proxy.py --port 8193 --upstream http://127.0.0.1:8199 &
    python benchmarks/loadtest.py --gateway http://127.0.0.1:8193 --overhead-pairs 1600 --overhead-concurrency 32

The gateway's own server stack (uvicorn with httptools and uvloop) and upstream client (one shared aiohttp session),
forwarding the request bytes as they came and the answer bytes as they went: no validation, no metering, no
metrics, no budgets, no logging. Whatever overhead this shows at a concurrency is overhead no gateway built on this
stack can go below on the same host. It answers /ready the way loadtest.py reads it (its pid, and the upstream as the
direct side).
"""

from __future__ import annotations

import argparse
import os

import aiohttp
import orjson
import uvicorn


def make_app(upstream: str, model: str):
    state: dict[str, aiohttp.ClientSession] = {}

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    state["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await state["session"].close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/ready":
            out = orjson.dumps({"ready": True, "pid": os.getpid(),
                                "pools": {"policy": {"model": model, "workers": [{"url": upstream}]}}})
        else:
            async with state["session"].post(upstream + scope["path"], data=body,
                                              headers={"content-type": "application/json"}) as r:
                out = await r.read()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": out})

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8193)
    ap.add_argument("--upstream", default="http://127.0.0.1:8199")
    ap.add_argument("--served-name", default="smollm2-135m-instruct")
    args = ap.parse_args()
    uvicorn.run(make_app(args.upstream, args.served_name), host=args.host, port=args.port, log_level="warning",
                http="httptools", loop="uvloop")


if __name__ == "__main__":
    main()
