"""The documentation holds together: README.md is the front door (two set-up commands first, a
short section per task pointing into docs/), and every relative link in the project's pages
reaches a file, and a heading where it names one."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

README = ROOT / "README.md"
PAGES = [README, ROOT / "ARCHITECTURE.md", ROOT / "BENCHMARKS.md", ROOT / "RESULTS.md",
         *sorted((ROOT / "docs").glob("*.md"))]
#: README's sections for what a user does: each opens with its command and points into docs/.
TASKS = ("Train on my images", "Train on my text", "At scale", "Sweep", "Evaluate and export")
MAX_README_LINES = 300

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked out."""
    lines, fence = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            lines.append(re.sub(r"`[^`]*`", "``", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, punctuation other than
    hyphens and underscores removed, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (a repeated one gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    fence = False
    for line in page.read_text().split("\n"):
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(page: Path) -> tuple[int, list[str]]:
    """(how many relative links the page has, those that reach no file or no heading)."""
    bad, count = [], 0
    for line in prose(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            count += 1
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page.name}: {target}"
            if not file.exists():
                bad.append(f"{where} (no such file)")
            elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
                bad.append(f"{where} (no such heading)")
    return count, bad


def test_every_relative_link_reaches_its_file_and_heading():
    total, bad = 0, []
    for page in PAGES:
        count, broken = broken_links(page)
        total += count
        bad += broken
    assert not bad, "\n".join(bad)
    assert total >= 30  # the pages do link to each other: the check is not vacuous


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## The settings, that matter (2-core CPU)\n\n"
                                       "```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#the-settings-that-matter-2-core-cpu) [ok](#a-heading) [web](https://x.org/y)\n"
                    "# A heading\n"
                    "[gone](missing.md) [no](other.md#not-a-heading) `[in code](missing.md)`\n"
                    "```\n[in a block](missing.md)\n```\n")
    count, bad = broken_links(page)
    assert count == 4
    assert bad == ["page.md: missing.md (no such file)", "page.md: other.md#not-a-heading (no such heading)"]


def test_slugs_follow_githubs_rules():
    assert slug("Proving it on a GPU: the kit") == "proving-it-on-a-gpu-the-kit"
    assert slug("Sweeps: `moco-sweep`") == "sweeps-moco-sweep"
    assert slug("Text: the budget's vocabulary (2-core CPU, 2026-12-05)") == "text-the-budgets-vocabulary-2-core-cpu-2026-12-05"
    assert slug("Queue-size sweeps and W&B dashboards") == "queue-size-sweeps-and-wb-dashboards"


def test_the_readme_starts_with_the_two_set_up_commands_and_stays_short():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    first = re.search(r"```(\w*)\n(.*?)```", text, re.S)
    assert first.group(1) == "bash"
    install, tests = first.group(2).strip("\n").split("\n")  # exactly two commands
    # A fresh machine: a venv, the package, then the main job on its embedded default data.
    assert install.startswith("python3 -m venv .venv && ") and install.endswith(" && moco-train")
    assert "pip install -e '.[dev]'" in install
    assert tests == "python -m pytest -q"
    # CI runs the README's test command, after the same torch pair.
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == tests
    (pins,) = re.findall(r"pip install (torch==\S+ torchvision==\S+)", install)
    assert any(pins in line for line in ci)


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (.*)\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_each_task_in_the_readme_opens_with_its_command_and_points_into_docs():
    readme = sections(README.read_text())
    for task in TASKS:
        (body,) = [body for title, body in readme.items() if title.startswith(task)]
        assert body.lstrip("\n").startswith("```bash\n"), task
        assert "](docs/" in body, task


def test_every_docs_page_is_linked_from_the_readme():
    linked = set(re.findall(r"\]\(docs/([^)#]+)", README.read_text()))
    assert linked >= {page.name for page in (ROOT / "docs").glob("*.md")}


def test_the_method_example_in_docs_is_the_tested_user_method_word_for_word():
    """docs/extending.md's "A method" block is tests/user_method.py (which test_methods.py trains)."""
    import re

    page = (ROOT / "docs" / "extending.md").read_text()
    section = page[page.index("## A method"):]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    source = (ROOT / "tests" / "user_method.py").read_text()
    assert code == source[source.index("import torch.nn.functional"):]
