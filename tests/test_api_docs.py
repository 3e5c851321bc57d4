"""/docs renders offline: Swagger UI's assets come from the service itself, never a CDN, and a headless
Chromium (Debian's `chromium`) that may reach nothing else builds the page with every operation on it."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import uvicorn

from serve_apps.api import create_api

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """The real FastAPI app over HTTP; its pages and schema need no scoring service behind them."""
    service = SimpleNamespace(settings=SimpleNamespace(max_request_bytes=1 << 20))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_api(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_docs_pages_load_their_assets_from_the_service(url: str) -> None:
    for page in ("/docs", "/redoc"):
        html = httpx.get(url + page).text
        sources = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert sources and all(s.startswith("/docs-assets/") for s in sources), sources  # nothing from a CDN
        for source in sources:
            asset = httpx.get(url + source)
            assert asset.status_code == 200 and len(asset.content) > 100, source
    assert len(httpx.get(url + "/docs-assets/swagger-ui-bundle.js").content) > 500_000


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run does)")
def test_swagger_ui_renders_every_operation_in_headless_chromium(url: str, tmp_path: Path) -> None:
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path}",
         "--virtual-time-budget=20000", "--dump-dom", f"{url}/docs"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    paths = set(re.findall(r'data-path="([^"]+)"', dom))
    assert {"/v1/score", "/v1/compare", "/v1/users/{user_id}/feedback", "/admin/users"} <= paths, dom[-2000:]
    assert "opblock-summary-method" in dom and "RewardPrism" in dom
