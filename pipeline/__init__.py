"""pipeline: run bulk AI jobs against OpenAI-style APIs, rate-limited, resumable, costed."""

__version__ = "0.1.0"
