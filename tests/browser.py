"""Headless Chromium driven through its DevTools protocol (a websocket on loopback, with aiohttp): open a page, run
JavaScript in it as a person's clicks would, inject axe-core, take a screenshot. No browser-automation library."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.harness import ROOT

START_TIMEOUT_S = 30
CALL_TIMEOUT_S = 30
INSTALL_TIMEOUT_S = 1800
WINDOW = (1280, 1600)
# Impacts that fail the test (axe's scale: minor, moderate, serious, critical).
AXE_FAILING_IMPACTS = ("serious", "critical")


def ensure_tool(script: str) -> str:
    """Path printed by `deploy/<script> ensure` (installs Chromium from Debian, fetches axe-core from npm, once)."""
    done = subprocess.run(["bash", str(ROOT / "deploy" / script), "ensure"], capture_output=True, text=True,
                          timeout=INSTALL_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


class JsError(AssertionError):
    pass


class Page:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session_id: str):
        self._ws, self._session = ws, session_id
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            reply = json.loads(msg.data)
            future = self._waiting.pop(reply.get("id"), None)
            if future is not None and not future.done():
                future.set_result(reply)

    async def call(self, method: str, session: bool = True, **params: Any) -> dict:
        call_id = next(self._ids)
        future = self._waiting[call_id] = asyncio.get_running_loop().create_future()
        message = {"id": call_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        await self._ws.send_str(json.dumps(message))
        reply = await asyncio.wait_for(future, CALL_TIMEOUT_S)
        assert "error" not in reply, (method, reply["error"])
        return reply["result"]

    async def js(self, expression: str) -> Any:
        """The value of `expression` in the page (a promise is awaited); a thrown error fails the test."""
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise JsError(result["exceptionDetails"].get("exception", {}).get("description") or result)
        return result["result"].get("value")

    async def until(self, expression: str, timeout_s: float = 10.0) -> Any:
        """Poll `expression` until it is truthy; its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = await self.js(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"still false after {timeout_s}s: {expression}"
            await asyncio.sleep(0.05)

    async def open(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.until(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    async def axe_violations(self, axe_source: str) -> list[dict]:
        """axe-core's violations of the page as loaded (every rule axe runs by default)."""
        await self.js(axe_source + ";true")
        return await self.js("axe.run(document).then(r => r.violations.map(v => ({id: v.id, impact: v.impact, "
                             "help: v.help, nodes: v.nodes.slice(0, 5).map(n => n.target.join(' '))})))")

    async def screenshot(self, path: Path, scale: float = 1.0) -> None:
        params: dict[str, Any] = {"format": "png"}
        if scale != 1.0:
            params["clip"] = {"x": 0, "y": 0, "width": WINDOW[0], "height": WINDOW[1], "scale": scale}
        shot = await self.call("Page.captureScreenshot", **params)
        path.write_bytes(base64.b64decode(shot["data"]))


@contextlib.asynccontextmanager
async def chromium(session: aiohttp.ClientSession) -> AsyncIterator[Page]:
    """A fresh headless Chromium (its own profile, DevTools on a loopback port of its choosing) and one page."""
    binary = ensure_tool("chromium.sh")
    profile = tempfile.mkdtemp(prefix="cvl-chromium-")
    proc = await asyncio.create_subprocess_exec(
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
        "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    ws = None
    try:
        seen = []

        async def listening() -> str:
            while line := (await proc.stderr.readline()).decode(errors="replace"):
                seen.append(line)
                if m := re.search(r"DevTools listening on (ws://\S+)", line):
                    return m[1]
            raise AssertionError("chromium exited: " + "".join(seen[-20:]))
        url = await asyncio.wait_for(listening(), START_TIMEOUT_S)
        # Keep draining its log so that a full pipe never blocks it.
        drain = asyncio.create_task(_drain(proc.stderr))
        ws = await session.ws_connect(url, max_msg_size=0)
        page = Page(ws, "")
        target = await page.call("Target.createTarget", session=False, url="about:blank")
        attached = await page.call("Target.attachToTarget", session=False, targetId=target["targetId"], flatten=True)
        page._session = attached["sessionId"]
        await page.call("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1],
                        deviceScaleFactor=1, mobile=False)
        yield page
        drain.cancel()
    finally:
        if ws is not None:
            await ws.close()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass
