"""The run folder: the one definition of what a run writes where, and how its files are read back.

    config.yaml      every resolved setting (written when the run starts)
    metrics.jsonl    one JSON row per finished epoch
    last.pt          the latest checkpoint (last.prev.pt: the one before it)
    epoch-NNN.pt     with --keep-every N, the checkpoint of every N-th epoch's end
    summary.json     final metrics and facts about the run (its presence means the run finished)
    report.txt       the per-class classification report
    error.txt        why an ablation run failed (it is retried next time)
    tensorboard/     scalars, with --tensorboard
    tracking.json    which MLflow run tracks this one, with --track mlflow (a resumed run continues it)

Every file is written atomically (`isoconv.fileio`); metrics rows are appended and fsynced one by one.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import yaml

from .errors import UserError
from .fileio import append_line, atomic_write

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two processes on one folder are then not detected
    fcntl = None

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
PREVIOUS_CHECKPOINT_NAME = "last.prev.pt"
RUNS_FOLDER = Path("runs")
# the files and folders a run writes into its folder (epoch-NNN.pt aside): no other command's output may replace them
RUN_FILES = ("config.yaml", "metrics.jsonl", CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, "summary.json", "report.txt",
             "error.txt", "tensorboard", "tracking.json", ".lock", "report.md", "plots")
# keys every config.yaml isoconv writes holds (a project's own config.yaml does not make its folder a run)
_RUN_CONFIG_KEYS = {"model", "epochs", "batch_size", "lr_max", "seed"}


def check_output_folder(path: Union[str, Path], flag: str = "--out", what: str = "run folder") -> Path:
    """Raise a UserError (naming `flag` and the path) unless `path` can be (or already is) a writable folder.

    Checked before any data is read, and without leaving anything behind: the folders that would be created are
    not created here; a probe file in the deepest existing folder shows it can be written."""
    text = str(path)
    hint = f"pass {flag} a folder path in a writable location"
    if not text.strip():
        raise UserError(f"{flag} is empty; {hint}")
    if "\x00" in text:
        raise UserError(f"{flag} {text!r} contains a NUL character; {hint}")
    path = Path(text).expanduser()
    missing: list[str] = []
    existing = path
    try:
        while not existing.exists():
            if existing.is_symlink():
                raise UserError(f"{flag} {text}: {existing} is a broken symbolic link; remove it or {hint}")
            missing.append(existing.name)
            if existing.parent == existing:
                break
            existing = existing.parent
        if not existing.is_dir():
            if existing == path:
                raise UserError(f"{flag} {text} is an existing file, not a folder; {hint} (a {what} is created "
                                f"there)")
            raise UserError(f"{flag} {text} cannot be created: {existing} is a file, not a folder; {hint}")
        for name in missing:
            limit = _name_max(existing)
            if len(os.fsencode(name)) > limit:
                raise UserError(f"{flag} {text} cannot be created: the name {name[:40]}... is longer than "
                                f"{limit} bytes; {hint}")
        fd, probe = tempfile.mkstemp(prefix=".isoconv-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise UserError(f"{flag} {text} cannot be created: a name in it is longer than the file system allows; "
                            f"{hint}") from None
        reason = ("read-only file system" if e.errno == errno.EROFS else "permission denied"
                  if e.errno in (errno.EACCES, errno.EPERM) else e.strerror or str(e))
        where = existing if existing != path else path
        raise UserError(f"{flag} {text} cannot be written: {where} is not writable ({reason}); {hint}") from None
    except ValueError as e:
        raise UserError(f"{flag} {text!r} is not a usable path ({e}); {hint}") from None
    return path


def is_run_folder(path: Union[str, Path]) -> bool:
    """Whether `path` holds an isoconv run (finished, unfinished, failed or killed before its first checkpoint)."""
    run = RunDir(path)
    if run.has_checkpoint() or run.lock_file.exists():
        return True
    config = run.read_config()
    return config is not None and _RUN_CONFIG_KEYS <= set(config)


def run_owning(path: Union[str, Path]) -> Optional["RunDir"]:
    """The run whose own file `path` is (config.yaml, last.pt, summary.json, epoch-003.pt, ...), else None."""
    path = Path(path).expanduser()
    name = path.name
    if name not in RUN_FILES and not (name.startswith("epoch-") and name.endswith(".pt")):
        return None
    folder = path.parent if str(path.parent) else Path(".")
    return RunDir(folder) if is_run_folder(folder) else None


def check_output_file(path: Union[str, Path], flag: str, *, overwrite: bool = False,
                      parents_created: bool = False) -> Path:
    """A file a command is about to write (--json PATH, export --output, ...): the one check every output goes
    through. Refused, in one line: a folder, a missing folder (unless the command creates it), an unwritable
    place, a file a run folder owns (always), and any other existing file unless `overwrite` (the user's
    --overwrite)."""
    text = str(path)
    if not text.strip():
        raise UserError(f"{flag} is empty; pass a file path")
    p = Path(text).expanduser()
    if p.is_dir():
        raise UserError(f"{flag} {text} is a folder; pass a file path")
    if not parents_created and not p.parent.is_dir():
        raise UserError(f"{flag} {text}: the folder {p.parent} does not exist; create it or pass another path")
    check_output_folder(p.parent, flag, "file's folder")
    owner = run_owning(p)
    if owner is not None:
        raise UserError(f"{flag} {text} is a file of the run in {owner}; isoconv never replaces a run's own files: "
                        f"pass a path outside the run's files (e.g. {owner / ('out' + (p.suffix or '.json'))})")
    if (p.exists() or p.is_symlink()) and not overwrite:
        raise UserError(f"{flag} {text} already exists; pass another path, or add --overwrite to replace it")
    return p


def check_run_folder(path: Union[str, Path], flag: str = "--out") -> None:
    """A training run goes into a new or empty folder, or one that holds an isoconv run: never into a folder of the
    user's own files (its config.yaml or summary.json would be replaced and the run mixed into it)."""
    path = Path(path).expanduser()
    if not path.is_dir() or is_run_folder(path):
        return
    try:
        entries = sorted(p.name for p in path.iterdir())
    except OSError:
        return  # check_output_folder reports an unreadable place
    if entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise UserError(f"{flag} {path} holds other files ({shown}) and no isoconv run; pass a new or empty "
                        f"folder")


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


class RunDir:
    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @classmethod
    def new(cls, model: str) -> "RunDir":
        return cls(RUNS_FOLDER / f"{time.strftime('%Y%m%d-%H%M%S')}-{model}")

    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoint = property(lambda self: self.path / CHECKPOINT_NAME)
    previous_checkpoint = property(lambda self: self.path / PREVIOUS_CHECKPOINT_NAME)
    summary = property(lambda self: self.path / "summary.json")
    report = property(lambda self: self.path / "report.txt")
    error = property(lambda self: self.path / "error.txt")
    tensorboard = property(lambda self: self.path / "tensorboard")
    tracking = property(lambda self: self.path / "tracking.json")

    lock_file = property(lambda self: self.path / ".lock")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run folder for this process: a second isoconv process given the same folder stops with a
        clear message instead of overwriting the first one's files. The lock dies with the process."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.lock_file, "a+") as f:
            if fcntl is not None:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    f.seek(0)
                    owner = f.read().strip()
                    raise UserError(f"run directory {self} is in use by another isoconv process"
                                    f"{f' (pid {owner})' if owner else ''}; wait for it to finish or pass another "
                                    f"--out") from None
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            try:
                yield
            finally:
                self.lock_file.unlink(missing_ok=True)
                if fcntl is not None:
                    fcntl.flock(f, fcntl.LOCK_UN)

    def kept_checkpoint(self, epoch: int) -> Path:
        """Where --keep-every keeps the checkpoint of the end of `epoch`."""
        return self.path / f"epoch-{epoch:03d}.pt"

    def has_checkpoint(self) -> bool:
        return self.checkpoint.is_file() or self.previous_checkpoint.is_file()

    # ------------------------------------------------------------------ writing

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write(self.config, yaml.safe_dump(config, sort_keys=False))

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        atomic_write(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))

    def append_metrics(self, row: dict[str, Any]) -> None:
        append_line(self.metrics, json.dumps(row))

    def write_summary(self, summary: dict[str, Any], report: str) -> None:
        atomic_write(self.report, report)
        atomic_write(self.summary, json.dumps(summary, indent=2))  # last: its presence means "finished"

    def keep_checkpoint(self, epoch: int) -> None:
        """Keep the current checkpoint as the one of `epoch` (a hard link where the file system has them)."""
        target = self.kept_checkpoint(epoch)
        target.unlink(missing_ok=True)
        try:
            os.link(self.checkpoint, target)
        except OSError:
            shutil.copyfile(self.checkpoint, target)

    def write_tracking(self, record: dict[str, Any]) -> None:
        atomic_write(self.tracking, json.dumps(record, indent=2))

    def write_error(self, message: str) -> None:
        atomic_write(self.error, message.rstrip("\n") + "\n")

    def remove_unfinished(self, created: bool) -> None:
        """A run that never wrote a checkpoint leaves nothing behind for later commands to misread."""
        if created:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for path in (self.config, self.metrics, self.lock_file):
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reading

    def read_config(self) -> Optional[dict[str, Any]]:
        try:
            data = yaml.safe_load(self.config.read_text())
        except (OSError, yaml.YAMLError):
            return None
        return data if isinstance(data, dict) else None

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every whole row (a row cut short by a crash mid-append is left out)."""
        try:
            lines = self.metrics.read_text().splitlines()
        except OSError:
            return []
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or not all(v is None or isinstance(v, (int, float)) for v in row.values()):
                log.warning(f"{self.metrics} line {number} is not a row of numbers; it is left out")
                continue
            rows.append(row)
        return rows

    def read_summary(self) -> Optional[dict[str, Any]]:
        """summary.json, or None when it is missing or unreadable (then the run counts as unfinished)."""
        try:
            data = json.loads(self.summary.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def summary_problem(self) -> Optional[str]:
        """Why an existing summary.json does not count (e.g. "is not valid JSON (cut short?)"), else None."""
        if not self.summary.is_file() or self.read_summary() is not None:
            return None
        try:
            json.loads(self.summary.read_text())
        except (OSError, UnicodeDecodeError) as e:
            return f"cannot be read ({getattr(e, 'strerror', None) or e})"
        except json.JSONDecodeError:
            return "is not valid JSON (cut short?)"
        return "is not a JSON object"

    def read_tracking(self) -> Optional[dict[str, Any]]:
        """tracking.json (the tracking URI and run id), or None."""
        try:
            data = json.loads(self.tracking.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def state(self) -> str:
        """done | failed | partial (resumable) | pending."""
        if self.read_summary() is not None:
            return "done"
        if self.error.is_file():
            return "failed"
        if self.checkpoint.is_file():
            return "partial"
        return "pending"
