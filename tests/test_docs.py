"""The documentation holds together: README.md and docs/*.md.

- every relative link (and image) resolves: the file exists, and a #anchor names a heading there;
- every `docs/...` path that the documentation or the code mentions exists;
- no `file.py:NN` line references (they go stale; name the function instead);
- the README stays a front door (at most MAX_README_LINES lines);
- a table of contents lists exactly the page's `##` headings, in order, with their own text.

The checkers are plain functions of (text, path) so that the tests at the bottom can feed them
broken pages and see each one fail.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_README_LINES = 320
CODE_DIRS = ("manual", "reference", "conformance", "tools", "tests")

LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
TOC_ENTRY = re.compile(r"^\s*[-*]\s+\[(.+)\]\(#([^)]+)\)\s*$")
DOCS_PATH = re.compile(r"(?<![\w./-])docs/[\w./-]*\w")
LINE_REF = re.compile(r"\b[\w/.-]+\.py:\d+\b")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_files() -> list[Path]:
    return [p for d in CODE_DIRS for p in sorted((ROOT / d).rglob("*.py"))
            if p.resolve() != Path(__file__).resolve()]


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fence = None
    for n, line in enumerate(text.splitlines(), start=1):
        m = re.match(r"^\s*(```+|~~~+)", line)
        if m:
            if fence is None:
                fence = m.group(1)[:3]
            elif m.group(1).startswith(fence):
                fence = None
            continue
        if fence is None:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)     # a link in a heading keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(text: str) -> list[tuple[int, str]]:
    """(level, text) of every heading outside code blocks."""
    out = []
    for _, line in prose_lines(text):
        m = HEADING.match(line)
        if m:
            out.append((len(m.group(1)), m.group(2)))
    return out


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, h in headings(text):
        s = slug(h)
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return out


def broken_links(text: str, path: Path) -> list[str]:
    """Every relative link of the page whose file or #anchor does not exist."""
    problems = []
    for n, line in prose_lines(text):
        for m in LINK.finditer(line):
            target = m.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):            # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.name}:{n}: link {target!r}"
            if not dest.exists():
                problems.append(f"{where}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            elif anchor:
                if dest.suffix != ".md":
                    problems.append(f"{where}: an #anchor into a file that is not Markdown")
                elif anchor not in anchors(dest.read_text(encoding="utf-8")):
                    problems.append(f"{where}: no heading with anchor #{anchor} in {dest.name}")
    return problems


def missing_docs_paths(text: str, where: str) -> list[str]:
    """Every `docs/...` path the text mentions that does not exist in the repository."""
    return [f"{where}: mentions {m.group(0)}, which does not exist"
            for m in DOCS_PATH.finditer(text) if not (ROOT / m.group(0)).exists()]


def line_references(text: str, where: str) -> list[str]:
    return [f"{where}: line reference {m.group(0)!r} (it goes stale: name the function instead)"
            for m in LINE_REF.finditer(text)]


def toc_problems(text: str, path: Path) -> list[str]:
    """A page's table of contents (the first list of `- [text](#anchor)` lines) lists its `##`
    headings, all of them, in order, each with the heading's own text and anchor."""
    lines = list(prose_lines(text))
    entries = []
    for _, line in lines:
        m = TOC_ENTRY.match(line)
        if m:
            entries.append((m.group(1), m.group(2)))
        elif entries and line.strip():
            break
    if not entries:
        return [f"{path.name}: no table of contents"]
    sections = [h for level, h in headings(text) if level == 2 and h != "Contents"]
    problems = []
    if [t for t, _ in entries] != sections:
        problems.append(f"{path.name}: table of contents {[t for t, _ in entries]} != headings {sections}")
    for title, anchor in entries:
        if slug(title) != anchor:
            problems.append(f"{path.name}: table of contents entry {title!r} links #{anchor}, "
                            f"its heading's anchor is #{slug(title)}")
    return problems


def needs_toc(text: str, path: Path) -> bool:
    return path.name == "README.md" or len([1 for level, _ in headings(text) if level == 2]) >= 4


# -- the repository's documentation -------------------------------------------------------------

@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    assert not broken_links(page.read_text(encoding="utf-8"), page)


def test_every_docs_path_exists():
    problems = []
    for p in pages() + code_files():
        problems += missing_docs_paths(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


def test_no_line_number_references():
    problems = []
    for p in pages() + [p for p in code_files() if "tests" not in p.relative_to(ROOT).parts]:
        problems += line_references(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


def test_readme_is_a_front_door():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail into docs/ (limit {MAX_README_LINES})"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_table_of_contents_matches_headings(page):
    text = page.read_text(encoding="utf-8")
    if not needs_toc(text, page):
        pytest.skip(f"{page.name} has fewer than 4 sections and needs no table of contents")
    assert not toc_problems(text, page)


def test_reading_order_names_functions_that_exist():
    """The README's reading order links files and names functions (never line numbers): every
    name in backticks there is defined (def / class, or Class.method) in one of the linked files."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Reading order for learners", 1)[1].split("\n## ", 1)[0]
    files = [ROOT / m.group(2) for m in LINK.finditer(section) if m.group(2).endswith(".py")]
    assert len(files) >= 6, files
    source = "\n".join(f.read_text(encoding="utf-8") for f in files)
    defined = set(re.findall(r"^\s*(?:def|class)\s+(\w+)", source, flags=re.M))
    from tools import faults
    defined |= {f.name for f in faults.FAULTS}                 # the bug zoo's faults, named in the text
    names = [n for n in re.findall(r"`([A-Za-z_]\w*(?:\.\w+)?)`", section)
             if ("_" in n or n[0].isupper() or "." in n) and not n.startswith("torch.")]
    unknown = [n for n in names if not all(part in defined for part in n.split("."))]
    assert names and not unknown, f"the reading order names {unknown}, defined in none of {[f.name for f in files]}"


def test_no_design_md_pointer():
    """The team's DESIGN.md is not in the repository: nothing may send a user there."""
    bad = [str(p.relative_to(ROOT)) for p in pages() + code_files() if "DESIGN.md" in p.read_text(encoding="utf-8")]
    assert not bad, f"these point at DESIGN.md, which the repository does not hold (use docs/design.md): {bad}"


# -- the checkers fail on broken pages ------------------------------------------------------------

PAGE = """# Title

- [First part](#first-part)
- [Second: `--flag`](#second---flag)

## First part

See [the second](#second---flag), [design](docs_page.md#a-heading) and ![plot](img.png).

```
## not a heading (inside a code block)
[not a link](nowhere.md)
```

## Second: `--flag`
"""


@pytest.fixture
def site(tmp_path):
    (tmp_path / "docs_page.md").write_text("# Page\n\n## A heading\n")
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    return page


def test_checker_accepts_a_good_page(site):
    assert broken_links(PAGE, site) == []
    assert toc_problems(PAGE, site) == []


@pytest.mark.parametrize("bad, words", [
    ("[x](missing.md)", "no file"),
    ("[x](docs_page.md#no-such-heading)", "no heading with anchor #no-such-heading"),
    ("[x](#second-flag)", "no heading with anchor #second-flag"),
    ("![x](img/missing.png)", "no file"),
    ("[x](img.png#anchor)", "not Markdown"),
])
def test_checker_finds_a_bad_link(site, bad, words):
    text = PAGE + f"\nAnd {bad}.\n"
    problems = broken_links(text, site)
    assert len(problems) == 1 and words in problems[0], problems


def test_checker_finds_a_table_of_contents_that_drifted(site):
    renamed = PAGE.replace("## First part", "## First part, renamed")
    assert any("!= headings" in p for p in toc_problems(renamed, site))
    wrong_anchor = PAGE.replace("(#first-part)", "(#first)")
    assert any("links #first" in p for p in toc_problems(wrong_anchor, site))
    extra = PAGE + "\n## Third\n"
    assert any("Third" in p for p in toc_problems(extra, site))
    assert toc_problems("# T\n\n## A\n", site) == ["page.md: no table of contents"]


def test_checker_finds_missing_docs_paths_and_line_references():
    text = "see docs/design.md and docs/no_such_page.md, or manual/layers/linear.py:19 and attention.py:100"
    assert missing_docs_paths(text, "x") == ["x: mentions docs/no_such_page.md, which does not exist"]
    refs = line_references(text, "x")
    assert [r.split("'")[1] for r in refs] == ["manual/layers/linear.py:19", "attention.py:100"]
    assert line_references("manual/layers/linear.py: linear_forward", "x") == []


def test_slug_matches_github():
    assert slug("Your own implementation: `--against`") == "your-own-implementation---against"
    assert slug("1. Inject a bug") == "1-inject-a-bug"
    assert slug("Scaling with T (and B), standard against flash attention") == \
        "scaling-with-t-and-b-standard-against-flash-attention"
    assert anchors("## A\n\n## A\n") == {"a", "a-1"}
