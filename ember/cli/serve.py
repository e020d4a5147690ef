"""`ember serve`: the OpenAI-compatible server (plus the sessions API and web page when present)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ember.cli.options import add_model_options
from ember.errors import EmberError

API_KEY_VARIABLE = "EMBER_API_KEY"


def add_parser(subcommands: argparse._SubParsersAction) -> None:
    from ember.server.settings import DEFAULT_HOST, DEFAULT_PORT

    parser = subcommands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (and the web page). "
        "Binds to 127.0.0.1 unless --host says otherwise.",
    )
    add_model_options(parser)
    group = parser.add_argument_group("server")
    group.add_argument(
        "--host", default=DEFAULT_HOST, metavar="HOST", help=f"address to bind (default {DEFAULT_HOST})"
    )
    group.add_argument(
        "--port", type=int, default=DEFAULT_PORT, metavar="PORT", help=f"port (default {DEFAULT_PORT})"
    )
    group.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' (repeatable; also ${API_KEY_VARIABLE})",
    )
    group.add_argument(
        "--api-keys-file",
        default=None,
        metavar="FILE",
        help="a file of API keys, one per line, each optionally followed by a user name",
    )
    group.add_argument(
        "--max-batch",
        type=int,
        default=None,
        metavar="N",
        help="most sequences decoded per step (default 16)",
    )
    group.add_argument(
        "--ctx",
        dest="context_length",
        type=int,
        metavar="N",
        default=argparse.SUPPRESS,
        help="same as --context-length",
    )
    group.add_argument(
        "--queue-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds a request may wait for a free slot before a 503 with Retry-After (default 60)",
    )
    group.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM / Ctrl-C, seconds running replies get to finish (default 30)",
    )
    group.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser requests from this origin (repeatable)",
    )
    group.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="where sessions are stored (default: $EMBER_HOME or ~/.local/share/ember)",
    )
    group.add_argument(
        "--max-body-mib",
        type=float,
        default=8.0,
        metavar="MIB",
        help="largest request body accepted, MiB (default 8)",
    )
    parser.set_defaults(run=run)


def _model_name(model: str) -> str:
    path = Path(model)
    if path.exists():
        return path.stem if path.is_file() else path.name
    return model


def run(args: argparse.Namespace) -> int:
    from ember.server.auth import ApiKeys
    from ember.server.engine_service import EngineService
    from ember.server.runner import serve
    from ember.server.settings import ServerSettings
    from ember.sessions.data_dir import default_store_path

    if not 0 <= args.port <= 65535:
        raise EmberError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_batch is not None and args.max_batch < 1:
        raise EmberError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.queue_timeout <= 0 or args.drain_timeout < 0:
        raise EmberError("--queue-timeout must be > 0 and --drain-timeout >= 0")
    if args.threads is not None and args.threads < 1:
        raise EmberError(f"--threads must be at least 1, got {args.threads}")
    if args.max_body_mib <= 0:
        raise EmberError("--max-body-mib must be > 0")
    api_keys = ApiKeys.from_sources(
        args.api_key, args.api_keys_file, environment_key=os.environ.get(API_KEY_VARIABLE) or None
    )
    settings = ServerSettings(
        model_name=_model_name(args.model),
        host=args.host,
        port=args.port,
        api_keys=api_keys,
        cors_origins=list(args.cors_origin),
        queue_timeout=args.queue_timeout,
        drain_timeout=args.drain_timeout,
        max_body_bytes=int(args.max_body_mib * (1 << 20)),
        store_path=default_store_path(args.data_dir),
        model_aliases=[args.model],
    )

    def load_model(progress):
        import torch

        import ember

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        return ember.load(
            args.model,
            dtype=args.dtype,
            device=args.device,
            cuda_graphs=args.cuda_graphs,
            quant=args.quant,
            context_length=args.context_length,
            cache_memory_mib=args.cache_memory,
            on_layer_built=progress,
            tokenizer=args.tokenizer,
        )

    service = EngineService(
        load_model,
        model_name=settings.model_name,
        max_batch_size=args.max_batch,
        queue_timeout=args.queue_timeout,
    )
    return serve(settings, service)
