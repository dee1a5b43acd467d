"""A TCP proxy on loopback that delays every chunk it forwards, both ways: a slow Redis (or network)
without touching Redis. The delay can change while it runs (`proxy.delay_s = 0.2`).

    python -m reliability.latency_proxy --upstream-port 6379 --delay-ms 20 [--port 0] [--seconds 600]
                                        [--delay-file F]   (F holds the delay in ms; polled every 20 ms)

In a program: `with LatencyProxy(upstream_port, delay_s) as proxy: ... proxy.port ...` (an asyncio
loop in a daemon thread). Each direction of each connection is one ordered queue: a chunk is
forwarded `delay_s` after it arrived, so the delay adds to latency without reordering bytes or
throttling bandwidth. When the upstream is down the client's connection is closed at once."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from pathlib import Path

from devtools.harness import free_port

HOST = "127.0.0.1"
READ_SIZE = 65536
DELAY_FILE_POLL_S = 0.02


class LatencyProxy:
    def __init__(
        self,
        upstream_port: int,
        delay_s: float = 0.0,
        port: int | None = None,
        delay_file: Path | None = None,
    ) -> None:
        self.upstream_port = upstream_port
        self.delay_s = delay_s
        self.delay_file = delay_file
        self.port = port or free_port()
        self.connections = 0  # accepted so far
        self.refused = 0  # accepted, but the upstream could not be reached
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._poller: asyncio.Future | None = None

    # --- the proxy ---------------------------------------------------------------------------------

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def delayed_writer() -> None:
            while True:
                due, chunk = await queue.get()
                if chunk is None:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.ensure_future(delayed_writer())
        try:
            while chunk := await reader.read(READ_SIZE):
                await queue.put((time.monotonic() + self.delay_s, chunk))
        except (ConnectionError, OSError):
            pass
        finally:
            await queue.put((0.0, None))
            with contextlib.suppress(ConnectionError, OSError):
                await sender
            with contextlib.suppress(ConnectionError, OSError):
                writer.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(client_writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(HOST, self.upstream_port)
        except OSError:
            self.refused += 1
            client_writer.close()
            self._writers.discard(client_writer)
            return
        self._writers.add(upstream_writer)
        await asyncio.gather(
            self._pipe(client_reader, upstream_writer),
            self._pipe(upstream_reader, client_writer),
            return_exceptions=True,
        )
        self._writers.discard(client_writer)
        self._writers.discard(upstream_writer)

    async def _poll_delay_file(self) -> None:
        while True:
            with contextlib.suppress(OSError, ValueError):
                self.delay_s = float(self.delay_file.read_text()) / 1000
            await asyncio.sleep(DELAY_FILE_POLL_S)

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, HOST, self.port)
        if self.delay_file is not None:
            self._poller = asyncio.ensure_future(self._poll_delay_file())
        self._ready.set()
        async with self._server:
            await self._server.serve_forever()

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> LatencyProxy:
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            loop = self._loop
            asyncio.set_event_loop(loop)
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self._serve())
            # let the cancelled connection handlers finish before closing the loop
            loop.run_until_complete(asyncio.gather(*asyncio.all_tasks(loop), return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, name="latency-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the latency proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        def shutdown() -> None:
            # closing the sockets ends every connection handler by itself; closing the server ends
            # serve_forever
            for writer in list(self._writers):
                writer.close()
            self._server.close()
            if self._poller is not None:
                self._poller.cancel()

        self._loop.call_soon_threadsafe(shutdown)
        self._thread.join(timeout=10)
        self._loop = None

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream-port", type=int, required=True, help="port on 127.0.0.1 to forward to")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="added to each direction")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    parser.add_argument("--seconds", type=float, default=600.0, help="stop after this long")
    parser.add_argument("--delay-file", type=Path, default=None, help="file holding the delay in ms (polled)")
    args = parser.parse_args()
    proxy = LatencyProxy(args.upstream_port, args.delay_ms / 1000, args.port or None, args.delay_file)
    with proxy:
        print(
            f"127.0.0.1:{proxy.port} -> 127.0.0.1:{args.upstream_port}, +{args.delay_ms} ms each way",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(args.seconds)


if __name__ == "__main__":
    main()
