"""``rqvae serve RUN_OR_MODEL_DIRS... [--host 127.0.0.1] [--port 8000]``: a local web app.

    rqvae serve runs/demo                      # a `make demo` folder: its vae/model and ar/model
    rqvae serve runs/vae/model runs/ar/model   # model folders (or run folders holding model/)
    rqvae serve runs/vae                       # an RQ-VAE alone: the tokenizer and coarse-to-fine views

The page works offline (one HTML page, vanilla JS and CSS, all served from here). Ctrl-C stops the server.
"""

from __future__ import annotations

import argparse

from rqvae.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_MODEL_DIR",
                        help="a `make demo` folder, training run folders (RUN/model) or model folders")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--max-images", type=int, default=64, help="most images per request (default 64)")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload in MB (default 10)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per sampling batch; progress advances once per batch (default 8)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    # imported when the command runs (start-up time): torch, starlette and uvicorn load slowly
    from rqvae.serve.app import create_app
    from rqvae.serve.engine import Engine
    from rqvae.serve.models import load_models
    from rqvae.serve.server import bind, make_server, url

    if args.max_images < 1 or args.batch_size < 1 or args.max_upload_mb <= 0:
        raise UserError("--max-images and --batch-size must be at least 1 and --max-upload-mb above 0")
    sock = bind(args.host, args.port)  # first: a busy port fails before the models load
    with sock:
        models = load_models(args.paths, device=args.device)
        engine = Engine(models, max_images=args.max_images, batch_size=args.batch_size)
        server = make_server(create_app(engine, max_upload_mb=args.max_upload_mb))
        ar = f", RQ-Transformer {models.ar_dir}" if models.ar_dir else ""
        print(f"rqvae serve: {url(sock)}  (RQ-VAE {models.vae_dir}{ar}; Ctrl-C stops)", flush=True)
        try:
            server.run(sockets=[sock])  # uvicorn stops cleanly on Ctrl-C (SIGINT) and SIGTERM
        finally:
            engine.close()
    print("rqvae serve: stopped")
    return 0
