"""A stand-in for a vLLM OpenAI server that answers every generation with one token, at once.

    python benchmarks/fake_vllm.py --port 8199 [--served-name smollm2-135m-instruct]

For measuring and profiling the gateway's own cost per request without an engine: point a gateway at it
(TTC_POLICY__URLS='["http://127.0.0.1:8199"]' TTC_REWARD_BACKEND=arith) and run `loadtest.py --overhead-pairs`.
A bare asyncio protocol rather than an ASGI app, so the stand-in itself costs as little CPU as possible (the machine's
cores are shared with the gateway being measured). Speaks just enough HTTP/1.1: keep-alive, Content-Length bodies.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson

USAGE = {"prompt_tokens": 12, "total_tokens": 13, "completion_tokens": 1, "prompt_tokens_details": None}


def chat_body(model: str) -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi", "refusal": None,
                                                 "annotations": None, "audio": None, "function_call": None,
                                                 "tool_calls": [], "reasoning_content": None},
                         "logprobs": None, "finish_reason": "length", "stop_reason": None}],
            "service_tier": None, "system_fingerprint": None, "usage": USAGE, "prompt_logprobs": None,
            "prompt_token_ids": None, "kv_transfer_params": None}


def completion_body(model: str) -> dict:
    return {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": " Hi", "logprobs": None, "finish_reason": "length",
                         "stop_reason": None, "prompt_logprobs": None}],
            "service_tier": None, "system_fingerprint": None, "usage": USAGE, "kv_transfer_params": None}


class FakeVLLM(asyncio.Protocol):
    def __init__(self, model: str, delay_s: float = 0.0, step_s: float = 0.0):
        self.model = model
        self.delay_s = delay_s  # answer this much later (tests: a known "overhead")
        # Like an engine's batches: a request arriving during a step runs in the next one, and every request of a
        # step is answered when it ends, together (the burst a gateway meets at high concurrency).
        self.step_s = step_s
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buffer) < head_end + 4 + length:
                return
            body = self.buffer[head_end + 4:head_end + 4 + length]
            self.buffer = self.buffer[head_end + 4 + length:]
            method, path = head[0].split(" ")[:2]
            self.reply(method, path, body)

    def reply(self, method: str, path: str, body: bytes) -> None:
        status, payload = 200, {}
        if path == "/v1/chat/completions":
            payload = chat_body(self.model)
        elif path == "/v1/completions":
            payload = completion_body(self.model)
        elif path == "/tokenize":
            payload = {"count": 12, "max_model_len": 2048, "tokens": list(range(12))}
        elif path == "/v1/models":
            payload = {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        elif path != "/health":
            status, payload = 404, {"error": {"message": f"no route {method} {path}"}}
        raw = orjson.dumps(payload) if path != "/health" else b""
        reason = b"OK" if status == 200 else b"Not Found"
        assert self.transport is not None
        out = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
            status, reason, len(raw), raw)
        loop = asyncio.get_running_loop()
        delay = self.delay_s
        if self.step_s > 0:
            delay += 2 * self.step_s - loop.time() % self.step_s
        if delay > 0:
            loop.call_later(delay, self.transport.write, out)
        else:
            self.transport.write(out)


async def start(host: str, port: int, model: str, delay_s: float = 0.0, step_s: float = 0.0) -> asyncio.Server:
    return await asyncio.get_running_loop().create_server(lambda: FakeVLLM(model, delay_s, step_s), host, port,
                                                          backlog=1024)


async def serve(host: str, port: int, model: str, step_s: float = 0.0) -> None:
    async with await start(host, port, model, step_s=step_s) as server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8199)
    ap.add_argument("--served-name", default="smollm2-135m-instruct")
    ap.add_argument("--step-ms", type=float, default=0.0,
                    help="answer in engine-like steps: every request of a step at its end (0: at once)")
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.host, args.port, args.served_name, args.step_ms / 1000))


if __name__ == "__main__":
    main()
