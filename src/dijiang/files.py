"""Reading and writing results safely: JSON and JSONL readers name the file (and line) of a bad record; nothing a
command did not make is replaced unless the user passed --overwrite, and folders (models, checkpoints, caches)
appear whole or not at all.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def is_empty_or_missing(path: Path) -> bool:
    path = Path(path)
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def refuse_to_replace(path: str | Path, overwrite: bool, what: str = "output") -> None:
    """ValueError when `path` exists and holds something, unless `overwrite`."""
    if not overwrite and not is_empty_or_missing(Path(path)):
        raise ValueError(f"{what} {path} already exists and is not empty: pass --overwrite to replace it, "
                         "or choose another path")


def same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def read_json(path: str | Path):
    """The JSON value in `path`; a ValueError that names the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def read_jsonl(path: str | Path, torn_last_line_ok: bool = False) -> list[dict]:
    """Records of a JSONL log (blank lines skipped); a bad line is a ValueError naming the file and line.

    torn_last_line_ok: drop an unreadable last line instead (a kill in the middle of appending it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such log file: {path}")
    lines = [(number, line) for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if torn_last_line_ok and index == len(lines) - 1:
                break
            raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
    return records


def write_text_atomic(path: Path, text: str) -> None:
    """A kill leaves the old file or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def replace_dir(new: Path, path: Path) -> None:
    """Move the finished folder `new` to `path`; an existing `path` is set aside first and removed after.

    A kill between the two renames leaves the old contents in `.NAME.old<pid>` beside `path`, never a mix.
    """
    if path.exists():
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, path)


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a hidden temporary folder beside `path`; when the block ends without error it becomes `path`.

    On error (or a kill) `path` is untouched: the half-written temporary folder is removed (or left hidden).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)
