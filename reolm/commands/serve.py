"""reolm serve : the HTTP JSON recommendation service over a model and its index folder."""

from __future__ import annotations

import argparse
import logging

from reolm.config import config_help_epilog

DESCRIPTION = """\
reolm serve --model RUN_OR_EXPORT --index INDEX_DIR [--host 127.0.0.1] [--port P] [key=value ...]

Loads the model and an index folder written for it by `reolm embed items` and answers
POST /recommend, POST /items, DELETE /items/{id}, POST /admin/save, GET /health and GET /metrics
(docs/serving.md). SIGTERM or Ctrl-C stops accepting requests, finishes the in-flight ones and saves
added/deleted items back into INDEX_DIR (save_on_shutdown). Binds loopback unless told otherwise;
there is no authentication."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from reolm.serve.config import ServeConfig

    parser.epilog = config_help_epilog(ServeConfig)
    parser.add_argument("--model", required=True, metavar="RUN_OR_EXPORT", help="the model the index was built with")
    parser.add_argument("--index", required=True, metavar="INDEX_DIR", help="index folder from `reolm embed items`")
    parser.add_argument("--host", help="address to bind (shorthand for host=...; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (shorthand for port=...; default 8000)")
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config file (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. max_k=100")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    from reolm.config import load_config
    from reolm.serve.app import serve
    from reolm.serve.config import ServeConfig

    cfg_overrides = list(args.overrides)
    cfg_overrides += [f"host={args.host}"] if args.host else []
    cfg_overrides += [f"port={args.port}"] if args.port is not None else []
    cfg = load_config(ServeConfig, args.config, cfg_overrides)
    # uvicorn configures its own loggers only; the service's messages (saves, failures) go here.
    logging.basicConfig(level=cfg.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    serve(args.model, args.index, cfg)
    return 0
