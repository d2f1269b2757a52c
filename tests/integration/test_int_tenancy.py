"""Issue 15, acceptance 5 (less the KV shares) and TLS: a cluster with API keys, a rate-limited tenant and
TLS on both APIs, built from keys and a self-signed CA made here. It runs as its own Serve application
beside the session's shared one (so the shared cluster is not redeployed) and is deleted at the end.

- without a key (or with a wrong one): UNAUTHENTICATED / HTTP 401 in OpenAI's error shape;
- tenant A gets no cached tokens from tenant B's prompt (the key's tenant salts the block hashes), cannot
  claim B in ``tenant_id`` (PERMISSION_DENIED), and HTTP's ``user`` does not move it into B's cache;
  two tenants of one cache group do share;
- rate limits: refused with RESOURCE_EXHAUSTED and a ``retry-after`` trailer / HTTP 429 + Retry-After;
- metering: ClusterInfo's and Prometheus's per-tenant sums equal what the clients received;
- TLS: clients that trust the CA connect; without it the handshake fails (gRPC and HTTPS).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest

from cluster.auth import hash_key, new_key
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc
from tests.integration.int_helpers import StreamResult, cluster_config, make_prompts

pytestmark = pytest.mark.integration

TENANTS = ("a", "b", "c", "d", "limited", "meter", "ops")
OUTPUT_LIMIT = 30  # tokens per minute of tenant "limited" (0.5 per second)


def _make_certs(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it: (ca, cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pdserve test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


@dataclass
class Tenancy:
    grpc_address: str
    http_address: str
    ca_file: Path
    keys: dict[str, str]  # tenant -> key

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca_file.read_bytes())

    def metadata(self, tenant: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[tenant]}"),)

    def openai(self, tenant: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"https://{self.http_address}/v1",
            api_key=self.keys[tenant],
            max_retries=0,
            http_client=openai.DefaultHttpxClient(verify=self.ssl_context()),
        )

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def http(self, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        """A request without any key (the ``openai`` client insists on one): status, headers, body."""
        request = urllib.request.Request(f"https://{self.http_address}{path}", data=body)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, context=self.ssl_context(), timeout=30) as page:
                return page.status, dict(page.headers), page.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()


@pytest.fixture(scope="module")
def tenancy(ray_session, tmp_path_factory) -> Iterator[Tenancy]:
    from cluster.embedded import EmbeddedCluster

    ca, cert, key = _make_certs(tmp_path_factory.mktemp("tls"))
    keys = {tenant: new_key() for tenant in TENANTS}
    entries = [
        {"tenant": t, "sha256": hash_key(k), **({"cache_group": "cd"} if t in "cd" else {})}
        for t, k in keys.items()
    ]
    entries[TENANTS.index("ops")]["admin"] = True
    config = cluster_config(
        1, 1, {
            "app_name": "pdserve-tenancy",
            "auth.keys": entries,
            "rate_limits.tenants": {"limited": {"output_tokens_per_minute": OUTPUT_LIMIT,
                                                "input_tokens_per_minute": 1000}},
            "tls.cert_file": str(cert),
            "tls.key_file": str(key),
        },
    )
    cluster = EmbeddedCluster(config).start()
    try:
        yield Tenancy(cluster.grpc_address, cluster.http_address, ca, keys)
    finally:
        from ray import serve

        serve.delete(config.app_name, _blocking=False)  # Serve tears it down while the next tests run


def _generate(tenancy: Tenancy, tenant: str | None, request: pb.GenerateRequest) -> StreamResult:
    async def call() -> StreamResult:
        async with grpc.aio.secure_channel(tenancy.grpc_address, tenancy.credentials()) as channel:
            stub = pdserve_pb2_grpc.PDServeStub(channel)
            metadata = tenancy.metadata(tenant) if tenant else ()
            result = StreamResult()
            call = stub.Generate(request, timeout=60, metadata=metadata)
            try:
                async for response in call:
                    result.token_ids.extend(response.token_ids)
                    result.last = response
            except grpc.aio.AioRpcError as error:
                result.code, result.details = error.code(), error.details() or ""
                result.text = dict(error.trailing_metadata() or ()).get("retry-after", "")
            return result

    return asyncio.run(call())


def _prompt(index: int, length: int = 70) -> pb.GenerateRequest:
    ids = list(make_prompts(index + 1, seed=100 + index)[index]) * 3
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids[:length]), max_tokens=2, ignore_eos=True)


def test_without_a_valid_key_unauthenticated_and_http_401(tenancy: Tenancy) -> None:
    tenancy.keys["nobody"] = "pds-not-a-key"
    for tenant in (None, "nobody"):
        refused = _generate(tenancy, tenant, _prompt(0))
        assert refused.code == grpc.StatusCode.UNAUTHENTICATED, refused.details
    status, _, body = tenancy.http("/v1/completions", b'{"prompt": "hi", "max_tokens": 2}')
    error = json.loads(body)["error"]
    assert status == 401 and error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert tenancy.http("/v1/models")[0] == 401
    with pytest.raises(openai.AuthenticationError) as refused:
        tenancy.openai("nobody").completions.create(model=None, prompt="hi", max_tokens=2)  # type: ignore[arg-type]
    assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"
    assert [m.id for m in tenancy.openai("a").models.list().data]  # a key opens /v1/models


def test_tenants_never_reuse_each_others_prefix_and_cannot_claim_another(tenancy: Tenancy) -> None:
    request = _prompt(1)
    first, again = _generate(tenancy, "a", request), _generate(tenancy, "a", request)
    assert first.code == again.code == grpc.StatusCode.OK
    assert first.last.usage.cached_tokens == 0 and again.last.usage.cached_tokens >= 48
    assert _generate(tenancy, "b", request).last.usage.cached_tokens == 0  # same prompt, other tenant
    claimed = pb.GenerateRequest()
    claimed.CopyFrom(request)
    claimed.tenant_id = "a"
    refused = _generate(tenancy, "b", claimed)
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED, refused.details
    assert refused.details.startswith("tenant_id:")
    claimed.tenant_id = "b"  # its own tenant is fine: B's cache now holds the prompt
    assert _generate(tenancy, "b", claimed).last.usage.cached_tokens >= 48
    # HTTP: `user` is OpenAI's end-user id, not a tenant: with keys on it cannot move d into a's cache
    text_ids = list(request.token_ids.ids)
    reply = tenancy.openai("d").completions.create(model=None, prompt=text_ids, max_tokens=2, user="a")  # type: ignore[arg-type]
    assert reply.usage.prompt_tokens_details is None or not reply.usage.prompt_tokens_details.cached_tokens
    # a cache group is the one way to share: c and d are both in group "cd" (d just cached the prompt)
    assert _generate(tenancy, "c", request).last.usage.cached_tokens >= 48


def test_rate_limit_refuses_with_retry_after(tenancy: Tenancy) -> None:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[256, 5, 6, 7]), max_tokens=20, ignore_eos=True)
    assert len(_generate(tenancy, "limited", request).token_ids) == 20  # 30 -> 10 left
    assert len(_generate(tenancy, "limited", request).token_ids) == 20  # admitted with 10; 10 in debt now
    refused = _generate(tenancy, "limited", request)
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details
    assert "output tokens per minute (30)" in refused.details
    assert 15 <= int(refused.text) <= 21  # 10 tokens of debt at 0.5/s: ~20 s (less what refilled)
    with pytest.raises(openai.RateLimitError) as limited:
        tenancy.openai("limited").completions.create(model=None, prompt=[256, 5], max_tokens=2)  # type: ignore[arg-type]
    assert limited.value.status_code == 429 and int(limited.value.response.headers["retry-after"]) >= 15
    assert limited.value.body["code"] == "rate_limit_exceeded"
    too_big = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[65] * 1001), max_tokens=1)
    never = _generate(tenancy, "limited", too_big)
    assert never.code == grpc.StatusCode.INVALID_ARGUMENT and "1001 tokens" in never.details
    assert _generate(tenancy, "a", request).code == grpc.StatusCode.OK  # other tenants are not limited
    with grpc.secure_channel(tenancy.grpc_address, tenancy.credentials()) as channel:
        stub = pdserve_pb2_grpc.PDServeStub(channel)
        info = stub.ClusterInfo(pb.ClusterInfoRequest(), metadata=tenancy.metadata("limited"), timeout=30)
    assert info.tenant_usage[0].rate_limited == 2 and info.tenant_usage[0].requests == 2


def test_metering_sums_equal_what_the_clients_received(tenancy: Tenancy) -> None:
    received = {"prompt": 0, "cached": 0, "generated": 0}
    for index in range(4):  # gRPC: the same prompt twice, so some tokens are cached
        result = _generate(tenancy, "meter", _prompt(2 + index // 2))
        received["prompt"] += result.last.usage.prompt_tokens
        received["cached"] += result.last.usage.cached_tokens
        received["generated"] += len(result.token_ids)
    client = tenancy.openai("meter")
    reply = client.completions.create(model=None, prompt=[256, 9, 9, 9], max_tokens=5)  # type: ignore[arg-type]
    received["prompt"] += reply.usage.prompt_tokens
    received["generated"] += reply.usage.completion_tokens
    chunks = list(
        client.completions.create(
            model=None, prompt=[256, 8, 8], max_tokens=4, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
    )
    (final,) = [chunk for chunk in chunks if chunk.usage is not None]
    received["prompt"] += final.usage.prompt_tokens
    received["generated"] += final.usage.completion_tokens
    with grpc.secure_channel(tenancy.grpc_address, tenancy.credentials()) as channel:
        stub = pdserve_pb2_grpc.PDServeStub(channel)
        own = stub.ClusterInfo(pb.ClusterInfoRequest(), metadata=tenancy.metadata("meter"), timeout=30)
        every = stub.ClusterInfo(pb.ClusterInfoRequest(), metadata=tenancy.metadata("ops"), timeout=30)
    (usage,) = own.tenant_usage  # a tenant's key sees its own usage only
    assert usage.tenant == "meter" and usage.requests == 6
    metered = {"prompt": usage.prompt_tokens, "cached": usage.cached_tokens}
    metered["generated"] = usage.generated_tokens
    assert metered == received and received["cached"] > 0
    assert {u.tenant for u in every.tenant_usage} >= {"a", "b", "meter", "limited"}
    scrape = tenancy.http("/metrics")[2].decode()
    assert f'pdserve:tenant_generated_tokens_total{{tenant="meter"}} {float(received["generated"])}' in scrape
    assert f'pdserve:tenant_prompt_tokens_total{{tenant="meter"}} {float(received["prompt"])}' in scrape


def test_tls_needs_the_ca(tenancy: Tenancy) -> None:
    async def health(credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
        if credentials is None:
            channel = grpc.aio.insecure_channel(tenancy.grpc_address)
        else:
            channel = grpc.aio.secure_channel(tenancy.grpc_address, credentials)
        async with channel:
            try:
                await pdserve_pb2_grpc.PDServeStub(channel).Health(pb.HealthRequest(), timeout=5)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                return error.code()

    assert asyncio.run(health(tenancy.credentials())) == grpc.StatusCode.OK
    assert asyncio.run(health(grpc.ssl_channel_credentials())) == grpc.StatusCode.UNAVAILABLE  # system roots
    assert asyncio.run(health(None)) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
    assert tenancy.http("/health")[0] == 200
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"https://{tenancy.http_address}/health", timeout=30)


def test_cli_clients_send_the_key_over_tls(tenancy: Tenancy) -> None:
    from click.testing import CliRunner

    from cluster.cli import main

    common = ["--server", tenancy.grpc_address, "--tls-ca", str(tenancy.ca_file)]
    runner = CliRunner()
    answer = runner.invoke(main, ["generate", "hi", "--max-tokens", "3", "--json", *common],
                           env={"PDSERVE_API_KEY": tenancy.keys["ops"]})
    assert answer.exit_code == 0, answer.output
    assert json.loads(answer.output)["usage"]["completion_tokens"] == 3
    info = runner.invoke(main, ["info", "--api-key", tenancy.keys["ops"], *common])
    assert info.exit_code == 0, info.output
    assert "ops" in [usage["tenant"] for usage in json.loads(info.output)["tenantUsage"]]
    refused = runner.invoke(main, ["info", *common], env={"PDSERVE_API_KEY": ""})
    assert refused.exit_code == 1 and "UNAUTHENTICATED" in refused.output
