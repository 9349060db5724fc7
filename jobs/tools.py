"""The functions behind jobs/tools.toml's tools: the tool loop calls them by name.

A tool function takes the arguments the model wrote (JSON, as keyword arguments) and
returns something JSON can hold, or a string. What it raises goes back to the model as
the result ("error: KeyError: ..."), which may then call again; the row does not fail.
"""

from __future__ import annotations

# A small lookup table; a real job would query a database or an internal API here.
FACTS: dict[str, dict[str, object]] = {
    "Australia": {"capital": "Canberra", "population_millions": 26.6, "currency": "AUD"},
    "Brazil": {"capital": "Brasília", "population_millions": 216.4, "currency": "BRL"},
    "Canada": {"capital": "Ottawa", "population_millions": 40.1, "currency": "CAD"},
    "France": {"capital": "Paris", "population_millions": 68.2, "currency": "EUR"},
    "Germany": {"capital": "Berlin", "population_millions": 84.5, "currency": "EUR"},
    "Japan": {"capital": "Tokyo", "population_millions": 124.5, "currency": "JPY"},
    "Kenya": {"capital": "Nairobi", "population_millions": 55.1, "currency": "KES"},
    "Norway": {"capital": "Oslo", "population_millions": 5.5, "currency": "NOK"},
}


def country_facts(country: str) -> dict[str, object]:
    """Capital, population and currency of one country in the table."""
    if country not in FACTS:
        raise KeyError(f"no facts for {country!r}; known: {', '.join(FACTS)}")
    return {"country": country, **FACTS[country]}
