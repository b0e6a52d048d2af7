"""Security headers on every response, HSTS only over TLS, and the CORS allow-list."""

from __future__ import annotations

from litestar import Litestar
from litestar.testing import AsyncTestClient

from zkeb.app import create_app
from zkeb.settings import Settings

from support import make_settings, problem


async def test_every_response_carries_the_security_headers_and_no_server_details(
    client: AsyncTestClient[Litestar],
) -> None:
    for path, status in (("/api/health/live", 200), ("/api/v1/audit-events", 401), ("/api/v1/no-such-route", 404)):
        response = await client.get(path)
        assert response.status_code == status
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["server"] == "zkeb"
        assert response.headers["cache-control"] == "no-store"
        assert "default-src 'none'" in response.headers["content-security-policy"]
        assert "strict-transport-security" not in response.headers


async def test_a_path_with_empty_segments_gets_the_headers_of_the_route_it_reaches(
    client: AsyncTestClient[Litestar],
) -> None:
    # Litestar routes `//api//health/live/` to `/api/health/live`: the headers must follow the route, not the
    # spelling (a client whose base URL ends in `/` sends such paths). httpx would read `//api` as a host.
    for path in ("//api/health/live", "/api//health/live", "/api/health/live/", "//api/v1/no-such-route"):
        response = await client.get(f"{client.base_url}{path}")
        assert response.headers["cache-control"] == "no-store", path
        assert "default-src 'none'" in response.headers["content-security-policy"], path
    docs = await client.get(f"{client.base_url}//schema/scalar")
    assert docs.status_code == 200
    assert "script-src" in docs.headers["content-security-policy"]


async def test_hsts_only_when_the_request_came_over_tls(app: Litestar) -> None:
    async with AsyncTestClient(app=app, base_url="https://testserver.local") as tls_client:
        response = await tls_client.get("/api/health/live")
    assert response.headers["strict-transport-security"].startswith("max-age=")


async def test_a_forwarded_proto_from_an_untrusted_peer_is_ignored(client: AsyncTestClient[Litestar]) -> None:
    response = await client.get("/api/health/live", headers={"X-Forwarded-Proto": "https"})
    assert "strict-transport-security" not in response.headers


async def test_no_cors_headers_without_an_allow_list(client: AsyncTestClient[Litestar]) -> None:
    response = await client.options(
        "/api/v1/audit-events",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in response.headers
    plain = await client.get("/api/health/live", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in plain.headers


async def test_cors_preflight_answers_allowed_origins_only(
    base_settings_env: dict[str, str], settings: Settings
) -> None:
    cors_settings = make_settings(
        base_settings_env, DATABASE_URL=str(settings.database_url), CORS_ORIGINS="https://app.example"
    )
    preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
    async with AsyncTestClient(app=create_app(cors_settings)) as cors_client:
        allowed = await cors_client.options(
            "/api/v1/audit-events", headers={"Origin": "https://app.example", **preflight}
        )
        denied = await cors_client.options(
            "/api/v1/audit-events", headers={"Origin": "https://evil.example", **preflight}
        )
        simple = await cors_client.get("/api/health/live", headers={"Origin": "https://app.example"})
        odd_method = await cors_client.options(
            "/api/v1/uploads", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "FOO BAR"}
        )
    # A refused preflight is a problem like any other refusal (Litestar's own answer is 400 text/plain).
    assert denied.status_code == 400
    assert problem(denied)["detail"] == (
        "the CORS preflight was refused: this origin is not allowed (CORS_ORIGINS and the API's methods)"
    )
    assert odd_method.status_code == 400
    assert problem(odd_method)["detail"].startswith("the CORS preflight was refused: this method is not allowed")
    assert allowed.status_code in {200, 204}
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in allowed.headers
    assert denied.headers.get("access-control-allow-origin") != "https://evil.example"
    assert "access-control-allow-origin" not in denied.headers
    assert simple.headers["access-control-allow-origin"] == "https://app.example"
    assert "ratelimit" in simple.headers["access-control-expose-headers"].lower()


async def test_a_header_the_handler_set_is_not_duplicated(client: AsyncTestClient[Litestar]) -> None:
    response = await client.get("/api/health/live")
    assert response.headers.get_list("cache-control") == ["no-store"]
    assert response.headers.get_list("x-content-type-options") == ["nosniff"]


async def test_cors_lets_an_allowed_origin_drive_tus_and_resume_a_download(
    base_settings_env: dict[str, str], settings: Settings
) -> None:
    cors_settings = make_settings(
        base_settings_env, DATABASE_URL=str(settings.database_url), CORS_ORIGINS="https://app.example"
    )
    origin = {"Origin": "https://app.example"}
    async with AsyncTestClient(app=create_app(cors_settings)) as cors_client:
        preflights = {
            method: await cors_client.options(
                "/api/v1/uploads/0190a000-0000-7000-8000-000000000000",
                headers={**origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": asked},
            )
            for method, asked in (
                ("POST", "authorization,tus-resumable,upload-length,upload-metadata,content-type,upload-offset"),
                ("PATCH", "authorization,tus-resumable,upload-offset,content-type,upload-checksum"),
                ("HEAD", "authorization,tus-resumable"),
                ("DELETE", "authorization,tus-resumable"),
                ("GET", "authorization,range,if-range,if-none-match"),
            )
        }
        simple = await cors_client.get("/api/health/live", headers=origin)
    for method, preflight in preflights.items():
        assert preflight.status_code == 204, (method, preflight.text)
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert method in preflight.headers["access-control-allow-methods"]
    exposed = {name.strip().lower() for name in simple.headers["access-control-expose-headers"].split(",")}
    tus = {"location", "tus-resumable", "upload-offset", "upload-length", "upload-expires", "zkeb-backup-id"}
    download = {"etag", "content-range", "accept-ranges", "content-length", "repr-digest", "content-disposition"}
    assert tus | download <= exposed


async def test_an_origin_outside_the_list_gets_no_cors_header_at_all(
    base_settings_env: dict[str, str], settings: Settings
) -> None:
    cors_settings = make_settings(
        base_settings_env, DATABASE_URL=str(settings.database_url), CORS_ORIGINS="https://app.example"
    )
    evil = {"Origin": "https://evil.example"}
    async with AsyncTestClient(app=create_app(cors_settings)) as cors_client:
        responses = [
            await cors_client.get("/api/health/live", headers=evil),
            await cors_client.post("/api/v1/uploads", headers={**evil, "Tus-Resumable": "1.0.0"}),
            await cors_client.options("/api/v1/uploads", headers={**evil, "Access-Control-Request-Method": "POST"}),
        ]
    for response in responses:
        assert not [name for name in response.headers if name.lower().startswith("access-control-")], (
            response.status_code,
            response.headers,
        )


async def test_an_actual_options_request_from_an_allowed_origin_reaches_its_handler(
    base_settings_env: dict[str, str], settings: Settings
) -> None:
    # A browser's own OPTIONS request (tus discovery, sent after its preflight) carries `Origin` but no
    # `Access-Control-Request-Method`: it is answered by the tus handler, with the CORS headers of any actual request.
    cors_settings = make_settings(
        base_settings_env, DATABASE_URL=str(settings.database_url), CORS_ORIGINS="https://app.example"
    )
    async with AsyncTestClient(app=create_app(cors_settings)) as cors_client:
        allowed = await cors_client.options("/api/v1/uploads", headers={"Origin": "https://app.example"})
        other = await cors_client.options("/api/v1/uploads", headers={"Origin": "https://evil.example"})
        preflight = await cors_client.options(
            "/api/v1/uploads", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        )
    assert allowed.status_code == 204, allowed.text
    assert allowed.headers["tus-version"] == "1.0.0"
    assert int(allowed.headers["tus-max-size"]) > 0
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "tus-max-size" in allowed.headers["access-control-expose-headers"].lower()
    assert allowed.headers["vary"] == "Origin"
    assert other.status_code == 204, other.text
    assert other.headers["tus-version"] == "1.0.0"
    assert not [name for name in other.headers if name.startswith("access-control-")]
    assert "tus-version" not in preflight.headers  # a preflight is still answered by Litestar's CORS
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
