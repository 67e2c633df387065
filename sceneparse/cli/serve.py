"""`sceneparse serve --model M`: a small HTTP server (GET /health, POST /predict)."""
from __future__ import annotations

from sceneparse.cli.options import add_prediction_args, build_predictor, check_prediction_args
from sceneparse.errors import SceneparseError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP (POST an image, get its label map)",
        description=(
            "Serve one model over HTTP with the standard library. GET /health: model, classes, device "
            "(JSON). POST /predict with the image file's bytes as the body (JPEG, PNG, ... as "
            "`sceneparse predict` reads): ?format=png (default; class ids, 8-bit PNG), json (size and "
            "per-class pixel fractions) or color (the palette's colours). Inference runs one image at a "
            "time; --max-concurrent bounds the requests in progress. Ctrl-C stops. See docs/deploy.md."
        ),
    )
    p.add_argument("--model", required=True, help="checkpoint path or model-zoo name")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 or ::: every "
                        "interface). The server has no authentication and no TLS: anyone who can reach it can use "
                        "it, so keep 127.0.0.1 unless it is behind a reverse proxy")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free port)")
    add_prediction_args(p)
    p.add_argument("--max-body-mb", type=float, default=20,
                   help="largest accepted request body in MiB; larger ones get HTTP 413 (default 20)")
    p.add_argument("--max-concurrent", type=int, default=4, metavar="N",
                   help="requests read, decoded and predicted at once, each holding its body and image in "
                        "memory; one more waits up to 5 seconds for a slot, then gets HTTP 503 with "
                        "Retry-After (default 4). GET /health never waits")
    p.add_argument("--quiet", action="store_true", help="no access log (errors are still logged)")
    p.set_defaults(func=run)


def run(args) -> int:
    from sceneparse.engine.checkpoint import load_model
    from sceneparse.engine.distributed import resolve_device
    from sceneparse.engine.serve import make_server, serve

    if not 0 <= args.port <= 65535:
        raise SceneparseError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_body_mb <= 0:
        raise SceneparseError(f"--max-body-mb must be positive, got {args.max_body_mb}")
    if args.max_concurrent < 1:
        raise SceneparseError(f"--max-concurrent must be positive, got {args.max_concurrent}")
    check_prediction_args(args)
    device = resolve_device(args.device)
    model = load_model(args.model, device=device)
    server = make_server(model, args.host, args.port, predictor=build_predictor(model, args, device),
                         max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                         max_concurrent=args.max_concurrent, quiet=args.quiet)
    serve(server)
    return 0
