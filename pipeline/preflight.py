"""Before the first row: is the server there, and is it the API?

    halt = await check_server(transport, provider, base_url, headers, endpoint)
    if halt is not None:
        dispatcher.stop(halt)      # no row is sent; they stay pending

One `GET {base_url}/models` with the run's key and a short deadline. What no row could
get past halts the run before any row is recorded as sent, so nothing is counted as in
flight: a refused connection, a name that does not resolve, a TLS failure, a proxy that
refuses, an HTML page, a 401. Anything else says nothing for sure and the rows go
ahead: a 404 (not every server lists its models, and a base URL without /v1 is caught
by the first row's 404 all the same), a 403 (a key restricted to some endpoints), a
5xx, an answer slower than the deadline. OpenAI's shape only: Azure lists models per
resource, not per deployment, and Anthropic with its own headers; those are not checked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from pipeline.endpoints import Endpoint, Provider
from pipeline.errors import Fatal, Halted, NoAnswer, NotAnApi, RequestFailure
from pipeline.records import HttpRequest
from pipeline.transport import Transport, classify

#: Long enough for a loaded server to list its models, short enough that a server that
#: accepts and never answers costs a run little before its rows take over.
PREFLIGHT_TIMEOUT_S = 10.0


async def check_server(
    transport: Transport,
    provider: Provider,
    base_url: str,
    headers: Mapping[str, str],
    endpoint: Endpoint,
) -> Halted | None:
    """Why the server cannot serve any row, or None when it may."""
    if provider.name != "openai":
        return None
    url = f"{base_url}/models"
    request = HttpRequest("GET", url, dict(headers), b"")
    try:
        response = await asyncio.wait_for(transport.send(request), PREFLIGHT_TIMEOUT_S)
    except TimeoutError:
        return None
    except RequestFailure as exc:
        if isinstance(exc, Fatal) or (exc.outage and not isinstance(exc, NoAnswer)):
            return _halt(url, exc)
        return None
    answer = classify(response, endpoint, request_tokens=0)
    if answer is not None and (isinstance(answer, NotAnApi) or response.status == 401):
        return _halt(url, answer)
    return None


def _halt(url: str, failure: RequestFailure) -> Halted:
    return Halted(
        f"before sending any row, GET {url} failed: {failure.message}. No row was sent; "
        "fix that, then run the same command again"
    )
