"""The web console (web/, built by Vite into web/dist): `/` serves its page,
`/assets/…` its content-hashed files. The page is never cached (a new build
takes effect at once); the hashed files are cached for a year, since a changed
file gets a new name. The console's answers carry a Content-Security-Policy
that allows nothing but this origin: no CDN, no inline script, no other host.

When the console is not built, `/` says how to build it."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from marie_gateway.http.errors import ApiError

#: Only this origin, for everything; no framing, no plugins, no foreign form targets.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
PAGE_CACHE = "no-cache"
ASSET_CACHE = "public, max-age=31536000, immutable"

#: Where `make web` builds the console in a checkout: <repo>/web/dist.
DEFAULT_DIST = Path(__file__).resolve().parents[5] / "web" / "dist"

NOT_BUILT = """\
The Marie console is not built yet.

Build it (needs Node.js and npm) from the repository root:

    make web

or by hand:  cd web && npm ci && npm run build

`make run` builds it when it is missing or out of date. The API is served
regardless: /v1/..., /api/..., and its documentation at /docs.
Serving a build from elsewhere: MARIE_GATEWAY_CONSOLE_DIR=/path/to/dist
"""


def dist_dir(configured: str) -> Path:
    return Path(configured).expanduser() if configured else DEFAULT_DIST


def routes(configured_dir: str) -> list[BaseRoute]:
    dist = dist_dir(configured_dir)
    assets = dist / "assets"

    async def page(request: Request) -> Response:
        index = dist / "index.html"
        if not index.is_file():
            return PlainTextResponse(
                NOT_BUILT, 503, headers={**SECURITY_HEADERS, "cache-control": "no-store"}
            )
        return FileResponse(
            index,
            media_type="text/html; charset=utf-8",
            headers={**SECURITY_HEADERS, "cache-control": PAGE_CACHE},
        )

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        path = (assets / name).resolve()
        # Only files inside assets/ (no "..", no links out of it).
        if not path.is_relative_to(assets.resolve()) or not path.is_file():
            raise ApiError(404, f"No console file {request.url.path}.", code="unknown_url")
        return FileResponse(path, headers={**SECURITY_HEADERS, "cache-control": ASSET_CACHE})

    async def favicon(request: Request) -> Response:
        path = dist / "favicon.svg"
        if not path.is_file():
            raise ApiError(404, "No console icon.", code="unknown_url")
        return FileResponse(path, headers={**SECURITY_HEADERS, "cache-control": PAGE_CACHE})

    return [
        Route("/", page, methods=["GET"]),
        Route("/assets/{name:path}", asset, methods=["GET"]),
        Route("/favicon.svg", favicon, methods=["GET"]),
    ]
