"""Sections of ``docs/results.md`` written by different benchmarks: each between its own markers, so a
rerun of one benchmark replaces only its section."""

from __future__ import annotations

import os
import re
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def sections(text: str) -> dict[str, str]:
    """{name: the whole marked block} of every marked section in ``text``."""
    pattern = re.compile(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->\n?", re.S)
    return {m.group(1): m.group(0) for m in pattern.finditer(text)}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` between ``name``'s markers in ``path``: in place of the old block, else at the end."""
    begin, end = markers(name)
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.is_file() else ""
    old = sections(text).get(name)
    if old is not None:
        text = text.replace(old, block)
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + block
    _write(path, text)


def write_keeping_sections(path: Path, text: str) -> None:
    """Write ``text`` (unmarked content) to ``path``, keeping the marked sections ``path`` already has."""
    kept = sections(path.read_text()) if path.is_file() else {}
    _write(path, text.rstrip() + "\n" + "".join("\n" + block for block in kept.values()))
