"""The chat page's files: served by pureapi itself, open without a key, nothing from other origins."""

from __future__ import annotations

import re
from pathlib import Path

from pureapi.api.web import WEB_DIR
from pureapi.app import create_app
from pureapi.chat.store import SQLiteStore
from pureapi.engines.fake import FakeEngine
from pureapi.settings import Settings

from ..conftest import FakeApp


def test_the_page_and_its_assets_are_served(fake: FakeApp) -> None:
    page = fake.client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    html = page.get_data(as_text=True)
    for asset in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert asset.startswith("/web/"), asset  # nothing from elsewhere
        r = fake.client.get(asset)
        assert r.status_code == 200 and r.mimetype in ("text/javascript", "application/javascript", "text/css")


def test_no_file_outside_the_folder_is_served(fake: FakeApp) -> None:
    for path in ("/web/../app.py", "/web/%2e%2e/app.py", "/web/nope.js"):
        assert fake.client.get(path).status_code == 404


def test_the_assets_reference_no_other_origin() -> None:
    for f in Path(WEB_DIR).iterdir():
        assert not re.search(r"https?://", f.read_text()), f.name


def test_the_page_is_open_but_the_api_is_not(tmp_path: Path) -> None:
    engine, store = FakeEngine(), SQLiteStore(tmp_path / "s.db")
    client = create_app(Settings(engine="fake", api_key=["k"]), engine=engine, store=store).test_client()
    try:
        assert client.get("/").status_code == 200 and client.get("/web/app.js").status_code == 200
        assert client.get("/v1/sessions").status_code == 401
    finally:
        engine.close()
        store.close()
