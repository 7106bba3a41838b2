"""The README is a short front door, and every repository file that it or docs/ names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "cluster" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = {p.name for p in ROOT.iterdir() if not p.name.startswith(".") or p.name == ".ci"} - {"runs", "data"}


def named_paths(text: str) -> set[str]:
    """Backticked tokens and relative link targets whose first part is a file or folder of the repository."""
    tokens = set(re.findall(r"`([^`\s]+)`", text)) | set(re.findall(r"\]\(([^)\s#]+)", text))
    out = set()
    for token in tokens:
        token = token.split("#")[0].split(":")[0].rstrip(".,")
        if token and token.split("/")[0] in TOP and "<" not in token and "{" not in token:
            out.add(token)
    return out


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    assert max(len(line) for line in lines) <= 200


def test_every_file_the_docs_name_exists():
    missing = []
    for doc in DOCS:
        base = doc.parent
        for token in named_paths(doc.read_text()):
            here = list(ROOT.glob(token)) or list(base.glob(token))
            if not here:
                missing.append(f"{doc.relative_to(ROOT)}: {token}")
    assert not missing, missing
    assert named_paths("see `orchestrator/no_such_file.py`") == {"orchestrator/no_such_file.py"}  # the check bites
