"""What data a run actually used: is the CIFAR copy the official release, and which test images were evaluated.

`verify_data(dataset, root)` compares each file of a CIFAR-10/100 folder with the official release's per-file
md5 (the tables torchvision's CIFAR10/CIFAR100 check, copied below). Each md5 is computed once and cached in a
small JSON with the file's size and mtime (a changed file is hashed again): `$ISOCONV_CACHE` if set, else `.isoconv-cache/` in the
dataset folder, else (folder read-only) `~/.cache/isoconv/cache`. The result is a plain dict (the "verdict") that
training stores in summary.json as `data_provenance`; `data_statement` and `test_set_description` turn the
verdict and the test-split facts into the sentences reports print (no machine-specific paths).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ..fileio import file_digest
from .cache import DatasetCache, write_cache_file

# Per-file md5s of the official python releases: torchvision.datasets.CIFAR10/CIFAR100 train_list, test_list and
# meta (tests check that these equal torchvision's).
OFFICIAL_MD5: Dict[str, Dict[str, str]] = {
    "cifar10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
    "cifar100": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
}
# Known non-official copies, recognised by their files' md5s: the verdict then names what the copy is.
KNOWN_COPIES: Dict[str, List[Tuple[Dict[str, str], str]]] = {
    "cifar10": [({"data_batch_1": "a70c125600fe15cbbadb15783c0563be",
                  "data_batch_2": "725b6dbc466051682dc9da8a0774d643",
                  "data_batch_3": "43d963ae063ad0e94f68c64f5dbb0983",
                  "data_batch_4": "7669bce839e18291ca4ab177c01bbb72",
                  "data_batch_5": "3c3aedffdc5e4342fd1f3a77770ca70c",
                  "test_batch": "7e8c8f4345244ea9d1343e24af3279e9"},
                 "the JPEG-degraded CIFAR-10 copy (every image re-encoded as JPEG quality 75 with 4:2:0 chroma, about "
                 "30 dB PSNR against the originals; labels and order exact), measured to cost 2.0 +- 1.3 points of "
                 "top-1 against the original pixels in a short run (scripts/jpeg-penalty.py)")],
}
OFFICIAL_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
DISPLAY_NAME = {"cifar10": "CIFAR-10", "cifar10-lossless": "CIFAR-10 lossless subset (train 0-3999, test 0-999)",
                "cifar100": "CIFAR-100", "tiny-imagenet": "Tiny ImageNet", "folder": "the image folder"}
NO_CHECKSUMS = {
    "cifar10-lossless": "a subset of the official pixels recovered from another source (shared/data/README.md); no "
                        "official per-subset checksums",
    "tiny-imagenet": "the official tiny-imagenet-200.zip has an md5, but its extracted files have no official "
                     "checksums, so an extracted copy cannot be checked",
    "folder": "no official checksums for folder datasets",
}
CACHE_FORMAT = "isoconv-md5s-v1"
NOT_RECORDED = "data provenance not recorded (run made by an older isoconv)"


def verify_data(dataset: str, root: Union[str, Path]) -> Dict[str, Any]:
    """The provenance verdict of `dataset` under `root` (the folder holding cifar-10-batches-py etc.).

    CIFAR: {"dataset", "official": bool, "mismatch": [files whose md5 differs], "missing": [absent files],
    "checked": [files compared]}. Other datasets: {"dataset", "official": None, "reason"}.
    """
    if dataset not in OFFICIAL_MD5:
        return {"dataset": dataset, "official": None,
                "reason": NO_CHECKSUMS.get(dataset, "no official checksums for folder datasets")}
    folder = find_folder(dataset, Path(root).expanduser())
    expected = OFFICIAL_MD5[dataset]
    names = sorted(expected)
    present = [n for n in names if (folder / n).is_file()]
    actual = cached_md5s(folder, dataset, present)
    verdict = {"dataset": dataset,
               "official": len(present) == len(names) and all(actual[n] == expected[n] for n in names),
               "mismatch": [n for n in present if actual[n] != expected[n]],
               "missing": [n for n in names if n not in present],
               "checked": present}
    for md5s, description in KNOWN_COPIES.get(dataset, []):
        if all(actual.get(n) == md5 for n, md5 in md5s.items()):
            verdict["known_copy"] = description
    return verdict


def find_folder(dataset: str, root: Path) -> Path:
    """root/<official folder>, or root itself when the user pointed at the batches folder."""
    folder = root / OFFICIAL_FOLDER[dataset]
    if not folder.is_dir() and root.name == OFFICIAL_FOLDER[dataset]:
        return root
    return folder


def file_md5(path: Path) -> str:
    return file_digest(path, "md5")


def cached_md5s(folder: Path, dataset: str, names: List[str]) -> Dict[str, str]:
    """{name: md5} of folder/name: a file whose size and mtime match the cache is not read again."""
    stats = {}
    for n in names:
        st = (folder / n).stat()
        stats[n] = [st.st_size, st.st_mtime_ns]
    cache, stem = DatasetCache(folder, dataset), "md5s.json"
    known: Dict[str, str] = {}
    for path in cache.existing(stem):
        entries = read_cache(path)
        known = {n: e["md5"] for n, e in entries.items() if n in stats and [e.get("size"), e.get("mtime_ns")] ==
                 stats[n] and isinstance(e.get("md5"), str)}
        if known:
            break
    md5s = {n: known.get(n) or file_md5(folder / n) for n in names}
    if len(known) < len(names):
        doc = {"format": CACHE_FORMAT,
               "files": {n: {"size": stats[n][0], "mtime_ns": stats[n][1], "md5": md5s[n]} for n in names}}
        target = cache.writable_path(stem)
        if target is not None:
            write_cache_file(target, json.dumps(doc, indent=1, sort_keys=True).encode())
    return md5s


def read_cache(path: Path) -> Dict[str, Dict[str, Any]]:
    """The per-file entries of an md5 cache file; {} when it is missing, corrupt or of another format."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT or not isinstance(doc.get("files"), dict):
        return {}
    return {n: e for n, e in doc["files"].items() if isinstance(e, dict)}


# ----------------------------------------------------------------------------- sentences


def data_statement(verdict: Optional[Dict[str, Any]]) -> str:
    """The sentence a report prints about the data (None: the run did not record a verdict)."""
    if not verdict:
        return NOT_RECORDED
    dataset = str(verdict.get("dataset", "?"))
    name = DISPLAY_NAME.get(dataset, dataset)
    official = verdict.get("official")
    if official is None:
        return f"{name}: provenance not checked ({verdict.get('reason', 'no official checksums')})"
    if official:
        return f"official {name} (every file matches the official release's checksum)"
    return (f"this {name} copy differs from the official release ({difference(verdict)}): "
            f"accuracies may not compare with published figures")


def difference(verdict: Dict[str, Any]) -> str:
    mismatch, missing = list(verdict.get("mismatch") or []), list(verdict.get("missing") or [])
    parts = []
    if mismatch and not missing and len(mismatch) == len(verdict.get("checked") or []) > 1:
        parts.append("every file's checksum differs")
    elif mismatch:
        parts.append(f"{', '.join(mismatch)} checksum mismatch")
    if missing:
        parts.append(f"{', '.join(missing)} missing")
    return "; ".join(parts) or "checksums differ"


SPLIT_PHRASES = {"full": ("full test split", "the full test split"),
                 "half": ("the fixed half of the test split", "the fixed half"),
                 "xl-half": ("the XL study's half", "the XL study's half")}


def split_size(split: str, total: Optional[int]) -> Optional[int]:
    if total is None:
        return None
    return total if split == "full" else total // 2


def test_set_description(split: Optional[str], subset: Optional[int], total: Optional[int]) -> str:
    """What was evaluated, e.g. "full test split (10,000 images)" or "the first 1,000 images of the fixed half".

    split: "full", "half" (isoconv's fixed-seed half) or "xl-half"; subset: --test-subset (first N images of the
    split); total: the number of images in the whole test split.
    """
    split = split or "full"
    alone, within = SPLIT_PHRASES.get(split, (f"the {split} part of the test split", f"the {split} part"))
    size = split_size(split, total)
    if subset is not None and (size is None or subset < size):
        return f"the first {subset:,} images of {within}"
    if total is None:
        return alone
    if split == "full":
        return f"{alone} ({total:,} images)"
    return f"{alone} ({size:,} of {total:,})"


def comparable(verdict: Optional[Dict[str, Any]], split: Optional[str], subset: Optional[int],
               total: Optional[int], published_split: str) -> Tuple[bool, str]:
    """(True, "") when a run's number compares with a published figure measured on `published_split`, else
    (False, why not). Only the very split compares: `half` is isoconv's own fixed half, not the XL study's
    (`xl-half`, its seed-1204 random_split), so a `half` number does not compare with an `xl-half` figure."""
    reasons = []
    if not verdict:
        reasons.append("data provenance not recorded")
    elif verdict.get("official") is None:
        reasons.append("data provenance unknown")
    elif not verdict.get("official"):
        reasons.append("data differs from the official release")
    split = split or "full"
    same_split = split == published_split
    size = split_size(split, total)
    if not same_split:
        reasons.append(f"evaluated on {test_set_description(split, None, None)}, published on "
                       f"{test_set_description(published_split, None, None)}")
    elif subset is not None and (size is None or subset < size):
        reasons.append(f"evaluated on only {test_set_description(split, subset, total)}")
    return (not reasons, "; ".join(reasons))
