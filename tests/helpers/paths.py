"""Where the test fixture files live."""

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "data"  # the official checkpoints copied from shared/
OFFICIAL = FIXTURES / "official"  # checkpoints in the official layout + reference outputs (see its README)
