"""The playground: one page served by the service itself (plain HTML, CSS and JavaScript shipped in
this package: no build step, no CDN, so it works offline) that runs one request at several
compression levels side by side and shows, per level, the answer, latency, FLOPs saved, tokens per
layer and the token map. It calls the public /v1 API like any client, with the API key the
server asks for (docs/playground.md)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
PATH = "/playground"


def install(app: FastAPI) -> None:
    """GET /playground (the page), its files under /playground/static/, and GET / pointing there."""
    app.mount(f"{PATH}/static", StaticFiles(directory=STATIC), name="playground-static")
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def root():
        return RedirectResponse(PATH)

    @router.get(PATH)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.include_router(router)
