"""The web page: ``GET /`` is the single HTML page, ``/web/…`` its scripts and styles (services/gateway/web/).

Same origin as the API, so the page needs no CORS and sends the API key it was given as a bearer header; every asset
is a file of this package (no CDN, no build step at run time). The HTML is always revalidated, so a new gateway's
page reaches the browser at once; the assets carry ETags.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
