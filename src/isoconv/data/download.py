"""Download an official dataset archive, check its md5 and extract it atomically (urllib only).

Everything is written under temporary names inside the data root and renamed into place at the
end, so an interrupted or failed download leaves nothing half-written behind. Archive members
with absolute paths, `..`, links or special files are refused before anything is extracted.
"""
from __future__ import annotations

import hashlib
import logging
import http.client
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import List, Optional

from ..errors import UserError
from ..fileio import folders_to_create, remove_empty_folders

_DOWNLOAD_TIMEOUT_S = 60
_CHUNK = 1 << 20

log = logging.getLogger(__name__)


def _fmt_reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None)
    if reason is not None and not isinstance(e, urllib.error.HTTPError):
        return str(reason)
    return str(e) or type(e).__name__


def _is_unsafe_name(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return (
        not name
        or name.startswith(("/", "\\"))
        or p.is_absolute()
        or ".." in p.parts
        or (bool(p.parts) and ":" in p.parts[0])  # Windows drive letters
    )


def _refuse(archive_desc: str, name: str, why: str) -> UserError:
    return UserError(f"{archive_desc}: refusing to extract member {name!r} ({why}); "
                     f"the archive may be malicious or corrupt")


def safe_tar_members(tar: tarfile.TarFile, archive_desc: str) -> List[tarfile.TarInfo]:
    members = []
    for m in tar.getmembers():
        if _is_unsafe_name(m.name):
            raise _refuse(archive_desc, m.name, "absolute path or '..'")
        if not (m.isfile() or m.isdir()):
            raise _refuse(archive_desc, m.name, "links and special files are not allowed")
        members.append(m)
    return members


def safe_zip_members(zf: zipfile.ZipFile, archive_desc: str) -> List[zipfile.ZipInfo]:
    members = []
    for info in zf.infolist():
        if _is_unsafe_name(info.filename):
            raise _refuse(archive_desc, info.filename, "absolute path or '..'")
        mode = info.external_attr >> 16
        if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise _refuse(archive_desc, info.filename, "links and special files are not allowed")
        members.append(info)
    return members


def _extract(archive: Path, dest: Path, desc: str) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in safe_zip_members(zf, desc):
                zf.extract(info, dest)
        return
    with tarfile.open(archive, "r:*") as tar:
        members = safe_tar_members(tar, desc)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - old Pythons without extraction filters
            tar.extractall(dest, members=members)


def _fetch(url: str, out, what: str, hint: str) -> str:
    """Stream `url` into the open file `out`; returns the md5 hex digest. Prints progress every 10%."""
    h = hashlib.md5()
    try:
        with out, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            done, next_report = 0, 0.1
            while True:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                h.update(chunk)
                out.write(chunk)
                done += len(chunk)
                if total and done / total >= next_report and done < total:
                    log.info(f"{what}: {done / 2**20:.0f} of {total / 2**20:.0f} MiB")
                    next_report += 0.1
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise UserError(f"could not download {what} from {url} ({_fmt_reason(e)}); {hint}") from None
    return h.hexdigest()


def download_and_extract(url: str, md5: str, root: Path, folder: str, *, what: str) -> Path:
    """Download `url` (a .tar.gz or .zip), check its md5, extract it and move its `folder` to root/folder.

    `what` names the dataset in messages ("CIFAR-10"). Returns root/folder.
    """
    root = Path(root)
    target = root / folder
    hint = f"put {folder} under a folder and pass --data-dir DIR or set ISOCONV_DATA"
    created = folders_to_create(root)  # removed again if the download fails
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create data folder {root} ({e.strerror or e}); pass --data-dir DIR "
                        f"pointing to a writable folder, or set ISOCONV_DATA") from None
    archive_name = url.rstrip("/").rsplit("/", 1)[-1] or folder
    try:
        fd, tmp_name = tempfile.mkstemp(dir=root, prefix=f".{archive_name}.", suffix=".part")
    except OSError as e:
        remove_empty_folders(created)
        raise UserError(f"cannot write to data folder {root} ({e.strerror or e}); pass --data-dir DIR "
                        f"pointing to a writable folder, or set ISOCONV_DATA") from None
    out = os.fdopen(fd, "wb")
    archive = Path(tmp_name)
    extract_dir: Optional[Path] = None
    done = False
    try:
        log.info(f"downloading {what} from {url} to {root} ...")
        got = _fetch(url, out, what, hint)
        if got != md5:
            raise UserError(f"downloaded {what} archive from {url} has md5 {got}, expected {md5} "
                            f"(incomplete or altered download); retry, or {hint}")

        extract_dir = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder}-extract."))
        desc = f"{what} archive from {url}"
        try:
            _extract(archive, extract_dir, desc)
        except UserError:
            raise
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise UserError(f"{desc}: cannot extract ({e}); retry, or {hint}") from None
        extracted = extract_dir / folder
        if not extracted.is_dir():
            raise UserError(f"{desc}: archive has no {folder}/ folder; retry, or {hint}")
        try:
            os.replace(extracted, target)
        except OSError:
            if not target.is_dir():  # lost a race with a concurrent download: theirs is fine
                raise
        done = True
        return target
    finally:
        out.close()
        archive.unlink(missing_ok=True)
        if extract_dir is not None:
            shutil.rmtree(extract_dir, ignore_errors=True)
        if not done:
            remove_empty_folders(created)


def folder_or_download(folder: Path, download: bool, dataset: str, fetch) -> Path:
    """`folder` if it exists; else `fetch()` (which downloads and returns it), unless downloads are off."""
    if folder.is_dir():
        return folder
    if not download:
        raise UserError(f"{dataset} not found at {folder}; pass --data-dir DIR (the folder holding {folder.name}), "
                        f"set ISOCONV_DATA, or drop --no-download")
    return fetch()
