"""Access control through Flask's test client: API keys, the Host-header check, opt-in CORS."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from pureapi.types import GenerationRequest

from ..conftest import MakeFakeApp

ROUTES = [
    ("GET", "/status", None),
    ("GET", "/v1/models", None),
    ("GET", "/openapi.json", None),
    ("POST", "/chat", {"message": "hi", "max_tokens": 4}),
    ("POST", "/reset", {}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 4}),
    ("POST", "/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ("POST", "/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "hi"}]}),
]


@pytest.fixture
def make(make_fake_app: MakeFakeApp) -> Any:
    """Build test clients over a fake engine with the given settings, each on its own database."""
    count = 0

    def build(**settings: Any) -> FlaskClient:
        nonlocal count
        count += 1
        client: FlaskClient = make_fake_app(settings=settings, db=f"s{count}.db").client
        return client

    return build


def call(client: FlaskClient, method: str, path: str, body: Any, **headers: str) -> Any:
    return client.open(path, method=method, json=body, headers=headers)


def assert_envelope(response: Any, status: int, path: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    elif path.startswith("/v1/"):
        assert set(body["error"]) == {"message", "type", "param", "code"}
    else:
        assert set(body) == {"error"} and isinstance(body["error"], str)


# --- API keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_route_but_health_needs_the_key(make: Any, method: str, path: str, body: Any) -> None:
    client = make(api_key=["k-one", "k-two"])
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "k-one"},
        {"Authorization": "Basic k-one"},
    ):
        r = call(client, method, path, body, **headers)
        assert_envelope(r, 401, path)
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert "API key" in (r.get_json()["error"]["message"] if path.startswith("/v1/") else r.get_json()["error"])
    for key in ("k-one", "k-two"):
        r = call(client, method, path, body, Authorization=f"Bearer {key}")
        assert r.status_code == 200, r.get_data(as_text=True)


def test_401_on_v1_is_an_authentication_error(make: Any) -> None:
    r = make(api_key=["secret"]).get("/v1/models")
    assert r.status_code == 401
    assert r.get_json()["error"]["type"] == "authentication_error"


def test_health_is_open_with_keys(make: Any) -> None:
    r = make(api_key=["secret"]).get("/health")
    assert r.status_code == 200 and r.get_json()["status"] == "healthy"


def test_the_scheme_is_case_insensitive_but_the_key_is_exact(make: Any) -> None:
    client = make(api_key=["Secret"])
    assert client.get("/status", headers={"Authorization": "bearer Secret"}).status_code == 200
    assert client.get("/status", headers={"Authorization": "BEARER  Secret "}).status_code == 200
    for wrong in ("Bearer secret", "Bearer Secret2", "Bearer Secre", "Bearer ", "Bearer"):
        assert client.get("/status", headers={"Authorization": wrong}).status_code == 401, wrong


def test_unknown_routes_need_the_key_too(make: Any) -> None:
    """Without the key nothing is revealed, not even which routes exist."""
    client = make(api_key=["secret"])
    assert client.get("/nope").status_code == 401
    r = client.get("/v1/nope", headers={"Authorization": "Bearer secret"})
    assert_envelope(r, 404, "/v1/nope")


@pytest.mark.parametrize(
    ("settings", "same_key_shares", "keys_share"),
    [
        ({"api_key": ["k-one", "k-two"]}, True, False),
        ({"api_key": ["k-one", "k-two"], "kv_cache_scope": "global"}, True, True),
    ],
    ids=["per-key", "global"],
)
def test_cached_kv_is_shared_per_key_by_default(
    make_fake_app: MakeFakeApp, monkeypatch: pytest.MonkeyPatch, settings: Any, same_key_shares: bool, keys_share: bool
) -> None:
    """Every generation carries its request's cache scope: the engine shares cached KV only within one."""
    fake = make_fake_app(settings=settings)
    scopes: list[str] = []
    generate = fake.engine.generate

    def spy(request: GenerationRequest) -> Any:
        scopes.append(request.cache_scope)
        return generate(request)

    monkeypatch.setattr(fake.engine, "generate", spy)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for key in ["k-one", "k-one", "k-two"]:
        fake.engine.enqueue("ok")
        r = fake.client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.get_data(as_text=True)
    fake.engine.enqueue("ok")
    assert (
        fake.client.post("/chat", json={"message": "hi"}, headers={"Authorization": "Bearer k-two"}).status_code == 200
    )
    assert (scopes[0] == scopes[1]) is same_key_shares
    assert (scopes[1] == scopes[2]) is keys_share and scopes[2] == scopes[3]
    assert all("k-one" not in s and "k-two" not in s for s in scopes)  # a hash, never the key


def test_without_keys_no_auth_is_asked(make: Any) -> None:
    client = make()
    assert client.get("/status").status_code == 200
    assert client.get("/status", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_api_key_env_var_is_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    from pureapi.cli import serve_parser
    from pureapi.settings import settings_from_args

    monkeypatch.setenv("PUREAPI_API_KEY", "alpha, beta,,gamma")
    assert settings_from_args(serve_parser().parse_args([])).api_key == ["alpha", "beta", "gamma"]
    flags = serve_parser().parse_args(["--api-key", "one", "--api-key", "two"])
    assert settings_from_args(flags).api_key == ["one", "two"]  # flags win over the env var


def test_the_help_never_shows_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from pureapi.cli import serve_parser

    monkeypatch.setenv("PUREAPI_API_KEY", "topsecret")
    assert "topsecret" not in serve_parser().format_help()


# --- Host header (DNS rebinding) ------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:5000", "LOCALHOST:80", "127.0.0.1", "127.0.0.1:5000", "127.9.8.7", "[::1]:5000"]
)
def test_loopback_hosts_are_accepted_when_bound_to_loopback(make: Any, host: str) -> None:
    assert make().get("/status", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:5000", "localhost.evil.example", "127.0.0.1.nip.io", "0.0.0.0", "10.0.0.1"]
)
@pytest.mark.parametrize("path", ["/status", "/v1/models", "/health"])
def test_other_hosts_get_403_when_bound_to_loopback(make: Any, host: str, path: str) -> None:
    r = make().get(path, headers={"Host": host})
    assert_envelope(r, 403, path)
    text = r.get_json()["error"]["message"] if path.startswith("/v1/") else r.get_json()["error"]
    assert "--allowed-hosts" in text


def test_the_host_check_runs_before_auth(make: Any) -> None:
    r = make(api_key=["secret"]).get("/status", headers={"Host": "evil.example", "Authorization": "Bearer secret"})
    assert r.status_code == 403


def test_allowed_hosts_extend_the_loopback_names(make: Any) -> None:
    client = make(allowed_hosts=["api.internal", "Box.Local"])
    for host in ("api.internal", "api.internal:8080", "box.local", "localhost"):
        assert client.get("/status", headers={"Host": host}).status_code == 200, host
    assert client.get("/status", headers={"Host": "other.internal"}).status_code == 403


def test_no_host_check_when_bound_to_all_interfaces(make: Any) -> None:
    client = make(host="0.0.0.0")
    assert client.get("/status", headers={"Host": "my-server.example:5000"}).status_code == 200


def test_allowed_hosts_apply_even_when_bound_to_all_interfaces(make: Any) -> None:
    client = make(host="0.0.0.0", allowed_hosts=["api.example"])
    assert client.get("/status", headers={"Host": "api.example"}).status_code == 200
    assert client.get("/status", headers={"Host": "evil.example"}).status_code == 403


# --- CORS -----------------------------------------------------------------------------------


def cors_headers(response: Any) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}


def preflight(client: FlaskClient, origin: str, path: str = "/v1/chat/completions") -> Any:
    return client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_cors_is_off_by_default(make: Any) -> None:
    client = make()
    for origin in ("https://evil.example", "http://localhost:3000", "null"):
        assert cors_headers(client.get("/v1/models", headers={"Origin": origin})) == {}
        assert cors_headers(preflight(client, origin)) == {}


def test_listed_origins_are_allowed(make: Any) -> None:
    client = make(cors_origins=["https://app.example", "http://localhost:3000"])
    for origin in ("https://app.example", "http://localhost:3000", "HTTPS://APP.EXAMPLE"):
        r = client.get("/v1/models", headers={"Origin": origin})
        assert r.headers["Access-Control-Allow-Origin"] == origin
        assert "Origin" in r.headers.get("Vary", "")
        pre = preflight(client, origin)
        assert pre.status_code == 200
        assert pre.headers["Access-Control-Allow-Origin"] == origin
        assert "POST" in pre.headers["Access-Control-Allow-Methods"]
        allowed = pre.headers["Access-Control-Allow-Headers"].lower()
        assert "authorization" in allowed and "content-type" in allowed


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "https://app.example.evil.example",  # a listed origin as a prefix
        "https://evil.example/https://app.example",
        "http://app.example",  # another scheme
        "https://app.example:8443",  # another port
        "https://xapp.example",
        "null",
    ],
)
def test_an_unlisted_origin_is_never_reflected(make: Any, origin: str) -> None:
    client = make(cors_origins=["https://app.example"])
    for r in (client.get("/v1/models", headers={"Origin": origin}), preflight(client, origin)):
        assert "Access-Control-Allow-Origin" not in r.headers, cors_headers(r)
        assert origin not in " ".join(r.headers.values())


def test_origins_that_look_like_regexes_are_literal(make: Any) -> None:
    """An IPv6 origin has brackets; it must match itself, and nothing else."""
    client = make(cors_origins=["http://[::1]:3000", "https://(a|b).example"])
    r = client.get("/v1/models", headers={"Origin": "http://[::1]:3000"})
    assert r.headers.get("Access-Control-Allow-Origin") == "http://[::1]:3000"
    for origin in ("http://1:3000", "http://::3000", "https://a.example", "https://b.example"):
        assert "Access-Control-Allow-Origin" not in client.get("/v1/models", headers={"Origin": origin}).headers


def test_a_wildcard_origin_answers_star_and_does_not_reflect(make: Any) -> None:
    client = make(cors_origins=["*"])
    r = client.get("/v1/models", headers={"Origin": "https://anyone.example"})
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in r.headers


def test_no_cors_headers_without_an_origin(make: Any) -> None:
    assert cors_headers(make(cors_origins=["https://app.example"]).get("/v1/models")) == {}


def test_cors_preflight_needs_no_key_but_the_request_does(make: Any) -> None:
    client = make(cors_origins=["https://app.example"], api_key=["secret"])
    pre = preflight(client, "https://app.example")
    assert pre.status_code == 200 and pre.headers["Access-Control-Allow-Origin"] == "https://app.example"
    r = client.get("/v1/models", headers={"Origin": "https://app.example"})
    assert r.status_code == 401
    # The browser can read the 401 (and so show a useful error).
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    r = client.get("/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer secret"})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"


def test_credentials_are_never_allowed(make: Any) -> None:
    client = make(cors_origins=["https://app.example"])
    for r in (
        client.get("/v1/models", headers={"Origin": "https://app.example"}),
        preflight(client, "https://app.example"),
    ):
        assert "Access-Control-Allow-Credentials" not in r.headers
