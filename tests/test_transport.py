"""Every exception the transport can meet is mapped to a failure class; statuses too."""

from __future__ import annotations

import os

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from pipeline.endpoints import ChatCompletions
from pipeline.errors import (
    ConnectFailed,
    Fatal,
    NoAnswer,
    RateLimited,
    ReadFailed,
    RequestFailure,
    RowFailed,
    ServerError,
)
from pipeline.records import HttpResponse
from pipeline.spec import RequestSpec
from pipeline.transport import classify, env_proxy, map_exception

CONN_KEY = aiohttp.client_reqrep.ConnectionKey("h", 1, False, True, None, None, None)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        pytest.param(
            aiohttp.ClientConnectorError(CONN_KEY, OSError(111, "refused")),
            ConnectFailed,
            id="refused",
        ),
        pytest.param(aiohttp.ConnectionTimeoutError(), ConnectFailed, id="connect-timeout"),
        pytest.param(aiohttp.ServerDisconnectedError(), ReadFailed, id="disconnected"),
        pytest.param(aiohttp.ClientPayloadError("cut"), ReadFailed, id="payload"),
        pytest.param(aiohttp.SocketTimeoutError(), NoAnswer, id="read-timeout"),
        pytest.param(TimeoutError(), NoAnswer, id="total-timeout"),
        pytest.param(aiohttp.ClientOSError(104, "reset"), ReadFailed, id="reset"),
        pytest.param(ConnectionResetError(104, "reset"), ReadFailed, id="os-reset"),
        pytest.param(aiohttp.InvalidURL(URL("nope")), Fatal, id="invalid-url"),
    ],
)
def test_foreign_exceptions_map_to_our_classes(
    exc: BaseException, expected: type[RequestFailure]
) -> None:
    assert type(map_exception(exc)) is expected


def test_unknown_exceptions_are_not_swallowed() -> None:
    with pytest.raises(KeyError):
        map_exception(KeyError("bug"))


ENDPOINT = ChatCompletions(RequestSpec(model="m"), None, "max_tokens")


def response(status: int, body: bytes = b"{}", **headers: str) -> HttpResponse:
    return HttpResponse(
        status, CIMultiDict({k.replace("_", "-"): v for k, v in headers.items()}), body
    )


def err(type_: str, code: str | None = None, message: str = "m") -> bytes:
    import orjson

    return orjson.dumps({"error": {"type": type_, "code": code, "message": message}})


@pytest.mark.parametrize(
    ("resp", "expected", "retry"),
    [
        pytest.param(response(200), None, False, id="200"),
        pytest.param(response(500, err("server_error")), ServerError, True, id="500"),
        pytest.param(response(408), ServerError, True, id="408"),
        pytest.param(response(409), ServerError, True, id="409"),
        pytest.param(response(529), ServerError, True, id="529"),
        pytest.param(
            response(500, x_should_retry="false"), ServerError, False, id="should-retry-false"
        ),
        pytest.param(
            response(429, err("requests", "rate_limit_exceeded"), retry_after_ms="20"),
            RateLimited,
            True,
            id="429-rate",
        ),
        pytest.param(
            response(429, err("insufficient_quota", "insufficient_quota")), Fatal, False, id="quota"
        ),
        pytest.param(
            response(429, err("requests", "rate_limit_exceeded"), retry_after="3600"),
            Fatal,
            False,
            id="429-wait-an-hour",
        ),
        pytest.param(
            response(429, err("tokens", "rate_limit_exceeded"), x_ratelimit_limit_tokens="100"),
            RowFailed,
            False,
            id="request-too-large",
        ),
        pytest.param(response(400, err("invalid_request_error")), RowFailed, False, id="400"),
        pytest.param(
            response(401, err("invalid_request_error", "invalid_api_key")), Fatal, False, id="401"
        ),
        pytest.param(response(403), Fatal, False, id="403"),
        pytest.param(
            response(404, err("invalid_request_error", "model_not_found")), Fatal, False, id="404"
        ),
        pytest.param(response(301, location="https://x/v1"), Fatal, False, id="redirect"),
        pytest.param(response(502, b"<html>bad gateway</html>"), ServerError, True, id="html-502"),
    ],
)
def test_status_and_body_decide_the_class(
    resp: HttpResponse, expected: type[RequestFailure] | None, retry: bool
) -> None:
    failure = classify(resp, ENDPOINT, request_tokens=500)

    if expected is None:
        assert failure is None
    else:
        assert type(failure) is expected
        assert failure is not None
        assert failure.should_retry is retry


def test_rate_limit_carries_the_servers_wait() -> None:
    failure = classify(
        response(429, err("requests", "rate_limit_exceeded"), retry_after_ms="1500"),
        ENDPOINT,
        request_tokens=1,
    )

    assert failure is not None
    assert failure.retry_after == 1.5


@pytest.mark.parametrize(
    ("url", "env", "proxy"),
    [
        pytest.param("https://api.openai.com/v1", {}, None, id="no-proxy-set"),
        pytest.param(
            "https://api.openai.com/v1",
            {"HTTPS_PROXY": "http://p:3128"},
            "http://p:3128",
            id="https-proxy",
        ),
        pytest.param(
            "https://api.openai.com/v1",
            {"https_proxy": "http://p:3128"},
            "http://p:3128",
            id="lower-case",
        ),
        pytest.param(
            "https://api.openai.com/v1",
            {"ALL_PROXY": "http://p:3128"},
            "http://p:3128",
            id="all-proxy",
        ),
        pytest.param(
            "https://api.openai.com/v1",
            {"HTTP_PROXY": "http://p:3128"},
            None,
            id="http-proxy-is-not-for-https",
        ),
        pytest.param(
            "https://api.openai.com/v1",
            {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "example.org,openai.com"},
            None,
            id="no-proxy-domain-suffix",
        ),
        pytest.param(
            "http://127.0.0.1:8000/v1",
            {"HTTP_PROXY": "http://p:3128"},
            None,
            id="loopback-never-proxied",
        ),
    ],
)
def test_env_proxy_is_read_once_as_the_sdks_read_it(
    monkeypatch: pytest.MonkeyPatch, url: str, env: dict[str, str], proxy: str | None
) -> None:
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    assert env_proxy(url) == proxy
