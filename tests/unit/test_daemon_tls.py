"""The IdP clients' TLS context: built once per CA setting, honouring SSL_CERT_FILE / SSL_CERT_DIR (SPEC §5)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from serve.daemon import idp_ssl_context


def test_the_context_is_built_once_and_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    first = idp_ssl_context()
    assert first is idp_ssl_context()
    assert first.verify_mode is ssl.CERT_REQUIRED and first.check_hostname


def test_ssl_cert_file_picks_another_bundle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    default = idp_ssl_context()
    empty_dir = tmp_path / "certs"
    empty_dir.mkdir()
    monkeypatch.setenv("SSL_CERT_DIR", str(empty_dir))
    from_dir = idp_ssl_context()
    assert from_dir is not default
    assert from_dir.cert_store_stats()["x509_ca"] == 0  # only what SSL_CERT_DIR holds (nothing)
    assert default.cert_store_stats()["x509_ca"] > 0
