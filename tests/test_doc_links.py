"""Every relative link in README.md and docs/*.md points at a file or folder in the repository."""
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) and ![alt](target), target up to a space or ')'; reference-style [x]: target too
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)", re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def tracked() -> set[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    files = set(out.splitlines())
    return files | {str(Path(f).parent.as_posix()) for f in files}


def relative_links(doc: Path) -> list[str]:
    text = FENCE.sub("", doc.read_text())  # code blocks are not links
    text = re.sub(r"`[^`\n]*`", "", text)  # nor inline code
    links = [a or b for a, b in LINK.findall(text)]
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:|^#|^//", link, re.I)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve_to_files_in_the_repo(doc):
    in_git = tracked()
    broken = []
    for link in relative_links(doc):
        target = (doc.parent / unquote(link.split("#")[0])).resolve()
        try:
            rel = target.relative_to(ROOT).as_posix()
        except ValueError:
            broken.append(f"{link} (outside the repository)")
            continue
        if not target.exists() or (in_git and rel not in in_git and rel != "."):
            broken.append(f"{link} (no {rel} in the repository)")
    assert not broken, f"{doc.name}: " + "; ".join(broken)


def test_the_link_finder_sees_links():
    assert relative_links(ROOT / "README.md")  # README links docs/results.md
