"""The app factory: `create_app(settings, clip=None, generation=None)`.

Nothing is loaded at import time; the lifespan loads the model and index (unless injected, as
tests do), starts the batchers and, with `watch_seconds`, follows the index root's CURRENT;
it caps malloc's arenas and hands freed heap back after bursts (`retrieval.heap`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from api import errors
from api.deps import check_key, route_policy
from api.limits import AdmissionMiddleware, BodyLimits, InFlightLimitMiddleware
from api.metrics import Metrics, RequestMetricsMiddleware
from api.routes_admin import router as admin_router
from api.routes_compat import router as compat_router
from api.routes_items import router as items_router
from api.routes_ops import router as ops_router
from api.routes_search import router as search_router
from api.settings import Settings
from api.state import ServiceState
from retrieval.errors import ClipdexError
from retrieval.heap import cap_arenas, release_freed_memory, resident_bytes
from retrieval.models.clip import ClipModel
from retrieval.search.searcher import GenerationLike

STATIC_DIR = Path(__file__).parent / "static"
log = logging.getLogger("api")


def create_app(settings: Settings, clip: ClipModel | None = None,
               generation: GenerationLike | None = None) -> FastAPI:
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServiceState(settings, metrics)
        app.state.service = state
        tasks = await _start(state, clip, generation)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await state.stop()

    # FastAPIOffline serves the /docs and /redoc assets itself: the default FastAPI pages
    # load them from a CDN, which a machine without a network cannot reach.
    app = FastAPIOffline(title="clipdex", version="0.1.0", lifespan=lifespan,
                  description="Contrastive image-text search over a clipdex index generation.")
    app.state.settings = settings
    errors.install(app)
    routers = (search_router, items_router, compat_router, ops_router, admin_router)
    for router in routers:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    if not settings.read_keys:
        _searching_needs_no_key(app)

    @app.get("/", include_in_schema=False)
    async def index_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    # The last added runs first: metrics see every answer, refusals on admission included;
    # admission (keys, body caps and timeouts) runs before a request counts as in flight.
    if settings.max_in_flight is not None:
        app.add_middleware(InFlightLimitMiddleware, max_in_flight=settings.max_in_flight,
                           retry_after_s=settings.retry_after_s)
    bodies = BodyLimits(settings.max_body_bytes, settings.body_idle_s, settings.body_deadline_s,
                        settings.max_buffered_bytes)
    # The routers' own APIRoutes (FastAPI nests included routers in private wrappers): each
    # carries its path, its key dependency and its body cap.
    app.add_middleware(AdmissionMiddleware, limits=bodies,
                       routes=[r for router in routers for r in router.routes],
                       policy_of=route_policy,
                       check=lambda need, headers: check_key(settings, need, headers))
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app


def _searching_needs_no_key(app: FastAPI) -> None:
    """Without read keys only the admin routes take a key: say so in the OpenAPI schema (the
    read routes declare their schemes for services that have keys)."""
    build = app.openapi

    def openapi() -> dict:
        schema = build()
        for path, operations in schema.get("paths", {}).items():
            if not path.startswith("/admin"):
                for operation in operations.values():
                    operation.pop("security", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _start(state: ServiceState, clip: ClipModel | None,
                 generation: GenerationLike | None) -> list[asyncio.Task]:
    """Load what the service serves, then start the lifespan's own tasks: following
    CURRENT, and keeping the heap."""
    settings = state.settings
    cap_arenas(settings.malloc_arenas)  # before the request threads allocate
    await state.start(clip, generation)
    # What start-up made (the model, half a million objects with the default one) lives as
    # long as the process: out of the collector's generations, a full collection no longer
    # walks it (269 ms each time, during which every request waited).
    gc.collect()
    gc.freeze()
    tasks = [asyncio.create_task(_watch(state))] if settings.watch_seconds > 0 else []
    if settings.heap_trim_s > 0:
        tasks.append(asyncio.create_task(_keep_heap(settings.heap_trim_s)))
    return tasks


HEAP_SLACK_BYTES = 32 * 2**20  # growth since the last trim that is worth a trim


async def _keep_heap(period_s: float) -> None:
    """Every `period_s`, hand freed heap back to the system when resident memory has grown
    since the last look (`retrieval.heap`): after a burst of uploads or large bodies the
    service returns near its idle size instead of keeping the burst's peak for good."""
    floor = resident_bytes()
    while True:
        await asyncio.sleep(period_s)
        now = resident_bytes()
        if now > floor + HEAP_SLACK_BYTES:
            await asyncio.to_thread(release_freed_memory)
            now = resident_bytes()
        floor = now if now > floor + HEAP_SLACK_BYTES else min(floor, now)


async def _watch(state: ServiceState) -> None:
    """Reload when the index root's CURRENT pointer names a generation not being served.
    A generation that failed to load is not retried (nor logged) on every poll: generations
    are immutable, so only a new name can change the outcome."""
    refused: str | None = None
    while True:
        await asyncio.sleep(state.settings.watch_seconds)
        on_disk = state.current_name_on_disk()
        served = state.slot.current.generation.name if state.slot else None
        if on_disk is None or on_disk in (served, refused):
            continue
        try:
            await state.reload()
        except ClipdexError as error:
            refused = on_disk
            log.error("could not switch to generation %s (keeps serving %s): %s", on_disk,
                      served, error)
