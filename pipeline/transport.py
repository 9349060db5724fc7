"""The one place that touches aiohttp, and the one place a response becomes an error class.

    async with AiohttpTransport(timeout_s=120, connect_timeout_s=10) as transport:
        response = await transport.send(request)   # any status; raises only RequestFailure
        failure = classify(response, endpoint, request_tokens=900)   # None when 2xx

Dispatch depends on the `Transport` protocol alone; a test can hand it any object with
an async `send`.
"""

from __future__ import annotations

import asyncio
import io
import urllib.request
from collections.abc import Mapping
from types import TracebackType
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson

from pipeline.endpoints import Endpoint
from pipeline.errors import (
    ConnectFailed,
    Fatal,
    NoAnswer,
    NotAnApi,
    PromptFiltered,
    RateLimited,
    ReadFailed,
    RequestFailure,
    ResponseTooLarge,
    RowFailed,
    ServerError,
)
from pipeline.limits import retry_after
from pipeline.records import HttpRequest, HttpResponse
from pipeline.trust import is_loopback

#: A wait longer than this on a 429 is a quota, not a rate: halt instead of sleeping.
MAX_RATE_LIMIT_WAIT_S = 300.0
_SERVER_ERRORS = frozenset({408, 409, 500, 502, 503, 504, 529})
#: Bodies bigger than this (images sent inline) are written in chunks that let the loop
#: run between them; aiohttp warns that raw bytes this big would hold it while written.
LARGE_BODY_BYTES = 2**20
#: The most decoded bytes read from one answer. A chat answer of 128 choices at a 128k
#: window is a few MB; 32 MiB is far above any real one and keeps a gzip bomb (a small
#: body that inflates to gigabytes) from becoming a row, a checkpoint and the memory.
#: Endpoints whose answers are big by nature (embeddings, images) set their own
#: (`Endpoint.max_response_bytes`).
MAX_BODY_BYTES = Endpoint.max_response_bytes
#: Read the answer this much at a time, counting as it comes.
_READ_CHUNK = 2**16
#: What a likely cause of a connection that will not open is, and its fix.
_CHECK_URL = "check --base-url / request.base_url"


class Transport(Protocol):
    async def send(self, request: HttpRequest) -> HttpResponse:
        """Return the response, whatever its status; raise `RequestFailure` if none came."""
        ...


class AiohttpTransport:
    """One `ClientSession` for the whole run; no redirects; every attempt has a deadline."""

    def __init__(
        self,
        *,
        timeout_s: float,
        connect_timeout_s: float,
        connections: int = 0,
        max_body_bytes: int = MAX_BODY_BYTES,
        proxy: str | None = None,
    ):
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=connect_timeout_s)
        self._connections = connections
        self._max_body = max_body_bytes
        #: Every request goes through this proxy (`env_proxy` finds the user's).
        self._proxy = proxy
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AiohttpTransport:
        connector = aiohttp.TCPConnector(limit=self._connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            # Cookies a server sets are not ours to carry from one row to the next.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Not trust_env: with it aiohttp reads ~/.netrc and the proxy variables in a
            # thread for every request (0.4 ms of CPU each, 2.5x a request's whole cost
            # here), and a .netrc entry for the API's host clashes with our auth header.
            # The proxy is looked up once per run instead (env_proxy).
            trust_env=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, request: HttpRequest) -> HttpResponse:
        assert self._session is not None, "use `async with AiohttpTransport(...)`"
        try:
            body = request.body
            async with self._session.request(
                request.method,
                request.url,
                data=body if len(body) <= LARGE_BODY_BYTES else io.BytesIO(body),
                headers=request.headers,
                allow_redirects=False,
                proxy=self._proxy,
            ) as response:
                body = await _read_capped(response, self._max_body)
                return HttpResponse(response.status, response.headers, body)
        except Exception as exc:
            raise map_exception(exc) from exc


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (HTTPS_PROXY / HTTP_PROXY / ALL_PROXY,
    less NO_PROXY, read as the standard library reads them), as the official SDKs honour
    them; None for this machine's own servers (the simulator, a local llama.cpp), since
    NO_PROXY rarely lists 127.0.0.1."""
    parts = urlsplit(url)
    if is_loopback(parts.hostname or ""):
        return None
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # untyped
    if not proxy or bypass(parts.netloc, proxies):
        return None
    return proxy


async def _read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes:
    """The decoded body, or ResponseTooLarge as soon as it passes `cap` bytes."""
    declared = response.content_length
    if declared is not None and not response.headers.get("content-encoding"):
        if declared > cap:
            raise _too_large(declared, cap, response.status)
        return await response.read()  # the usual answer: its size known and within the cap
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_READ_CHUNK):
        size += len(chunk)
        if size > cap:
            raise _too_large(size, cap, response.status)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, cap: int, status: int) -> ResponseTooLarge:
    return ResponseTooLarge(
        f"the answer is over {size / 2**20:,.1f} MiB decoded, more than the "
        f"{cap / 2**20:,.0f} MiB a response may hold: not kept (a compressed body that "
        "inflates without end, or a runaway answer; lower max_tokens / n if it is yours)",
        status=status,
    )


def map_exception(exc: BaseException) -> RequestFailure:
    """Translate what aiohttp and asyncio raise into our failure classes.

    The line that matters is whether the request can have reached the model: a refused
    or timed-out connect cannot have been billed; anything after sending may have been.
    """
    if isinstance(exc, RequestFailure):
        return exc
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ConnectFailed(
            f"timed out connecting to the server: {_CHECK_URL}, the network, or a proxy "
            "(HTTPS_PROXY / NO_PROXY)"
        )
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return ConnectFailed(
            f"cannot connect to the proxy {exc.host}:{exc.port} ({_reason(exc.os_error)}): "
            "check HTTPS_PROXY / HTTP_PROXY, or list the API's host in NO_PROXY"
        )
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return ConnectFailed(
            f"the proxy refused to connect to the API ({exc.status} {exc.message}): check "
            "HTTPS_PROXY / HTTP_PROXY (and its credentials), or list the host in NO_PROXY"
        )
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return Fatal(
            f"the TLS certificate of {exc.host} is not trusted ({exc.certificate_error}): "
            f"{_CHECK_URL}; behind a proxy that inspects TLS, point SSL_CERT_FILE at its "
            "CA bundle"
        )
    if isinstance(exc, aiohttp.ClientConnectorSSLError | aiohttp.ClientSSLError):
        return Fatal(
            f"TLS failed with {_host(exc)} ({_reason(exc)}): {_CHECK_URL} (http:// for a "
            "server without TLS, https:// for one with it)"
        )
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return ConnectFailed(
            f"cannot resolve the host name {exc.host!r}: {_CHECK_URL} for a typo, or the "
            "network / DNS"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        refused = isinstance(exc.os_error, ConnectionRefusedError)
        why = "connection refused: is the server running on that port?" if refused else None
        return ConnectFailed(
            f"cannot connect to {exc.host}:{exc.port} ({why or _reason(exc.os_error)}): "
            f"{_CHECK_URL}"
        )
    if isinstance(exc, aiohttp.InvalidURL):
        return Fatal(f"invalid URL {exc.url}: check --base-url / request.base_url")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return ReadFailed("the server closed the connection before answering")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return ReadFailed(f"the answer was cut off: {exc}")
    if isinstance(exc, aiohttp.SocketTimeoutError | asyncio.TimeoutError):
        return NoAnswer("no answer before the request deadline (request.timeout_s)")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return ReadFailed(f"connection failed after sending: {type(exc).__name__}: {exc}")
    raise exc


def _host(exc: BaseException) -> str:
    return str(getattr(exc, "host", None) or "the server")


def _reason(exc: BaseException | None) -> str:
    """An OS or SSL error's reason, without its errno noise."""
    if exc is None:
        return "no reason given"
    inner = getattr(exc, "os_error", None)
    cause = inner if isinstance(inner, BaseException) else exc
    text = getattr(cause, "reason", None) or getattr(cause, "strerror", None) or str(cause)
    return str(text) or type(cause).__name__


def classify(
    response: HttpResponse, endpoint: Endpoint, *, request_tokens: int
) -> RequestFailure | None:
    """Decide what a response means, from its status, headers and error body."""
    status = response.status
    if 200 <= status < 300:
        return _not_an_api(response)
    headers = response.headers
    body = _json_or_text(response.body)
    error = endpoint.error(body)
    detail = error.message or f"HTTP {status}"
    no_retry = headers.get("x-should-retry", "").lower() == "false"
    wait = retry_after(headers)

    if 300 <= status < 400:
        where = headers.get("location", "another address")
        return Fatal(
            f"the server redirected to {where}; set --base-url to the final address",
            status=status,
        )
    if error.code == "content_filter":
        failure: RequestFailure | None = PromptFiltered(_filtered(body, detail))
    else:
        failure = _by_status(status, error.type, error.code, detail, endpoint.path)
    if failure is None:
        failure = _classify_429(error.type, error.code, detail, request_tokens, headers, wait)
    failure.status, failure.retry_after, failure.no_retry = status, wait, no_retry
    return failure


def _by_status(
    status: int, type_: str | None, code: str | None, detail: str, path: str
) -> RequestFailure | None:
    """The failure for a non-2xx, non-3xx status; None for 429, which needs headers."""
    if status == 401:
        return Fatal(f"authentication failed ({detail}): check the API key variable")
    if status == 402:
        return Fatal(f"billing ({detail}): add credit or raise the spend limit, then run again")
    if status == 403:
        return Fatal(f"permission denied ({detail}): the key may lack access to this model")
    if status == 404:
        if code == "model_not_found":
            return Fatal(f"{detail} Check `request.model` / --model")
        # Anthropic names an unknown model only in the message: "model: claude-x".
        if type_ == "not_found_error" and detail.startswith("model:"):
            return Fatal(f"unknown model ({detail}): check `request.model` / --model")
        if code == "DeploymentNotFound":
            return Fatal(f"{detail} Check `request.deployment` (default: `request.model`)")
        return Fatal(
            f"404 Not Found for {path} ({detail}): check --base-url "
            "(OpenAI-compatible servers usually serve under /v1; Azure wants "
            "https://<resource>.openai.azure.com and a valid `api_version`)"
        )
    if status == 429:
        return None
    if status in _SERVER_ERRORS:
        slow = status == 529 or (status == 503 and type_ != "invalid_request_error")
        return ServerError(f"HTTP {status}: {detail}", slow_down=slow)
    if status >= 500:
        return ServerError(f"HTTP {status}: {detail}")
    return RowFailed(f"HTTP {status} {code or type_ or status}: {detail}")


def _classify_429(
    type_: str | None,
    code: str | None,
    detail: str,
    request_tokens: int,
    headers: Mapping[str, str],
    wait: float | None,
) -> RequestFailure:
    if "insufficient_quota" in (type_, code):
        return Fatal(f"quota exhausted: {detail}")
    limit = _int_header(headers, "x-ratelimit-limit-tokens")
    if limit is not None and request_tokens > limit:
        # No retry can help: the request alone is over the per-minute token limit.
        return RowFailed(
            f"request too large: about {request_tokens} tokens, the limit is {limit} per minute"
        )
    if wait is not None and wait > MAX_RATE_LIMIT_WAIT_S:
        return Fatal(
            f"the API asks to wait {wait:.0f} s before the next request: treating it as a "
            f"quota, not a rate limit ({detail})"
        )
    return RateLimited(f"rate limited: {detail}")


def _not_an_api(response: HttpResponse) -> NotAnApi | None:
    """A 2xx HTML page, or a body that says it is something other than JSON and does not
    look like it, is not an API's answer (every endpoint answers JSON): a proxy's login
    page, a captive portal, a web site at the base URL (a missing /v1 often lands on one).
    A cut or garbled JSON body is not this: it is retried as a read failure."""
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    start = response.body[:64].lstrip()
    if "text/html" in kind or start.lower().startswith((b"<!doctype html", b"<html")):
        what = f"an HTML page{_title(response.body)}"
    elif kind and "json" not in kind and not start.startswith((b"{", b"[")):
        what = f"a {kind} body"
    else:
        return None
    return NotAnApi(
        f"HTTP {response.status} with {what} instead of the API's JSON: the base URL is "
        "not the API (a missing /v1? a web site?) or a proxy or captive portal answered; "
        "check --base-url and HTTPS_PROXY / NO_PROXY",
        status=response.status,
    )


def _title(body: bytes) -> str:
    low = body[:4096].lower()
    start, end = low.find(b"<title>"), low.find(b"</title>")
    if start < 0 or end < start:
        return ""
    text = body[start + 7 : end].decode("utf-8", "replace").strip()
    return f' ("{" ".join(text.split())[:80]}")' if text else ""


def _filtered(body: object, detail: str) -> str:
    """A content-filter refusal, naming the categories Azure's innererror flags."""
    inner = body.get("error") if isinstance(body, Mapping) else None
    inner = inner.get("innererror") if isinstance(inner, Mapping) else None
    result = inner.get("content_filter_result") if isinstance(inner, Mapping) else None
    flagged = [
        f"{name}: {verdict.get('severity')}"
        for name, verdict in (result.items() if isinstance(result, Mapping) else ())
        if isinstance(verdict, Mapping) and verdict.get("filtered")
    ]
    why = f" ({', '.join(flagged)})" if flagged else ""
    return (
        f"the provider's content filter refused this row's prompt{why}; only this row "
        f"fails. Change its text to send it. The server said: {detail}"
    )


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _json_or_text(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:500].decode("utf-8", "replace")
