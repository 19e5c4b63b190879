"""A hub id without network fails at once (one TCP probe), naming how to load a local folder.

Without the probe, ``from_pretrained`` retries its HEAD request five times with back-off (~30 s
measured on a machine with no network). Here the hub endpoint is a local port nobody listens on,
and ``AutoConfig.from_pretrained`` is replaced by a function that fails the test: the error must
come from the probe, before transformers is asked.
"""

from __future__ import annotations

import socket

import pytest

from patchtrace.models import hub
from patchtrace.models.load import ModelLoadError, load_model


@pytest.fixture
def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connection is refused at once
    return port


def test_unreachable_hub_is_detected(monkeypatch, closed_port):
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    why = hub.unreachable_reason()
    assert why is not None and f"127.0.0.1:{closed_port}" in why
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "offline" in (hub.unreachable_reason() or "")


def test_reachable_endpoint_is_not_reported(monkeypatch):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.delenv(v, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")
        assert hub.unreachable_reason() is None
    finally:
        srv.close()


def test_hub_id_without_network_fails_before_transformers_is_asked(monkeypatch, closed_port):
    import transformers

    def never(*a, **k):
        raise AssertionError("transformers was asked (it would retry for ~30 s)")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", never)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(ModelLoadError, match=r"nobody-xyz/no-such-model.*unreachable.*--model DIR"):
        load_model("nobody-xyz/no-such-model")
