"""A loopback TCP relay in front of the engine, for tests that must shape what passes between the gateway
and the engine. Runs its own event loop in a daemon thread; connects only to 127.0.0.1.

Subclasses override :meth:`LoopbackRelay.pipe` (one call per direction of each connection);
:class:`HoldingRelay` keeps a chat completion request back until the test lets it go.
"""

from __future__ import annotations

import asyncio
import threading

from tests.conftest import free_port


class LoopbackRelay:
    """Listens on a free loopback port and relays every connection to ``127.0.0.1:target_port``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        assert ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", self.port))
        ready.set()
        self._loop.run_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._relay(reader, up_writer, True), self._relay(up_reader, writer, False),
                             return_exceptions=True)

    async def _relay(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, to_engine: bool) -> None:
        try:
            await self.pipe(src, dst, to_engine)
        finally:
            dst.close()

    async def pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, to_engine: bool) -> None:
        """Copy ``src`` to ``dst`` until EOF (``to_engine``: the gateway → engine direction)."""
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()


class HoldingRelay(LoopbackRelay):
    """A relay in front of the engine that can keep a request back.

    While ``hold`` is set, a chat completion request from the gateway waits here until ``release`` is set
    (``held`` says one arrived): the gateway has admitted it and waits for the engine, which stays idle.
    Everything else is relayed as it comes. ``gateway_closed`` is set when the gateway ends a connection
    (after what it sent before was relayed).
    """

    def __init__(self, target_port: int) -> None:
        self.hold = threading.Event()
        self.release = threading.Event()
        self.held = threading.Event()  # a request is being kept back
        self.gateway_closed = threading.Event()
        super().__init__(target_port)

    async def pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, to_engine: bool) -> None:
        while data := await src.read(65536):
            if to_engine and self.hold.is_set() and b"POST /v1/chat/completions" in data:
                self.held.set()
                await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 300)
            dst.write(data)
            await dst.drain()
        if to_engine:
            self.gateway_closed.set()
