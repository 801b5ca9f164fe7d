"""The model zoo: trained weights shipped inside the package, usable offline by name.

`isoconv.load("cpu-quick-cifar10")` and `isoconv predict cpu-quick-cifar10 IMAGE` read the entry's .safetensors file
from this folder (an `isoconv export --format safetensors` file: weights plus the config and preprocessing). Each
entry in `index.json` records where its weights came from (recipe, command, commit, data verdict, measured top-1)
and the file's sha256, checked before every load: a file that does not match is refused in one line.
This module reads only JSON and files (no torch), so `isoconv zoo` and `isoconv models` list it at once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Union

from ..errors import UserError
from ..fileio import file_digest

ZOO_DIR = Path(__file__).resolve().parent
INDEX_FILE = ZOO_DIR / "index.json"


@dataclass(frozen=True)
class ZooEntry:
    """One shipped model: its file, checksum and provenance."""

    name: str
    file: str
    sha256: str
    model: str
    recipe: str
    dataset: str
    data: str  # what the data was, in words (e.g. the JPEG-degraded CIFAR-10 copy)
    test_top1: float
    test_images: int
    commit: str
    command: str
    description: str

    @property
    def path(self) -> Path:
        return ZOO_DIR / self.file


def zoo_entries(index: Optional[Path] = None) -> list[ZooEntry]:
    """Every shipped model, in the index's order."""
    index = index or INDEX_FILE
    try:
        doc = json.loads(index.read_text())
        names = {f.name for f in fields(ZooEntry)}
        return [ZooEntry(**{k: v for k, v in entry.items() if k in names}) for entry in doc["models"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"the model zoo index {index} is unreadable ({e}); reinstall isoconv") from None


def zoo_entry(name: str) -> Optional[ZooEntry]:
    return next((e for e in zoo_entries() if e.name == name), None)


def file_sha256(path: Path) -> str:
    return file_digest(path, "sha256")


def verified_file(entry: ZooEntry) -> Path:
    """The entry's weights file, after checking its sha256 against the index."""
    if not entry.path.is_file():
        raise UserError(f"the zoo model {entry.name!r} has no file {entry.path}; reinstall isoconv")
    actual = file_sha256(entry.path)
    if actual != entry.sha256:
        raise UserError(f"the zoo file {entry.path} fails its checksum (sha256 {actual[:16]}..., expected "
                        f"{entry.sha256[:16]}...): it was altered or truncated; reinstall isoconv")
    return entry.path


def resolve_model_path(target: Union[str, Path]) -> Path:
    """`target` as a path; a name that is no existing file or folder but a zoo model is that model's checked file."""
    path = Path(target)
    if path.exists():
        return path
    entry = zoo_entry(str(target))
    return verified_file(entry) if entry is not None else path
