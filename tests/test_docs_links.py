"""README.md and docs/ (English and Chinese): every relative link and image points at a file that exists, every
Python block compiles, and each guide links its translation. Quick: no command runs here (test_docs.py runs them)."""

from __future__ import annotations

import re

from conftest import REPO

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files():
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_relative_links_resolve():
    broken = []
    for page in markdown_files():
        text = page.read_text(encoding="utf-8")
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+://|^mailto:|^#", target):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert broken == []


def test_each_guide_links_its_translation():
    """docs/X.md names zh/X.md and docs/zh/X.md names ../X.md, so a reader can switch language."""
    missing = []
    for zh in sorted((REPO / "docs" / "zh").glob("*.md")):
        en = REPO / "docs" / zh.name
        if not en.exists():
            continue
        if f"(zh/{zh.name})" not in en.read_text(encoding="utf-8"):
            missing.append(str(en.relative_to(REPO)))
        if f"(../{zh.name})" not in zh.read_text(encoding="utf-8"):
            missing.append(str(zh.relative_to(REPO)))
    assert missing == []


def test_python_blocks_compile():
    """The ```python blocks of the guides are valid Python (the shell commands are run by test_docs.py)."""
    bad = []
    for page in markdown_files():
        for i, block in enumerate(re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S)):
            try:
                compile(block, f"{page.name}[{i}]", "exec")
            except SyntaxError as e:
                bad.append(f"{page.relative_to(REPO)}: block {i}: {e}")
    assert bad == []
