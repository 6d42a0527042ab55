"""A headless Chromium driven over the DevTools protocol: open a page, wait for text, click, screenshot.

The App is a React page: what the tests check is what a person sees once it has rendered (text in the
DOM, a screenshot), so they run a real browser. The protocol goes over a websocket (tornado's client:
tornado comes with flower, one of our dependencies); one page, one connection, calls in order.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import httpx

CHROMIUM = "/usr/bin/chromium"


class Browser:
    def __init__(self, profile: Path, window=(1400, 900)):
        from tornado.ioloop import IOLoop

        profile.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={window[0]},{window[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        pages = []
        while not pages and time.monotonic() < deadline:
            try:
                pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
                         if t.get("type") == "page"]
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.loop = IOLoop()
        self._id = 0
        self._ws = self.loop.run_sync(lambda: self._connect(pages[0]["webSocketDebuggerUrl"]))
        self.call("Page.enable")
        self.call("Runtime.enable")

    @staticmethod
    async def _connect(url):
        from tornado.websocket import websocket_connect

        return await websocket_connect(url, max_message_size=256 * 1024 * 1024)

    def call(self, method: str, timeout: float = 60, **params):
        """One protocol command; its result (events in between are dropped)."""
        self._id += 1
        mine = self._id
        self.loop.run_sync(lambda: self._ws.write_message(json.dumps({"id": mine, "method": method, "params": params})))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{method}: no answer in {timeout} s")
            raw = self.loop.run_sync(self._ws.read_message, timeout=left)
            if raw is None:
                raise RuntimeError("chromium closed the DevTools connection")
            message = json.loads(raw)
            if message.get("id") == mine:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout: float = 90) -> str:
        """The page's visible text once it holds every one of ``needles``."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if all(n in text for n in needles):
                return text
            time.sleep(0.5)
        raise AssertionError(f"the page never showed {needles} in {timeout:.0f} s; it shows:\n{text[-3000:]}")

    def click_text(self, label: str, tag: str = "button") -> bool:
        """Click the first ``tag`` element whose visible text contains ``label``."""
        script = (f"(() => {{ const el = [...document.querySelectorAll({json.dumps(tag)})]"
                  f".find(e => (e.innerText || '').includes({json.dumps(label)}));"
                  " if (!el) return false; el.click(); return true; })()")
        return bool(self.evaluate(script))

    def click_enabled(self, label: str, timeout: float = 60, tag: str = "button") -> None:
        """Click the first enabled ``tag`` whose visible text is ``label`` once there is one (a form's
        button stays disabled while the App resolves the form)."""
        script = (f"(() => {{ const el = [...document.querySelectorAll({json.dumps(tag)})]"
                  f".find(e => (e.innerText || '').trim() === {json.dumps(label)} && !e.disabled"
                  " && !e.classList.contains('Mui-disabled'));"
                  " if (!el) return false; el.click(); return true; })()")
        deadline = time.monotonic() + timeout
        while not self.evaluate(script):
            if time.monotonic() > deadline:
                raise AssertionError(f"no enabled {tag} {label!r} in {timeout:.0f} s; the page shows:\n"
                                     f"{self.text()[-2000:]}")
            time.sleep(0.5)

    def press(self, key: str, code: str, key_code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=key_code,
                      text=key if kind == "keyDown" and len(key) == 1 else "")

    def type_text(self, text: str) -> None:
        self.call("Input.insertText", text=text)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        import os
        import signal

        try:
            if getattr(self, "_ws", None) is not None:
                self._ws.close()
        finally:
            if self.process.poll() is None:
                try:
                    os.killpg(self.process.pid, signal.SIGTERM)
                    self.process.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(self.process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            if getattr(self, "loop", None) is not None:
                self.loop.close(all_fds=True)
