"""Site strings round-trip and malformed strings are rejected."""

from __future__ import annotations

import pytest

from patchtrace.sites import HookPoint, Site, SiteError, SiteSpec, parse_site

ROUND_TRIP = [
    Site("embed"),
    Site("embed", pos=2),
    Site("embed", pos=-3),
    Site("resid_pre", 5),
    Site("resid_pre", 5, pos=3),
    Site("resid_mid", 0, pos=-1),
    Site("resid_post", 29, pos=-12),
    Site("attn_out", 3),
    Site("mlp_out", 11, pos=0),
    Site("head", 23, 3, -1),
    Site("head", 0, 0),
    Site("q", 4, 8, 7),
    Site("k", 2, 0),
    Site("v", 2, 2, -2),
    Site("pattern", 7, 1, -1),
    Site("neuron", 4, 1023, 7),
    Site("neuron", 4, 1535),
]


@pytest.mark.parametrize("site", ROUND_TRIP, ids=str)
def test_round_trip(site):
    text = str(site)
    assert parse_site(text) == site
    assert str(parse_site(text)) == text
    assert parse_site(f"  {text} ") == site


def test_known_strings():
    assert str(Site("head", 23, 3, -1)) == "head[23].h3@-1"
    assert str(Site("neuron", 4, 1023, 7)) == "neuron[4].n1023@7"
    assert str(Site("embed", pos=2)) == "embed@2"
    assert parse_site("k[2].h0") == Site("k", 2, 0, None)
    assert parse_site("resid_pre[5]@-3").pos == -3
    assert Site("head", 1, 2, 3).point == HookPoint("head", 1)
    assert str(HookPoint("embed", None)) == "embed" and str(HookPoint("q", 3)) == "q[3]"


@pytest.mark.parametrize(
    "text",
    ["", "head", "head[1.5]", "head[1].h", "head[1]h2", "head[1].x2", "neuron[1].h2", "head[1].n2", "HEAD[1]",
     "head[1]@", "head[1]@+2", "resid_pre[1].h0", "embed[0]", "mlp_out[2].n4", "resid_pre[1]@1@2", "resid_pre [1]"],
)
def test_malformed_rejected(text):
    with pytest.raises(SiteError):
        parse_site(text)


def test_spec_parse():
    assert SiteSpec.parse("head") == SiteSpec("head", per_unit=True)
    assert SiteSpec.parse("head:layer") == SiteSpec("head", per_unit=False)
    assert SiteSpec.parse("neuron").unit_axis() == "neuron"
    assert SiteSpec.parse("k").unit_axis() == "kv_head"
    assert SiteSpec.parse("resid_pre", positions="all") == SiteSpec("resid_pre", positions="all")
    assert SiteSpec.parse("resid_pre").unit_axis() is None
