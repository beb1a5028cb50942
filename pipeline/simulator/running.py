"""How the simulator runs: ``SimulatorThread`` (its own event loop in a daemon thread, for
tests, benchmarks and the demo) and ``run_simulator`` (in the foreground, for ``pipeline
simulate``)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable

from .app import Simulator
from .config import DEFAULT_CONFIG, SimulatorConfig


class SimulatorThread:
    """Runs a :class:`Simulator` on its own event loop in a daemon thread (for sync tests).

    Attributes:
        simulator: the server; read ``.requests`` / ``.stats``, call ``.reset()``, swap ``.config``.
        host, port: where it listens; ``port`` is the bound port once started.
    """

    def __init__(
        self, config: SimulatorConfig = DEFAULT_CONFIG, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.simulator = Simulator(config)
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> SimulatorThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start serving; returns once the port is bound (raises if binding failed)."""
        if self._thread is not None:
            raise RuntimeError("SimulatorThread is already running")
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                try:
                    self.port = loop.run_until_complete(self.simulator.start(self.host, self.port))
                except BaseException as exc:
                    failure.append(exc)
                    return
                finally:
                    ready.set()
                loop.run_forever()
                loop.run_until_complete(self.simulator.stop())
            finally:
                loop.close()

        self._thread = threading.Thread(target=serve, name="simulator", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]

    def stop(self) -> None:
        """Stop serving and join the thread; safe to call twice."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None


def run_simulator(
    config: SimulatorConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    ready_message: bool = True,
) -> None:
    """Serve until SIGINT or SIGTERM (blocking), for ``pipeline simulate``.

    Prints ``simulator listening on http://HOST:PORT/v1`` once the port is bound.
    Uses uvloop when it is installed.
    """

    async def serve() -> None:
        simulator = Simulator(config)
        bound = await simulator.start(host, port)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Not available off the main thread or on Windows; Ctrl-C then still raises.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, stopping.set)
        if ready_message:
            print(f"simulator listening on http://{host}:{bound}/v1", flush=True)
        try:
            await stopping.wait()
        finally:
            await simulator.stop()

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=loop_factory) as runner,
    ):
        runner.run(serve())
