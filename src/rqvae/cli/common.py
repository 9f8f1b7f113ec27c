"""Argument helpers shared by the commands."""

from __future__ import annotations

import json
from pathlib import Path

from rqvae.errors import UserError


def model_config_overrides(value: str | None, config_name: str) -> dict:
    """``--model-config``: a JSON object, or a JSON file (a model folder's config.json works too), of
    ``config_name`` fields overriding the preset."""
    if value is None:
        return {}
    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise UserError(f"--model-config {value} is neither a JSON object nor an existing file")
        text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--model-config is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"--model-config must be a JSON object of {config_name} fields")
    data.pop("model_type", None)
    return data
