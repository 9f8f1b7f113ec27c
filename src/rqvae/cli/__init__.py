"""The ``rqvae`` command line: :func:`rqvae.cli.main.main` and one module per subcommand."""

from rqvae.cli.main import main

__all__ = ["main"]
