"""The real gateway for the SDK's tests: the ``switchboard`` binary (SWITCHBOARD_BIN, or
the workspace's debug build) on loopback, with a config the SDK's behaviour needs (resume,
the room envelope, presence, an acked queue), on a temporary data dir."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = os.environ.get("SWITCHBOARD_BIN", str(Path(__file__).resolve().parents[3] / "target" / "debug" / "switchboard"))

#: The routes both SDKs' tests share.
ROUTES = (Path(__file__).resolve().parents[2] / "test-routes.toml").read_text()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Gateway:
    def __init__(self, rooms: str = "", extra: str = "", resume_window_secs: int = 30):
        self.dir = tempfile.mkdtemp(prefix="sb-sdk-py-")
        self.ws_port, self.api_port = _free_port(), _free_port()
        self.config = Path(self.dir) / "switchboard.toml"
        self.config.write_text(f"""
[server]
listen = "127.0.0.1:{self.ws_port}"
shards = 2
data_dir = "{self.dir}/data"
[management]
listen = "127.0.0.1:{self.api_port}"
[api]
stage = "dev"
resume = true
resume_window_secs = {resume_window_secs}
[rooms]
history_size = 50
envelope = true
presence_events = true
{rooms}
[limits]
connects_per_sec_per_ip = 0
max_connections_per_ip = 0
resumes_per_sec_per_ip = 0
resumes_per_sec_per_connection = 0
{ROUTES}
{extra}
""")
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/dev"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/dev"

    def start(self) -> None:
        env = {**os.environ, "RUST_LOG": "warn"}
        self.process = subprocess.Popen([BIN, "serve", "--config", str(self.config)], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the gateway did not come up")

    def restart(self) -> None:
        """Kills it (no goodbye to clients) and starts it again on the same ports and data."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
        shutil.rmtree(self.dir, ignore_errors=True)

    def request(self, method: str, path: str, body: bytes | str | None = None) -> tuple[int, bytes]:
        data = body.encode() if isinstance(body, str) else body
        request = urllib.request.Request(f"{self.api}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def get_json(self, path: str):
        status, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return json.loads(body)


async def eventually(what: str, condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        await asyncio.sleep(0.02)


async def in_thread(function, *args):
    """A blocking management call, off the event loop (the SDK keeps reading meanwhile)."""
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


class Proxy:
    """A TCP proxy in front of the gateway, on its own thread's event loop: ``cut()``
    destroys every connection through it (the client sees its socket die, no close frame),
    and while ``blocked`` it refuses new ones, so a test decides how long a client stays away."""

    def __init__(self, target_port: int):
        import threading

        self.blocked = False
        self._target = target_port
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        started.wait(5)

    def _run(self, started) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        started.set()
        self._loop.run_forever()

    def url(self, stage: str = "dev") -> str:
        return f"ws://127.0.0.1:{self.port}/{stage}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    def cut(self) -> None:
        def abort_all() -> None:
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        self._loop.call_soon_threadsafe(abort_all)

    def stop(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
