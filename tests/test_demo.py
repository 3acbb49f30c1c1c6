"""``kangaroo demo`` driven in a real headless browser: Debian's Chromium through Playwright.

``.ci/run`` installs the browser (``apt-get install chromium``); Playwright's own browser download
is not used. A machine without the browser skips this file, and says so in pytest's summary."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
SCREENSHOT = os.environ.get("KANGAROO_DEMO_SCREENSHOT")
"""Where the page's screenshot goes besides the test's own folder (docs/demo.png is made so)."""


@pytest.fixture(scope="module")
def demo(trained_model, tmp_path_factory):
    from ports import free_port, wait_until_up

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "kangaroo.cli", "demo", "--model", str(trained_model.folder),
                                "--port", str(port), "--temperature", "0", "--max-upload-mb", "5"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/_stcore/health", process)
        yield url
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)


QUESTION = ("What colour is the screen?\nA. red\nB. green\nC. blue\nD. yellow\n"
            "Answer with the option's letter from the given choices directly.")


def test_upload_ask_two_rounds_and_reset_in_a_real_browser(demo, trained_model, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from trained import COLOURS

    clip = trained_model.clips["green"]
    expected = "ABCD"[list(COLOURS).index("green")]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(90_000)
            page.goto(demo)
            page.locator("input[type=file]").set_input_files(str(clip))
            expect(page.locator("video")).to_have_count(1)
            chat = page.get_by_test_id("stChatInputTextArea")

            def ask(text: str) -> None:
                chat.fill(text)
                chat.press("Enter")

            ask(QUESTION)
            assistant = page.get_by_test_id("stChatMessage").filter(has=page.get_by_test_id("stChatMessageAvatarAssistant"))
            expect(assistant).to_have_count(1)
            expect(assistant.first).to_contain_text(expected)
            assert assistant.first.inner_text().strip().endswith(expected)
            ask("这是什么颜色？ " + QUESTION)
            expect(assistant).to_have_count(2)
            expect(assistant.nth(1)).to_contain_text(expected)  # the second round's answer, streamed in full
            expect(page.get_by_test_id("stChatMessage")).to_have_count(4)
            page.get_by_role("button", name="Regenerate").click()  # the last answer again: greedy, the same
            expect(page.get_by_test_id("stChatMessage")).to_have_count(4)
            expect(assistant.nth(1)).to_contain_text(expected)
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            assert (tmp_path / "demo.png").stat().st_size > 10_000
            if SCREENSHOT:
                shutil.copy(tmp_path / "demo.png", SCREENSHOT)
            page.get_by_role("button", name="Reset").click()
            expect(page.get_by_test_id("stChatMessage")).to_have_count(0)
            expect(page.locator("video")).to_have_count(1)  # the video stays; the conversation is cleared
            big = tmp_path / "big.mp4"
            big.write_bytes(os.urandom(6 * 2**20))
            page.locator("input[type=file]").set_input_files(str(big))
            expect(page.get_by_text("File must be 5.0MB or smaller.")).to_be_visible()
        finally:
            browser.close()
