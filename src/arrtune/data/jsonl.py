"""Reading UTF-8 text and JSON Lines files with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from arrtune.errors import ArrtuneError


def read_utf8(path: str | Path) -> str:
    """The file's text (UTF-8, with or without a byte-order mark); a directory, a missing file or non-UTF-8 bytes raise ``ArrtuneError`` naming ``path:line``."""
    path = Path(path)
    if path.is_dir():
        raise ArrtuneError(f"{path}: is a directory, not a file")
    try:
        return path.read_text(encoding="utf-8-sig")  # a leading byte-order mark is accepted and dropped
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ArrtuneError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from exc
    except OSError as exc:
        raise ArrtuneError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def parse_json(text: str, path: str | Path, line: int | None = None) -> Any:
    """``json.loads(text)``; invalid JSON raises ``ArrtuneError`` naming ``path:line`` (for a whole file, the
    line the decoder stopped at)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArrtuneError(f"{path}:{line or exc.lineno}: invalid JSON ({exc.msg})") from exc
    except RecursionError as exc:
        where = f"{path}:{line}" if line else str(path)
        raise ArrtuneError(f"{where}: invalid JSON (nested too deeply)") from exc


def read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    """``(where, object)`` for each non-blank line, ``where`` = ``path:line``; bad lines raise ``ArrtuneError``."""
    path = Path(path)
    rows = []
    for lineno, line in enumerate(read_utf8(path).split("\n"), 1):  # not splitlines(): JSON may hold U+2028
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        row = parse_json(line, path, lineno)
        if not isinstance(row, dict):
            raise ArrtuneError(f"{where}: expected a JSON object, got {type(row).__name__}")
        rows.append((where, row))
    return rows
