"""What a folder hf_dgate writes may point `trust_remote_code=True` at: only the loader the export itself generated.

A model loaded with its own remote code, or a config.json that names some repo's code in `auto_map`, would hand
that reference on to every save (`save_pretrained` copies `auto_map`, and copies the class's source file when the
model was registered for an Auto class). An export or a gated save is a new artifact: whoever loads it with
`trust_remote_code=True` should run nothing the export did not write. So saves run under `no_code_references`
(no source files are copied), `strip_code_references` removes every `auto_map` / `custom_pipelines` entry from the
written config.json except the generated loader's, and `check_no_foreign_code` refuses to upload a folder that still
carries one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import ExportError

CODE_KEYS = ("auto_map", "custom_pipelines")
CONFIG_NAME = "config.json"


@contextmanager
def no_code_references(model: Any) -> Iterator[None]:
    """Save `model` without copying remote-code source files: its and its config's `_auto_class` are cleared for the
    duration (transformers copies the class's `.py` files and writes `auto_map` when they are set)."""
    objs = [model, getattr(model, "config", None)]
    saved = []
    for obj in objs:
        if obj is not None and getattr(obj, "_auto_class", None) is not None:
            saved.append((obj, obj.__dict__.get("_auto_class", _UNSET)))
            obj._auto_class = None
    try:
        yield
    finally:
        for obj, value in saved:
            if value is _UNSET:
                obj.__dict__.pop("_auto_class", None)
            else:
                obj._auto_class = value


_UNSET = object()


def _own(value: Any, own_module: str | None) -> bool:
    """An `auto_map` value that points at the generated loader (`module.Class`, no repo prefix)."""
    return own_module is not None and isinstance(value, str) and value.split(".")[0] == own_module and "--" not in value


def _strip(obj: Any, own_module: str | None, path: str, removed: list[str], top: bool) -> Any:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            where = f"{path}.{k}" if path else k
            if k == "auto_map" and top and isinstance(v, dict) and own_module is not None:
                kept = {a: c for a, c in v.items() if _own(c, own_module)}
                removed.extend(f"{where}.{a}" for a in v if a not in kept)
                if kept:
                    out[k] = kept
                continue
            if k in CODE_KEYS:
                removed.append(where)
                continue
            out[k] = _strip(v, own_module, where, removed, False)
        return out
    if isinstance(obj, list):
        return [_strip(v, own_module, path, removed, False) for v in obj]
    return obj


def strip_code_references(directory: str | os.PathLike, own_module: str | None = None) -> list[str]:
    """Rewrite `directory/config.json` without any code reference (`auto_map`, `custom_pipelines`, at any depth)
    except top-level `auto_map` entries pointing at `own_module` (the generated loader). Returns what was removed."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        data = json.load(f)
    removed: list[str] = []
    clean = _strip(data, own_module, "", removed, True)
    if removed:
        with open(path, "w") as f:
            json.dump(clean, f, indent=2, sort_keys=True)
            f.write("\n")
    return removed


def foreign_code(folder: str | os.PathLike, own_file: str | None = None) -> list[str]:
    """Code references in `folder` that the export did not write: `.py` files other than `own_file`, and
    `auto_map` / `custom_pipelines` entries of any JSON file that do not point at `own_file`."""
    own_module = own_file[:-3] if own_file else None
    found: list[str] = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".py") and name != own_file:
            found.append(name)
        elif name.endswith(".json") and os.path.isfile(path):
            try:
                with open(path) as f:
                    data = json.load(f)
            except (OSError, ValueError, RecursionError):
                continue
            removed: list[str] = []
            _strip(data, own_module, "", removed, name == CONFIG_NAME)
            found.extend(f"{name}: {r}" for r in removed)
    return found


def check_no_foreign_code(folder: str | os.PathLike, own_file: str | None = None) -> None:
    """ExportError when `folder` carries code references the export did not write (before it is uploaded)."""
    found = foreign_code(folder, own_file)
    if found:
        raise ExportError(
            f"{os.fspath(folder)!r} carries code the export did not write ({', '.join(found[:4])}); whoever loads it "
            "with trust_remote_code=True would run it. Remove those entries or files, or export again."
        )
