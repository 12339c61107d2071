"""The HTTP side of the control server: probes, Prometheus metrics, the dashboard.

One aiohttp application on the server's event loop, so handlers read the plane's
state directly, with no locking and no copies between threads.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable

from aiohttp import web

from control.errors import KillswitchError


class WebServer:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        not_ready: Callable[[], str],
        routes: Iterable[web.RouteDef] = (),
    ) -> None:
        self._host, self._port = host, port
        # Why the server should get no traffic now ("" when it should).
        self._not_ready = not_ready
        app = web.Application()
        app.add_routes(
            [web.get("/healthz", self._healthz), web.get("/readyz", self._readyz), *routes]
        )
        self._runner = web.AppRunner(app, access_log=None)
        self._site: web.TCPSite | None = None

    async def start(self) -> None:
        """Bind now (so a busy port fails before the state is loaded); serve at once."""
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        try:
            await self._site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise KillswitchError(
                f"cannot listen on {self._host}:{self._port} for HTTP: {exc.strerror}"
            ) from None

    @property
    def port(self) -> int:
        """The bound port (differs from the asked one when that was 0)."""
        addresses = self._runner.addresses
        return int(addresses[0][1]) if addresses else self._port

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        why = self._not_ready()
        if not why:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {why}\n")
