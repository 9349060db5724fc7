"""An OpenAI-compatible API server for offline runs, tests and benchmarks.

In a test or a benchmark, run it in a thread and point any client at the URL::

    with running_in_thread(SimConfig(rpm=600, fault_rate=0.05)) as (base_url, sim):
        ...  # POST f"{base_url}/chat/completions"
        assert sim.stats.requests >= sim.stats.ok

or inside a running event loop::

    async with Simulator(SimConfig(seed=7)) as base_url:
        ...

From the command line `pipeline simulate` calls `serve(config, host, port)`.

It answers with the shapes, headers and error bodies of the real APIs, enforces
RPM/TPM as OpenAI documents it, and injects faults at a configured rate or where a
row asks with a `<<sim:KIND[:N]>>` directive. Answers are a pure function of the seed
and the request body. It imports nothing from the client's stages: it counts tokens
itself, so the client and the simulator check each other. The package, one module a
concept:

- server.py: `Simulator`, `serve`, `running_in_thread`, the route table;
- exchange.py: the steps every request shares (key, directive, limits, fault, latency);
- one module per API: chat.py, embeddings.py, models.py, responses.py (with
  responses_request.py), anthropic.py (with anthropic_request.py), azure.py,
  images.py, audio.py;
- what they share: api_errors.py (error bodies, the canned faults), rate_limits.py
  (RPM/TPM buckets, 429s), fault_injection.py (fault kinds, directives,
  misbehaviours), fake_answers.py (seeded text, JSON from a schema, vectors),
  prompt_tokens.py, text_tokens.py and prompt_images.py (counting a prompt),
  tool_calls.py (chat's function tools), strict_schemas.py, request_fields.py,
  config.py (`SimConfig`, `SimStats`).
"""

from pipeline.simulator.config import SimConfig, SimStats
from pipeline.simulator.server import Simulator, running_in_thread, serve
from pipeline.simulator.text_tokens import count_text

__all__ = ["SimConfig", "SimStats", "Simulator", "count_text", "running_in_thread", "serve"]
