"""A small client for a running ComfyUI server (tests only): start/stop, HTTP JSON and a websocket-followed run.

Uses aiohttp, which every ComfyUI install has (it is a ComfyUI requirement); imported lazily so this module
imports anywhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PREVIEW_EVENT_TYPES = {1, 4}  # BinaryEventTypes.PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunResult:
    """What one queued prompt produced: websocket events, binary previews and its history entry."""

    prompt_id: str
    events: list[dict[str, Any]]
    previews: int
    history: dict[str, Any]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events if e.get("type") == kind]

    @property
    def status(self) -> str:
        return self.history.get("status", {}).get("status_str", "unknown")

    @property
    def outputs(self) -> dict[str, Any]:
        return self.history.get("outputs", {})

    def cached_nodes(self) -> set[str]:
        return {n for d in self.of_type("execution_cached") for n in d.get("nodes", [])}

    def executed_nodes(self) -> set[str]:
        return {d["node"] for d in self.of_type("executing") if d.get("node") is not None}

    def progress(self, node_id: str) -> list[tuple[int, int]]:
        return [(d["value"], d["max"]) for d in self.of_type("progress") if str(d.get("node")) == node_id]

    def error(self) -> str:
        errors = self.of_type("execution_error")
        if errors:
            e = errors[0]
            return f"{e.get('node_type')}: {e.get('exception_type')}: {e.get('exception_message')}\n" + "".join(
                e.get("traceback", []))
        return json.dumps(self.history.get("status", {}), indent=1)


@dataclass
class ComfyServer:
    """A ComfyUI process we started (``main.py`` of ``comfy_path`` with ``args``), logging to ``log_path``."""

    comfy_path: Path
    args: list[str]
    log_path: Path
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0) -> None:
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), *self.args]
        logger.info("starting %s", " ".join(cmd))
        log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the process's lifetime
        self.process = subprocess.Popen(cmd, cwd=self.comfy_path, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **self.env})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read() or b"null")

    def post(self, path: str, data: dict[str, Any]) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            body = r.read()
            return json.loads(body) if body else None

    def run(self, prompt: dict[str, Any], timeout: float = 900.0, interrupt_on_progress_of: str | None = None
            ) -> RunResult:
        """Queue ``prompt``, follow its websocket events until it ends, and return them with its history.

        ``interrupt_on_progress_of``: a node id; the first progress event of that node triggers POST /interrupt.
        """
        return asyncio.run(self._run(prompt, timeout, interrupt_on_progress_of))

    async def _run(self, prompt: dict[str, Any], timeout: float, interrupt_node: str | None) -> RunResult:
        import aiohttp

        client_id = uuid.uuid4().hex
        events: list[dict[str, Any]] = []
        previews = 0
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={client_id}", max_msg_size=0) as ws:
                async with session.post(f"{self.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                    body = await r.json()
                    if r.status != 200:
                        raise AssertionError(f"prompt rejected ({r.status}): {json.dumps(body, indent=1)}")
                prompt_id = body["prompt_id"]
                interrupted = False
                deadline = time.monotonic() + timeout
                while True:
                    msg = await ws.receive(timeout=max(1.0, deadline - time.monotonic()))
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        if struct.unpack(">I", msg.data[:4])[0] in PREVIEW_EVENT_TYPES:
                            previews += 1
                        continue
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        raise ConnectionError(f"websocket closed: {msg.type}")
                    event = json.loads(msg.data)
                    data = event.get("data") or {}
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    events.append(event)
                    kind = event.get("type")
                    if (kind == "progress" and interrupt_node is not None and not interrupted
                            and str(data.get("node")) == interrupt_node):
                        interrupted = True
                        async with session.post(f"{self.url}/interrupt", json={}) as ir:
                            ir.raise_for_status()
                    if kind in ("execution_success", "execution_error", "execution_interrupted"):
                        break
                    if kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                        break
            history: dict[str, Any] = {}
            for _ in range(200):  # the history entry is written just after the last event
                async with session.get(f"{self.url}/history/{prompt_id}") as r:
                    history = (await r.json()).get(prompt_id, {})
                if history.get("status", {}).get("completed") is not None and "outputs" in history:
                    break
                await asyncio.sleep(0.05)
        return RunResult(prompt_id, events, previews, history)
