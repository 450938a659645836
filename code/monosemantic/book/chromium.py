"""Headless Chromium, driven through its DevTools protocol over ``--remote-debugging-pipe`` (the standard
library only): the one place that knows its command line. The book uses it for the pictures of the feature
browsers in the PDF (:func:`monosemantic.browser.figure`); the tests drive the real pages with it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

# headless, no sandbox (containers), and nothing that reaches the network or the user's profile
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync")


# Run before a picture of an element (first %s: its selector) is cut at a height (second %s): hides what that
# cut would go through (a table row, an image, a form control or a line of text: the line's element), so each
# column of the picture ends at its last whole row, and gives the height down to the bottom of the last thing
# left whole, plus a margin. (Moving the cut up to a gap instead climbs far: rows side by side in two columns
# rarely end at the same height.)
WHOLE_ROWS = """(() => {
  const root = document.querySelector(%s), top = root.getBoundingClientRect().top, cut = %s;
  const boxes = [...root.querySelectorAll('tr, img, svg, canvas, input, select, button')]
    .map(el => [el, el.getBoundingClientRect()]);
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (!node.textContent.trim()) continue;
    const range = document.createRange();
    range.selectNodeContents(node);
    const owner = node.parentElement.closest('tr') || node.parentElement;
    for (const r of range.getClientRects()) boxes.push([owner, r]);  // one per line
  }
  const cross = boxes.filter(([, r]) => r.height > 0 && r.top - top < cut && r.bottom - top > cut);
  for (const [el] of cross) el.style.visibility = 'hidden';
  let end = 0;
  for (const [el, r] of boxes) {
    if (r.height > 0 && r.bottom - top <= cut && getComputedStyle(el).visibility !== 'hidden')
      end = Math.max(end, r.bottom - top);
  }
  return Math.min(cut, end + 6);
})()"""


class ChromiumError(RuntimeError):
    """Chromium is missing, did not answer, or the page did not do what was asked."""


def executable() -> str | None:
    """The Chromium on this machine (Debian's ``chromium``), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def command(*args: str) -> list[str]:
    """The command line of a one-shot headless run (``--dump-dom``, ``--screenshot``) with ``args``."""
    return [executable() or "chromium", *FLAGS, *args]


class Chromium:
    """A headless Chromium and one page of it, driven with DevTools protocol commands over a pipe."""

    def __init__(self, width: int = 1400, height: int = 1000):
        to_chrome_r, self._to_chrome = os.pipe()  # Chromium reads commands on its fd 3 ...
        self._from_chrome, from_chrome_w = os.pipe()  # ... and writes answers and events on its fd 4

        def fds() -> None:
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        exe = executable()
        if exe is None:
            raise ChromiumError("Chromium is not installed (Debian: apt install chromium)")
        self.proc = subprocess.Popen(
            [exe, *FLAGS, "--remote-debugging-pipe", f"--window-size={width},{height}", "--hide-scrollbars",
             "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._id = 0
        self._answers: dict[int, dict] = {}
        self.events: list[dict] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime"):
            self.send(f"{domain}.enable", session=True)

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_chrome, 1 << 16):
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                with self._cond:
                    if "id" in message:
                        self._answers[message["id"]] = message
                    else:
                        self.events.append(message)
                    self._cond.notify_all()

    def send(self, method: str, session: bool = False, timeout: float = 60, **params: Any) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: self._id in self._answers, timeout):
                raise ChromiumError(f"Chromium did not answer {method} in {timeout:.0f} s")
            answer = self._answers.pop(self._id)
        if "error" in answer:
            raise ChromiumError(f"{method}: {answer['error']}")
        return answer["result"]

    def js(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise ChromiumError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 60) -> Any:
        """Until ``expression`` is truthy in the page (the page loads shards asynchronously)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if value := self.js(expression):
                return value
            time.sleep(0.1)
        raise ChromiumError(f"never true in the page: {expression}")

    def open(self, url: str) -> None:
        self.send("Page.navigate", session=True, url=url)
        self.wait("document.readyState === 'complete' && !!document.querySelector('#mono-view')")

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the first element matching ``selector``, scrolled to first as
        a reader scrolls to what they click."""
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                      "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                      "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", session=True, type=kind, x=box[0], y=box[1], button="left",
                      clickCount=1)

    def type(self, selector: str, text: str) -> None:
        self.click(selector)
        self.js(f"document.querySelector({json.dumps(selector)}).select()")  # typing replaces what was there
        self.send("Input.insertText", session=True, text=text)
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", session=True, type=kind, key="Enter", code="Enter",
                      windowsVirtualKeyCode=13, nativeVirtualKeyCode=13)

    def unit_in_view(self) -> dict:
        """Where the open unit's heading is in the window (its top in CSS pixels from the window's top)."""
        return self.js("(() => { const h = document.querySelector('#mono-view h3');"
                       "return {title: h ? h.textContent : '', top: h ? h.getBoundingClientRect().top : null,"
                       "height: innerHeight}; })()")

    def screenshot(self, selector: str, out: Path, *, max_height: float = 10_000, scale: float = 1.0) -> Path:
        """A PNG of the page region of the first element matching ``selector`` (its top ``max_height`` CSS
        pixels: what a cut there would go through, a table row, an image or a line of text, is hidden, and the
        picture ends below the last thing left whole), at ``scale`` device pixels per CSS pixel."""
        import base64

        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                      ".getBoundingClientRect(); return [r.x + scrollX, r.y + scrollY, r.width, r.height]; })()")
        height = box[3] if box[3] <= max_height else self.js(WHOLE_ROWS % (json.dumps(selector), max_height))
        clip = {"x": box[0], "y": box[1], "width": box[2], "height": height, "scale": scale}
        data = self.send("Page.captureScreenshot", session=True, format="png", clip=clip,
                         captureBeyondViewport=True)["data"]
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))
        return out

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self._to_chrome)
