"""pipeline: run bulk AI jobs against OpenAI-style APIs, rate-limited, resumable, costed.

    pipeline run job.toml --simulate      # the command; `python -m pipeline` is the same

    import pipeline                       # the same from Python (pipeline/api.py)
    out = pipeline.run_frame(frame, "job.toml", simulate=True)   # a polars DataFrame back
    summary = pipeline.run("job.toml")                           # as the command runs it

The names below load on first use (PEP 562), so `import pipeline`, `pipeline --help`
and a command's start-up pay nothing for the Python API: `import pipeline` itself
imports nothing but `os`.

Importing the package sets one thing for the process: Arrow's memory pool, unless the
environment already names one (ARROW_DEFAULT_MEMORY_POOL). Arrow reads it once, when
pyarrow first allocates, so it must be set before any module here imports pyarrow.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what __getattr__ gives, as mypy and editors should see it
    from pipeline.api import arun_frame, run, run_frame
    from pipeline.errors import (
        BudgetReached,
        BudgetTooSmall,
        CheckpointError,
        Halted,
        InputError,
        Interrupted,
        JobError,
        OutputError,
        OutputRefused,
        PipelineError,
        SpecError,
        TemplateError,
        Terminated,
        Untrusted,
    )
    from pipeline.spec import Job, LimitsSpec, OutputSpec, PriceSpec, RequestSpec, TemplateSpec

__version__ = "0.1.0"

#: The allocator pyarrow uses for the Parquet input and output: glibc's, as the rest of
#: the process, rather than the mimalloc pool pyarrow picks by default, which keeps
#: what it freed. Measured on the 20,000-row real-64 job: peak RSS 283-291 MB with
#: mimalloc against 253-260 MB with the system pool, alternating runs, with no CPU
#: difference the noise (+-10%) could show.
ARROW_POOL = "system"

os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", ARROW_POOL)

__all__ = [
    "BudgetReached",
    "BudgetTooSmall",
    "CheckpointError",
    "Halted",
    "InputError",
    "Interrupted",
    "Job",
    "JobError",
    "LimitsSpec",
    "OutputError",
    "OutputRefused",
    "OutputSpec",
    "PipelineError",
    "PriceSpec",
    "RequestSpec",
    "SpecError",
    "TemplateError",
    "TemplateSpec",
    "Terminated",
    "Untrusted",
    "__version__",
    "arun_frame",
    "run",
    "run_frame",
]

_API = ("arun_frame", "run", "run_frame")
_SPEC = ("Job", "LimitsSpec", "OutputSpec", "PriceSpec", "RequestSpec", "TemplateSpec")
#: The module that defines each public name (the exceptions: errors.py), imported when
#: one of its names is first used.
_EXPORTS = {
    name: f"pipeline.{'api' if name in _API else 'spec' if name in _SPEC else 'errors'}"
    for name in __all__
    if name != "__version__"
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
