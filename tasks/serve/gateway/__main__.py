"""The OpenAI-compatible chat gateway in front of Triton.

Runs it in the foreground (what `llmops serve` starts in the background):

    python -m tasks.serve.gateway --profile dev --port 9000 [--triton-grpc host:port] [--set key=value ...]
"""

from __future__ import annotations

import logging


def main(argv: list[str] | None = None) -> None:
    """Run the gateway in the foreground (what `llmops serve` starts in the background)."""
    import argparse

    import uvicorn

    from tasks.config import load_settings
    from tasks.serve.gateway.app import create_app

    ap = argparse.ArgumentParser(prog="python -m tasks.serve.gateway", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--triton-grpc", default=None, help="host:port of Triton's gRPC endpoint")
    args = ap.parse_args(argv)
    settings = load_settings(args.profile, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings, triton_grpc=args.triton_grpc)
    uvicorn.run(app, host=settings.stack.host, port=args.port or settings.serve.gateway.port,
                log_level="warning", access_log=False, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
