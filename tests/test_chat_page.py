"""The chat page at /, in headless Chromium: it sends a question and shows the streamed answer."""

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import pytest
from test_server import free_port, start

from glm4.pipeline import Glm4Pipeline

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """A headless Chromium tab driven over the DevTools protocol (one websocket, JSON messages)."""

    def __init__(self, url: str) -> None:
        import websocket

        self.profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        port = free_port()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={self.profile.name}", f"--remote-debugging-port={port}"]  # fmt: skip
        self.browser = subprocess.Popen(
            [CHROMIUM, *flags, url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as r:
                    tabs = [t for t in json.load(r) if t["type"] == "page"]
                if tabs:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not start")
            time.sleep(0.2)
        self.ws = websocket.create_connection(tabs[0]["webSocketDebuggerUrl"], timeout=30)
        self.calls = 0

    def evaluate(self, expression: str):
        self.calls += 1
        self.ws.send(json.dumps({"id": self.calls, "method": "Runtime.evaluate",
                                 "params": {"expression": expression, "returnByValue": True}}))  # fmt: skip
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.calls:
                return message["result"]["result"].get("value")

    def close(self) -> None:
        self.ws.close()
        self.browser.kill()
        self.browser.wait()
        self.profile.cleanup()


# CI (.ci/run) installs Debian's chromium, and there a missing browser is a failure, not a skip.
@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="needs Debian's chromium")
def test_chat_page_streams_an_answer():
    srv, engine = start(Glm4Pipeline.from_pretrained(device="cpu"))
    page = None
    try:
        question = urllib.parse.quote("What is the capital of France?")
        page = Page(f"{srv.url}/?q={question}")
        deadline = time.monotonic() + 30
        while page.evaluate("document.querySelector('#reply-1')?.dataset.done") != "true":
            assert time.monotonic() < deadline, page.evaluate("document.body.innerText")
            time.sleep(0.2)
        assert (
            page.evaluate("document.querySelector('#reply-1').innerText") == "The capital of France is Paris."
        )
        assert page.evaluate("document.querySelectorAll('.error').length") == 0
    finally:
        if page is not None:
            page.close()
        srv.stop()
        engine.shutdown()
