"""GET /v1/models and GET /v1/models/{id}: the models the simulator says it serves.

    add_routes(exchange, app.router)
    # GET /v1/models            -> {"object": "list", "data": [{"id": "gpt-4o-mini", ...}]}
    # GET /v1/models/gpt-5      -> 404 model_not_found

A client lists models before its work to check the server (a preflight), so these
count in `SimStats.listings`, not in `requests`. Any model may still be asked for in a
request: the list is what the real endpoint might answer, not a gate.
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from pipeline.simulator.api_errors import model_not_found
from pipeline.simulator.exchange import Exchange

# (id, created, owned_by): a short list in the order the real endpoint might give it.
_MODELS: Final = (
    ("gpt-4o-mini", 1721172741, "system"),
    ("gpt-4o", 1715367049, "system"),
    ("text-embedding-3-small", 1705948997, "system"),
    ("text-embedding-3-large", 1705953180, "system"),
    ("o3-mini", 1737146383, "system"),
)


def add_routes(exchange: Exchange, router: web.UrlDispatcher) -> None:
    """Serve the listing and the lookup through `exchange`."""

    async def listing(request: web.Request) -> web.StreamResponse:
        body = {"object": "list", "data": [_model_object(*m) for m in _MODELS]}
        return await exchange.guarded(
            request, lambda started: exchange.ok(body, started, counted=False), counted=False
        )

    async def lookup(request: web.Request) -> web.StreamResponse:
        name = request.match_info["model"]
        found = next((m for m in _MODELS if m[0] == name), None)

        async def answer(started: float) -> web.StreamResponse:
            if found is None:
                raise model_not_found(name, tally="errors")
            return await exchange.ok(_model_object(*found), started, counted=False)

        return await exchange.guarded(request, answer, counted=False)

    router.add_get("/v1/models", listing)
    router.add_get("/v1/models/{model:.+}", lookup)


def _model_object(model: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": owned_by}
