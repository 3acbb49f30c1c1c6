"""The front door and the docs: README short with the commands `.ci/run` reads, its links
resolving, and the docs site building in strict mode (a broken link or anchor fails)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=config.parent)


@pytest.mark.timeout(600)
def test_the_docs_site_builds_strictly_and_a_broken_link_fails_it(tmp_path):
    done = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    nav = (ROOT / "mkdocs.yml").read_text()
    assert all(page in nav for page in pages), "every page is in the site's navigation"
    for page in pages:
        assert (tmp_path / "site" / ("" if page == "index.md" else page[:-3]) / "index.html").exists(), page

    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    with open(copy / "docs" / "training.md", "a", encoding="utf-8") as page:
        page.write("\nSee [the schedules](recipes.md#no-such-section).\n")
    broken = build(copy / "mkdocs.yml", tmp_path / "broken-site")
    assert broken.returncode != 0 and "no-such-section" in broken.stdout + broken.stderr


def test_the_readme_is_a_front_door_whose_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 200
    for marker in ("install-command", "main-command", "test-command"):  # what .ci/run reads
        assert f"<!-- {marker} -->\n```bash\n" in readme, marker
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert len(local) >= 8, local
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing


NOT_PARSED = {  # commands the docs show that this test does not parse, each with the reason
    "kangaroo serve --config serve.yaml":
        "reads the serve.yaml the command before it writes; tests/test_serve.py starts its server that way",
    "kangaroo data stats DIR --stage\n  STAGE --devices N": "N stands for a number (the same command is parsed "
                                                            "with --devices 8 in the README)",
}


NOT_RUN = {  # commands the docs show that no test runs through the command line, each with the reason
    "data synth": "renders the full tiny world and pre-trains its LLM and ViT (minutes); the tests build the "
                  "world through the same `kangaroo.world.synthesize` at a small size (conftest's small_world)",
}


def documented_commands() -> dict[str, str]:
    """Every ``kangaroo ...`` command in the README and docs/ (code blocks and inline code), with
    the page showing it first; synopsis lines (``[--flag VALUE]``, ``...``) are not commands."""
    found: dict[str, str] = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        lines = [line.strip() for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
                 for line in block.replace("\\\n", " ").splitlines()]
        lines += re.findall(r"`(kangaroo [^`]+)`", text)
        for line in lines:
            line = re.split(r"\s>\s", line.split(" #")[0])[0].strip()  # `... > file`: the command
            synopsis = "..." in line or "[" in line.replace("'[", "").replace('"[', "")
            if line.startswith("kangaroo ") and not synopsis:
                found.setdefault(line, path.name)
    return found


def test_every_command_the_docs_show_parses_with_the_flags_it_names(capsys):
    """Each documented command line is read by the `kangaroo` parser (its subcommands exist, its
    flags exist and its values have their types): `--print_config` appended, it must print the
    settings and exit 0. Parsing is what is checked here; the commands themselves run in the
    tests of their features."""
    import shlex

    from kangaroo.cli import main

    commands = documented_commands()
    assert len(commands) >= 40, sorted(commands)
    for reason in NOT_PARSED:
        assert reason in commands, f"NOT_PARSED lists {reason!r}, which no page shows any more"
    refused = []
    for command, page in commands.items():
        if command in NOT_PARSED:
            continue
        try:
            code = main([*shlex.split(command)[1:], "--print_config"])
        except SystemExit as done:
            code = done.code
        printed = capsys.readouterr()
        if code not in (0, None) or not printed.out.strip():
            refused.append(f"{page}: {command}: {printed.err.strip().splitlines()[-1:]}")
    assert not refused, "\n".join(refused)


def test_every_command_the_docs_show_is_run_by_a_test_or_listed_with_its_reason():
    """Each documented command (its subcommand: `data prepare`, `serve`, ...) is run by some test
    through the command line (`python -m kangaroo.cli ...`, `main([...])` or a test's own
    `kangaroo(...)` helper), other than this file's parse and test_cli's help checks, or NOT_RUN
    says why not."""
    import shlex

    from kangaroo.cli import _components

    sources = {path.name: path.read_text(encoding="utf-8") for path in (ROOT / "tests").glob("*.py")
               if path.name not in ("test_docs.py", "test_cli.py")}
    shown = set()
    for command in documented_commands():
        words = shlex.split(command)[1:]
        _, _, depth = _components(words)
        shown.add(" ".join(words[:max(depth, 1)]))
    assert set(NOT_RUN) <= shown, f"NOT_RUN lists {sorted(set(NOT_RUN) - shown)}, which no page shows any more"
    unrun = []
    for subcommand in sorted(shown - set(NOT_RUN)):
        quoted = r"[\"']" + r"[\"'],\s*[\"']".join(map(re.escape, subcommand.split())) + r"[\"']"
        runs = re.compile(r"(kangaroo\.cli[\"'],\s*|main\(\[|kangaroo\()" + quoted)
        if not any(runs.search(text) for text in sources.values()):
            unrun.append(subcommand)
    assert not unrun, f"documented but run by no test (run one, or list it in NOT_RUN with the reason): {unrun}"
