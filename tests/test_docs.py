"""Documentation lives in the repository: no file points outside it, relative links in the
Markdown files resolve, and every "docs/method.md section N" reference names a real section."""
from __future__ import annotations

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    names = out.stdout.split() if out.returncode == 0 else [
        os.path.relpath(os.path.join(r, f), ROOT) for r, _, fs in os.walk(ROOT) if ".git" not in r for f in fs]
    for name in names:
        if name.endswith((".py", ".md", ".cfg", ".toml", ".yaml", ".yml", ".txt")) or name in ("Makefile", ".ci/run"):
            path = os.path.join(ROOT, name)
            if os.path.isfile(path):
                yield name, open(path, encoding="utf-8", errors="replace").read()


#: the developers' folder beside the repository, which users never get (spelled in two parts so
#: that this file does not itself point there)
OUTSIDE = "../" + "shared"


def test_nothing_points_outside_the_repository():
    bad = [name for name, text in _tracked_text_files()
           if name != "tests/test_docs.py" and (OUTSIDE in text or re.search(r"\bMETHOD\.md", text))]
    assert bad == []


def test_markdown_links_resolve_and_method_sections_exist():
    sections = set(re.findall(r"^## (\d+)\.", open(os.path.join(ROOT, "docs", "method.md"), encoding="utf-8").read(), re.M))
    assert {"1", "2", "3", "4", "5", "6", "7"} <= sections
    for name, text in _tracked_text_files():
        if name.endswith(".md"):
            prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))  # links, not code
            for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
                if not re.match(r"[a-z]+://|mailto:", target):
                    assert os.path.exists(os.path.join(ROOT, os.path.dirname(name), target)), (name, target)
        for n in re.findall(r"docs/method\.md section (\d+)", text):
            assert n in sections, (name, n)
