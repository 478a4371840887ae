"""The README's Python example runs as written, the README stays short, and its links resolve."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = "<!-- readme-example -->"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    assert MARKER in text, f"README.md has no {MARKER} line"
    after = text.split(MARKER, 1)[1]
    match = re.match(r"\s*```python\n(.*?)\n```", after, re.DOTALL)
    assert match, f"no ```python block right after {MARKER}"
    return match.group(1)


@pytest.mark.slow
def test_readme_example_runs_as_written(default_model_dir):
    # A fresh interpreter: the example must need nothing but its own imports.
    code = f"exec(compile({readme_example()!r}, 'README.md example', 'exec'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip(), "the example printed nothing"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 260, f"README.md has {len(lines)} lines"


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a Markdown page's headings (code blocks skipped, repeats numbered)."""
    anchors, seen, in_code = set(), {}, False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"#+ (.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_readme_and_docs_relative_links_and_anchors_exist():
    for page in [README, ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name} links to {target}, which does not exist"
            if anchor and dest.suffix == ".md":
                assert anchor in heading_anchors(dest), f"{page.name} links to {target}: no such heading"
