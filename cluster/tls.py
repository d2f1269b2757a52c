"""TLS for the ingress's gRPC and HTTP servers, by config (``tls: {cert_file, key_file}``).

One certificate chain and private key (PEM files, read by each ingress replica at start) serve both
APIs. Clients verify it with the CA that signed it: ``grpc.ssl_channel_credentials(root_certificates=
ca_pem)`` for gRPC, ``https://`` with that CA for HTTP (``openai.OpenAI(http_client=httpx.Client(
verify=ca_file))``). Off by default (plaintext on 127.0.0.1, as before). No client certificates (mTLS):
API keys authenticate clients (``cluster.auth``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from pydantic import BaseModel, model_validator

from cluster.config_errors import ConfigError
from engine.config import STRICT_FROZEN


class TlsConfig(BaseModel):
    """The ``tls:`` section: set both files to serve gRPC and HTTP over TLS."""

    model_config = STRICT_FROZEN

    cert_file: str | None = None  # PEM: the server certificate (then any intermediates)
    key_file: str | None = None  # PEM: its private key

    @model_validator(mode="after")
    def _both_or_neither(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file/key_file: set both to serve TLS, or neither")
        return self

    @property
    def is_enabled(self) -> bool:
        return self.cert_file is not None


def _read(field: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"tls.{field}: cannot read {path}: {error.strerror or error}") from None


def grpc_server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """Server credentials of ``tls`` (files read now: ``ConfigError`` naming the field when unreadable)."""
    assert tls.cert_file is not None and tls.key_file is not None
    key, chain = _read("key_file", tls.key_file), _read("cert_file", tls.cert_file)
    return grpc.ssl_server_credentials([(key, chain)])


def uvicorn_ssl_options(tls: TlsConfig | None) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments serving ``tls`` (none when off)."""
    if tls is None or not tls.is_enabled:
        return {}
    for field in ("cert_file", "key_file"):
        _read(field, getattr(tls, field))  # a clear error now rather than uvicorn's at start
    return {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
