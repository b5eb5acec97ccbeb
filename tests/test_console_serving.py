"""The gateway serves the built web console at `/`: the page never cached, the
hashed assets cached for good, a CSP that allows only this origin on both,
and a plain how-to-build answer when there is no build. In process (Starlette's
test client): these routes touch no backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from marie_gateway.app import create_app
from marie_gateway.console.routes import ASSET_CACHE, CSP, dist_dir
from marie_gateway.settings import GatewaySettings
from starlette.testclient import TestClient


@pytest.fixture
def dist(tmp_path: Path) -> Path:
    root = tmp_path / "dist"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_text(
        '<!doctype html><script type="module" src="/assets/index-abc123.js"></script>'
    )
    (root / "assets" / "index-abc123.js").write_text("console.log('console');")
    (root / "assets" / "index-abc123.css").write_text("body{}")
    (tmp_path / "secret.txt").write_text("not for the web")
    return root


def client(console_dir: Path) -> TestClient:
    app = create_app(GatewaySettings(console_dir=str(console_dir)))
    # The whole app, request-context middleware included (typed loosely as ASGI).
    return TestClient(cast(Any, app))


def test_the_page_is_served_uncached_with_a_strict_csp(dist: Path) -> None:
    page = client(dist).get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    assert page.headers["content-security-policy"] == CSP
    assert "default-src 'self'" in CSP and "script-src 'self';" in CSP
    assert "unsafe" not in CSP and "http" not in CSP
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "/assets/index-abc123.js" in page.text


def test_hashed_assets_are_cached_for_good(dist: Path) -> None:
    http = client(dist)
    script = http.get("/assets/index-abc123.js")
    assert script.status_code == 200
    assert script.text == "console.log('console');"
    assert "javascript" in script.headers["content-type"]
    assert script.headers["cache-control"] == ASSET_CACHE == "public, max-age=31536000, immutable"
    assert http.get("/assets/index-abc123.css").headers["content-type"].startswith("text/css")


@pytest.mark.parametrize(
    "path", ["/assets/missing.js", "/assets/../secret.txt", "/assets/%2e%2e/secret.txt"]
)
def test_nothing_outside_the_assets_is_served(dist: Path, path: str) -> None:
    answer = client(dist).get(path)
    assert answer.status_code == 404
    assert "not for the web" not in answer.text
    assert answer.json()["error"]["code"] == "unknown_url"


def test_without_a_build_the_page_says_how_to_build_it(tmp_path: Path) -> None:
    page = client(tmp_path / "nothing-here").get("/")
    assert page.status_code == 503
    assert page.headers["content-type"].startswith("text/plain")
    assert "make web" in page.text and "npm" in page.text


def test_the_api_keeps_its_paths(dist: Path) -> None:
    http = client(dist)
    assert http.get("/openapi.json").json()["paths"]["/"]["get"]["summary"] == "The web console"
    # The API's own pages keep their own policy, not the console's.
    docs = http.get("/docs").headers.get("content-security-policy")
    assert docs and docs != CSP
    unknown = http.get("/v1/nothing")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_url"


def test_by_default_the_checkouts_own_build_is_served() -> None:
    # `make web` builds into <repo>/web/dist; with no console_dir the gateway
    # serves that folder, wherever its package sits in the tree.
    repo = Path(__file__).resolve().parents[1]
    assert dist_dir("") == repo / "web" / "dist"
