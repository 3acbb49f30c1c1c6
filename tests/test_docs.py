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
