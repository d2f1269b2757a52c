"""cluster.auth and cluster.tenancy without a cluster: keys, tenants, cache salts, metering."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest
from prometheus_client import CollectorRegistry

from cluster.auth import AuthConfig, AuthError, KeyStore, bearer_token, check_exposure, hash_key, new_key
from cluster.config import ClusterConfig, ConfigError
from cluster.rate_limit import RateLimitConfig
from cluster.tenancy import Tenancy, TenancyError, http_error
from cluster.validation import ValidRequest
from protos import pdserve_pb2 as pb
from worker_common.messages import SamplingSpec

KEY_A, KEY_B, KEY_C = new_key(), new_key(), new_key()


def _auth(**extra: object) -> AuthConfig:
    keys = [
        {"tenant": "a", "sha256": hash_key(KEY_A)},
        {"tenant": "b", "sha256": hash_key(KEY_B), "admin": True},
        {"tenant": "c", "sha256": hash_key(KEY_C), "cache_group": "team"},
    ]
    return AuthConfig.model_validate({"keys": keys, **extra})


def _request(tenant: str = "", num_prompt: int = 4) -> ValidRequest:
    return ValidRequest("r1", tuple(range(num_prompt)), SamplingSpec(max_tokens=4), tenant)


def test_keys_are_random_and_stored_as_their_sha256() -> None:
    assert KEY_A != KEY_B and len(KEY_A) > 40
    assert hash_key(KEY_A) == hashlib.sha256(KEY_A.encode()).hexdigest()
    assert KEY_A not in _auth().model_dump_json()


def test_bearer_header_parsing() -> None:
    assert bearer_token(f"Bearer {KEY_A}") == KEY_A
    assert bearer_token(f"bearer  {KEY_A} ") == KEY_A
    for bad in (None, "", KEY_A, f"Basic {KEY_A}", "Bearer "):
        assert bearer_token(bad) is None


def test_key_names_the_tenant_and_a_group_becomes_the_salt() -> None:
    store = KeyStore.from_config(_auth())
    a = store.principal(f"Bearer {KEY_A}", "")
    assert (a.tenant, a.cache_salt, a.is_authenticated, a.is_admin) == ("a", "a", True, False)
    c = store.principal(f"Bearer {KEY_C}", "")
    assert (c.tenant, c.cache_salt) == ("c", "group:team")
    for header in (None, "Bearer pds-nope", f"Basic {KEY_A}"):
        with pytest.raises(AuthError):
            store.principal(header, "")


def test_keys_off_the_claimed_tenant_and_cache_groups_apply() -> None:
    store = KeyStore.from_config(AuthConfig.model_validate({"cache_groups": {"lab": ["x", "y"]}}))
    assert not store.is_enabled
    assert store.principal(None, "x").cache_salt == "group:lab"
    assert store.principal(None, "z").cache_salt == "z"


def test_keys_file_is_read_and_bad_entries_are_named(tmp_path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"- {{tenant: f, sha256: {hash_key('k' * 40)}}}\n")
    store = KeyStore.from_config(AuthConfig(keys_file=str(path)))
    assert store.principal("Bearer " + "k" * 40, "").tenant == "f"
    path.write_text("- {tenant: f, sha256: short}\n")
    with pytest.raises(ConfigError, match=r"keys.yaml\[0\].sha256"):
        KeyStore.from_config(AuthConfig(keys_file=str(path)))
    with pytest.raises(ConfigError, match="cannot read"):
        KeyStore.from_config(AuthConfig(keys_file=str(tmp_path / "missing.yaml")))


def test_keyless_on_a_public_address_is_refused_unless_allowed() -> None:
    hosts = {"grpc.host": "0.0.0.0", "http.host": "127.0.0.1"}
    with pytest.raises(ConfigError, match=r"grpc.host: 0.0.0.0 is not a loopback"):
        check_exposure(AuthConfig(), hosts)
    check_exposure(AuthConfig(allow_unauthenticated=True), hosts)
    check_exposure(_auth(), hosts)
    check_exposure(AuthConfig(), {"grpc.host": "127.0.0.1", "http.host": "::1"})
    default = ClusterConfig()
    check_exposure(default.auth, {"grpc.host": default.grpc.host, "http.host": default.http.host})


def test_admit_refuses_another_tenant_in_the_field_and_replaces_the_salt() -> None:
    tenancy = Tenancy(_auth(), RateLimitConfig())
    principal = tenancy.authenticate(f"Bearer {KEY_A}")
    with pytest.raises(TenancyError) as refused:
        tenancy.admit(principal, _request("b"), claimed_field="tenant_id")
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.message.startswith("tenant_id:")
    assert tenancy.admit(principal, _request("a"), "tenant_id").request.tenant == "a"
    ignored = tenancy.admit(principal, _request("b"), claimed_field=None)  # HTTP's user: not a claim
    assert (ignored.tenant, ignored.request.tenant) == ("a", "a")
    with pytest.raises(TenancyError) as missing:
        tenancy.authenticate(None)
    assert missing.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_http_errors_have_openai_shape_and_retry_after() -> None:
    error = http_error(TenancyError(grpc.StatusCode.UNAUTHENTICATED, "invalid API key"))
    assert error.status == 401
    assert error.body() == {
        "error": {"message": "invalid API key", "type": "invalid_request_error", "param": None,
                  "code": "invalid_api_key"}
    }
    limited = http_error(TenancyError(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit: x", 2.2))
    assert (limited.status, limited.headers(), limited.body()["error"]["code"]) == (
        429, {"Retry-After": "3"}, "rate_limit_exceeded"
    )
    trailer = TenancyError(grpc.StatusCode.RESOURCE_EXHAUSTED, "x", 0.2).trailing_metadata()
    assert trailer == (("retry-after", "1"),)


async def _responses(num_messages: int) -> object:
    for index in range(num_messages):
        response = pb.GenerateResponse(token_ids=[1, 2])
        if index == num_messages - 1:
            response.finish_reason = pb.FINISH_REASON_LENGTH
            response.usage.cached_tokens = 3
        yield response


def test_meter_counts_what_is_sent_in_clusterinfo_and_prometheus() -> None:
    registry = CollectorRegistry()
    tenancy = Tenancy(_auth(), RateLimitConfig(), registry)
    admitted = tenancy.admit(tenancy.authenticate(f"Bearer {KEY_A}"), _request(num_prompt=7), "tenant_id")

    async def consume() -> int:
        return sum([len(r.token_ids) async for r in tenancy.meter(admitted, _responses(3))])

    assert asyncio.run(consume()) == 6
    (usage,) = tenancy.usage_for(tenancy.authenticate(f"Bearer {KEY_A}"))
    counts = (usage.requests, usage.prompt_tokens, usage.cached_tokens, usage.generated_tokens)
    assert (usage.tenant, *counts) == ("a", 1, 7, 3, 6)
    assert registry.get_sample_value("pdserve:tenant_generated_tokens_total", {"tenant": "a"}) == 6
    assert registry.get_sample_value("pdserve:tenant_prompt_tokens_total", {"tenant": "a"}) == 7
    assert tenancy.usage_for(tenancy.authenticate(f"Bearer {KEY_C}")) == []  # not its tenant's
    assert len(tenancy.usage_for(tenancy.authenticate(f"Bearer {KEY_B}"))) == 1  # admin sees all


def test_tls_config_needs_both_files_and_names_an_unreadable_one(tmp_path) -> None:
    from cluster.tls import TlsConfig, grpc_server_credentials, uvicorn_ssl_options

    with pytest.raises(ValueError, match="set both"):
        TlsConfig(cert_file="x.pem")
    assert not TlsConfig().is_enabled and uvicorn_ssl_options(TlsConfig()) == {}
    missing = TlsConfig(cert_file=str(tmp_path / "cert.pem"), key_file=str(tmp_path / "key.pem"))
    with pytest.raises(ConfigError, match=r"tls.key_file: cannot read"):
        grpc_server_credentials(missing)
    with pytest.raises(ConfigError, match=r"tls.cert_file: cannot read"):
        uvicorn_ssl_options(missing)
