"""The documentation's relative links point at files that exist, and the README stays a front door.

Checked: README.md, benchmarks/README.md, docs/*.md and mlla_kernels/NOTES.md. Every markdown link
or image, `[text](path)` / `![alt](path)`, outside code (fenced blocks and inline `code` are left
out: `kernel[grid](...)` is Triton, not a link) whose target is not a URL (http, https, mailto) or
a pure `#anchor` must name a file or folder of the repository, relative to the markdown file
(the `#fragment` is dropped; anchors themselves are not checked).
"""
import glob
import os
import re

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
README_MAX_LINES = 220

FENCED_BLOCK = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) or ![alt](target); target in <angle brackets>, or up to the first space (a title
# may follow) or ")".
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(?:<([^>]*)>|([^)\s]*))(?:\s+[^)]*)?\)")
EXTERNAL = re.compile(r"^(?:https?:|mailto:)", re.I)


def doc_files():
    names = ["README.md", os.path.join("benchmarks", "README.md"), os.path.join("mlla_kernels", "NOTES.md")]
    names += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return names


def relative_links(text):
    """The link targets of a markdown text that should name a file: no URLs, no pure anchors,
    nothing inside code."""
    text = INLINE_CODE.sub("", FENCED_BLOCK.sub("", text))
    targets = []
    for match in LINK.finditer(text):
        target = match.group(1) if match.group(1) is not None else match.group(2)
        if not target or target.startswith("#") or EXTERNAL.match(target):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def broken_links(name):
    path = os.path.join(ROOT, name)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    base = os.path.dirname(path)
    return [t for t in relative_links(text) if not os.path.exists(os.path.normpath(os.path.join(base, t)))]


@pytest.mark.parametrize("name", doc_files())
def test_relative_links_resolve(name):
    assert os.path.isfile(os.path.join(ROOT, name)), f"{name} is missing"
    broken = broken_links(name)
    assert not broken, f"{name} links to paths that do not exist: {broken}"


def test_link_extraction_skips_code_urls_and_anchors():
    text = ("[a](x.md) ![b](img/p.png \"title\") [c](https://e.org/y) [d](#top) [e](dir/#frag) "
            "[f](mailto:a@b.c) `k[grid](args)`\n```\n[g](in_fence.md)\n```\n[h](<with space.md>)")
    assert relative_links(text) == ["x.md", "img/p.png", "dir/", "with space.md"]


def test_readme_is_short():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, at most {README_MAX_LINES}: history and run-by-run notes belong in "
        f"benchmarks/README.md or mlla_kernels/NOTES.md")
