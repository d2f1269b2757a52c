"""API keys: who a request is, from its ``authorization: Bearer <key>`` (gRPC metadata or HTTP header).

The config holds only the SHA-256 of each key (hex), never the key: a leaked config or keys file does
not leak a credential. A fast unsalted hash is the usual practice for API tokens (GitHub, Stripe and
PyPI store token digests the same way) because the keys are 256-bit random strings made by
``new_key``, not passwords a person chose: nobody can guess or brute-force a preimage, so a slow
password hash (bcrypt, argon2) would add milliseconds to every request and no safety. A lookup is
one hash and one dict probe.

Example::

    auth:
      keys:
        - {tenant: acme, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08}
        - {tenant: acme-batch, sha256: ..., cache_group: acme}   # shares acme's prefix cache
      keys_file: /etc/pdserve/keys.yaml     # more entries in the same shape (a YAML list)
      cache_groups: {research: [alice, bob]}  # the other way to let tenants share prefix cache
      allow_unauthenticated: false          # keyless on a non-loopback address needs this set

With no keys (and no keys file) auth is off: the tenant is what the request names, as before. Then the
ingress refuses to start on an address other than loopback unless ``allow_unauthenticated`` is set
(``check_exposure``). ``pdserve keys new --tenant T`` prints a fresh key and its config line.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, ValidationError, model_validator

from cluster.config_errors import ConfigError, describe_validation_error
from engine.config import STRICT_FROZEN

KEY_PREFIX = "pds-"
GROUP_SALT_PREFIX = "group:"
MAX_TENANT_LENGTH = 256  # cluster.validation.MAX_ID_LENGTH: the longest tenant_id a request may carry

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
TenantName = Annotated[str, Field(min_length=1, max_length=MAX_TENANT_LENGTH)]


class ApiKeyEntry(BaseModel):
    """One key: its digest, the tenant it names, and optionally the cache group it shares."""

    model_config = STRICT_FROZEN

    tenant: TenantName
    sha256: Sha256Hex  # hashlib.sha256(key.encode()).hexdigest()
    cache_group: TenantName | None = None  # tenants of one group share prefix-cache blocks
    admin: bool = False  # ClusterInfo shows this key every tenant's usage (others: their own)


class AuthConfig(BaseModel):
    """The ``auth:`` section (module docstring)."""

    model_config = STRICT_FROZEN

    keys: list[ApiKeyEntry] = Field(default_factory=list)
    keys_file: str | None = None  # a YAML list of entries shaped like ``keys``; read by the ingress
    cache_groups: dict[TenantName, list[TenantName]] = Field(default_factory=dict)
    allow_unauthenticated: bool = False  # serve keyless on a non-loopback address (behind your own auth)

    @model_validator(mode="after")
    def _check(self) -> AuthConfig:
        seen: dict[str, str] = {}
        for group, tenants in self.cache_groups.items():
            for tenant in tenants:
                if tenant in seen:
                    raise ValueError(f"cache_groups.{group}: {tenant!r} is already in group {seen[tenant]!r}")
                seen[tenant] = group
        _check_entries(tuple(self.keys), "keys")
        return self

    @property
    def is_enabled(self) -> bool:
        """Keys are required: some are configured here or in a keys file."""
        return bool(self.keys) or self.keys_file is not None


def _check_entries(entries: tuple[ApiKeyEntry, ...], where: str) -> None:
    digests: set[str] = set()
    for index, entry in enumerate(entries):
        if entry.sha256 in digests:
            raise ValueError(f"{where}[{index}].sha256: the same key digest is listed twice")
        digests.add(entry.sha256)


def hash_key(key: str) -> str:
    """The digest the config stores for ``key``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh API key: 32 random bytes (256 bits), URL-safe base64, with a recognizable prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """Who a request is: its tenant (metering, rate limits) and its cache salt (the tenant's cache
    group, or the tenant itself). ``is_authenticated``: the tenant came from a key."""

    tenant: str
    cache_salt: str
    is_authenticated: bool
    is_admin: bool = False


class AuthError(Exception):
    """A request without a valid key (UNAUTHENTICATED / HTTP 401)."""


class KeyStore:
    """Digest -> entry, from the config and its keys file; ``principal`` answers each request."""

    def __init__(self, config: AuthConfig, entries: tuple[ApiKeyEntry, ...]) -> None:
        self.config = config
        self.is_enabled = config.is_enabled
        self._entries = {entry.sha256: entry for entry in entries}
        groups = config.cache_groups.items()
        self._group_of = {tenant: group for group, tenants in groups for tenant in tenants}

    @classmethod
    def from_config(cls, config: AuthConfig) -> KeyStore:
        """The store of ``config``, reading its keys file (``ConfigError`` naming the file when bad)."""
        entries = tuple(config.keys)
        if config.keys_file is not None:
            entries = entries + read_keys_file(config.keys_file)
        try:
            _check_entries(entries, "auth.keys + auth.keys_file")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        return cls(config, entries)

    def cache_salt(self, tenant: str, key_group: str | None = None) -> str:
        """The block-hash salt of ``tenant``: ``group:<name>`` of its key's cache group or of its
        ``cache_groups`` group (the prefix keeps a group apart from a tenant of the same name), or itself."""
        group = key_group or self._group_of.get(tenant)
        return GROUP_SALT_PREFIX + group if group is not None else tenant

    def principal(self, authorization: str | None, claimed_tenant: str) -> Principal:
        """Who sends a request with this ``authorization`` value (``Bearer <key>``) and tenant field.

        Keys off: the claimed tenant, unauthenticated. Keys on: the key's tenant; ``AuthError`` when the
        header is missing, not a bearer token, or an unknown key (the caller checks the claimed tenant)."""
        if not self.is_enabled:
            return Principal(claimed_tenant, self.cache_salt(claimed_tenant), is_authenticated=False)
        key = bearer_token(authorization)
        if key is None:
            raise AuthError("no API key: send 'authorization: Bearer <key>'")
        entry = self._entries.get(hash_key(key))
        if entry is None:
            raise AuthError("invalid API key")
        salt = self.cache_salt(entry.tenant, entry.cache_group)
        return Principal(entry.tenant, salt, is_authenticated=True, is_admin=entry.admin)


def bearer_token(authorization: str | None) -> str | None:
    """The token of ``Bearer <token>`` (scheme case-insensitive, RFC 6750), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def read_keys_file(path: str) -> tuple[ApiKeyEntry, ...]:
    """The entries of a keys file: a YAML list of ``{tenant, sha256, cache_group}`` mappings."""
    import yaml

    try:
        data: Any = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"auth.keys_file: cannot read {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"auth.keys_file: {path} is not valid YAML: {error}") from None
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError(f"auth.keys_file: {path} must hold a list of keys, got {type(data).__name__}")
    entries = []
    for index, item in enumerate(data):
        try:
            entries.append(ApiKeyEntry.model_validate(item))
        except ValidationError as error:
            where = f"auth.keys_file: {path}[{index}]."
            raise ConfigError(where + describe_validation_error(error)) from None
    return tuple(entries)


def is_loopback(host: str) -> bool:
    """``host`` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: may resolve anywhere


def check_exposure(auth: AuthConfig, hosts: dict[str, str]) -> None:
    """Refuse (``ConfigError``) to serve keyless on a non-loopback address unless allowed.

    ``hosts``: the dotted field -> host of each API server that will run (``grpc.host``, ``http.host``)."""
    if auth.is_enabled or auth.allow_unauthenticated:
        return
    for field, host in hosts.items():
        if not is_loopback(host):
            raise ConfigError(
                f"{field}: {host} is not a loopback address and auth has no keys; add auth.keys (pdserve "
                "keys new --tenant NAME) or set auth.allow_unauthenticated: true"
            )
