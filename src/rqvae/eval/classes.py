"""Class ids and class names of class-conditional models: ``--class`` values (an id or a name), the folder
each class's samples go to, and reading such folders back (``rqvae eval --accuracy``)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from rqvae.errors import UserError


def class_folder(name: str) -> str:
    """A class name as a single folder name: path separators and other unsafe characters become ``_``
    (Fashion-MNIST's "T-shirt/top" -> "T-shirt_top")."""
    safe = re.sub(r"[^\w.+=@-]+", "_", str(name)).strip("._")
    return safe or "_"


def class_table(names: Sequence[str], ids: Sequence[int] | None = None) -> str:
    """``0 = apple, 1 = banana, ...`` for the given ids (default: all)."""
    ids = range(len(names)) if ids is None else sorted(set(ids))
    return ", ".join(f"{i} = {names[i]}" for i in ids)


def parse_class(value: str, num_classes: int, names: Sequence[str] = ()) -> int:
    """A ``--class`` value -> class id: an id in [0, num_classes), or a class name (exact, else the one
    name that matches ignoring case, or whose folder name matches)."""
    text = str(value).strip()
    if text in names:
        return list(names).index(text)
    if text.lstrip("-").isdigit():
        k = int(text)
        if not 0 <= k < num_classes:
            known = f" ({class_table(names)})" if names else ""
            raise UserError(f"--class {k} is out of range; this model has classes "
                            f"0..{num_classes - 1}{known}")
        return k
    folded = [i for i, n in enumerate(names) if n.casefold() == text.casefold() or class_folder(n) == text]
    if len(folded) == 1:
        return folded[0]
    if not names:
        raise UserError(f"--class {text!r} is not a class id and this model has no class names; "
                        f"pass an id in 0..{num_classes - 1}")
    raise UserError(f"--class {text!r} is not a class of this model; pass an id or a name: "
                    f"{class_table(names)}")


def folder_class_ids(folders: Sequence[str], num_classes: int, names: Sequence[str], where: str) -> list[int]:
    """Sample sub-folder names -> class ids: a folder is a class name (or its :func:`class_folder` form),
    else a class id."""
    by_folder = {class_folder(n): i for i, n in enumerate(names)}
    ids = []
    for folder in folders:
        if folder in names:
            ids.append(list(names).index(folder))
        elif folder in by_folder:
            ids.append(by_folder[folder])
        elif folder.isdigit() and int(folder) < num_classes:
            ids.append(int(folder))
        else:
            raise UserError(f"sub-folder {folder!r} of {where} is neither a class id in [0, {num_classes}) "
                            f"nor one of the classifier's class names {list(names)}")
    return ids
