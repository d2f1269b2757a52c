"""Tenants at the ingress: who a request is (``cluster.auth``), whether its token budget lets it in
(``cluster.rate_limit``), and what it used (``UsageMeter``). One ``Tenancy`` per ingress replica,
shared by the gRPC servicer and the HTTP app, each of which calls it at three seams:

1. ``authenticate(authorization)`` before anything else (UNAUTHENTICATED / HTTP 401 without a valid key
   when keys are on; ``None`` when they are off);
2. ``admit(principal, request, claimed_field)`` once the request is validated: the tenant is the key's,
   a request field that names another tenant is refused (gRPC ``tenant_id``: PERMISSION_DENIED) or,
   for HTTP's ``user`` (OpenAI's end-user id, not a tenant), ignored; the input tokens are charged;
   the request's ``tenant`` becomes the cache salt (the tenant's cache group, or the tenant);
3. ``meter(admitted, stream)`` around the response stream: output tokens are charged and metered as
   they are sent, prompt tokens once the first token is out, cached tokens from the final usage.

Usage lives in plain counters (``ClusterInfo.tenant_usage``) and in the ingress's Prometheus registry
(``pdserve:tenant_{prompt,cached,generated}_tokens_total{tenant}``, ``pdserve:tenant_requests_total``,
``pdserve:tenant_rate_limited_requests_total``). Past ``MAX_METERED_TENANTS`` tenants (only possible
with keys off, where clients name tenants freely) the rest are metered as ``OTHER_TENANT``.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from cluster.auth import AuthConfig, AuthError, KeyStore, Principal
from cluster.rate_limit import NeverFits, RateLimitConfig, RateLimited, RateLimiter
from cluster.validation import RequestError, ValidRequest
from protos import pdserve_pb2 as pb

MAX_METERED_TENANTS = 1000
OTHER_TENANT = "_other_"


class TenancyError(RequestError):
    """A refusal by tenancy: a gRPC status, a message, and for rate limits the seconds to wait."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(code, message)
        self.retry_after_s = retry_after_s

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """``retry-after`` (whole seconds, at least 1, as HTTP's header) when there is a hint."""
        if self.retry_after_s is None:
            return ()
        return (("retry-after", str(retry_after_header(self.retry_after_s))),)


def retry_after_header(seconds: float) -> int:
    """HTTP's ``Retry-After`` is whole seconds: rounded up, at least 1."""
    return max(1, math.ceil(seconds))


@dataclass(frozen=True)
class Admitted:
    """An admitted request: ``request.tenant`` is the cache salt; ``tenant`` is who pays."""

    request: ValidRequest
    tenant: str


@dataclass
class TenantTotals:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    rate_limited: int = 0


@dataclass
class UsageMeter:
    """Per-tenant totals since this ingress replica started, mirrored into Prometheus counters."""

    registry: Any = None  # the ingress's CollectorRegistry (None: plain counters only)
    totals: dict[str, TenantTotals] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from prometheus_client import Counter

        def counter(name: str, doc: str) -> Any:
            return Counter("pdserve:" + name, doc, ["tenant"], registry=self.registry)

        self._counters = {
            "requests": counter("tenant_requests", "Requests admitted, by tenant"),
            "prompt_tokens": counter("tenant_prompt_tokens", "Prompt tokens of requests that got a token"),
            "cached_tokens": counter("tenant_cached_tokens", "Prompt tokens served from the prefix cache"),
            "generated_tokens": counter("tenant_generated_tokens", "Tokens streamed to the tenant's clients"),
            "rate_limited": counter("tenant_rate_limited_requests", "Requests refused by token rate limits"),
        }

    def add(self, tenant: str, what: str, amount: int = 1) -> None:
        if amount <= 0:
            return
        if tenant not in self.totals and len(self.totals) >= MAX_METERED_TENANTS:
            tenant = OTHER_TENANT
        totals = self.totals.setdefault(tenant, TenantTotals())
        setattr(totals, what, getattr(totals, what) + amount)
        self._counters[what].labels(tenant).inc(amount)

    def messages(self, tenant: str | None = None) -> list[pb.TenantUsage]:
        """``ClusterInfo.tenant_usage``: every tenant's (or one tenant's) totals, sorted by tenant."""
        return [
            pb.TenantUsage(tenant=name, **vars(totals))
            for name, totals in sorted(self.totals.items())
            if tenant is None or name == tenant
        ]


class Tenancy:
    """Keys, rate limits and metering of one ingress replica (module docstring)."""

    def __init__(
        self,
        auth: AuthConfig,
        rate_limits: RateLimitConfig,
        registry: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys = KeyStore.from_config(auth)
        self.limiter = RateLimiter(rate_limits, clock)
        self.usage = UsageMeter(registry)

    @classmethod
    def for_config(cls, config: Any, registry: Any = None) -> Tenancy:
        """The tenancy of a ``ClusterConfig`` (its ``auth`` and ``rate_limits``); reads the keys file."""
        return cls(config.auth, config.rate_limits, registry)

    @classmethod
    def disabled(cls) -> Tenancy:
        """Keys off, no rate limits, usage in plain counters (a servicer or app built without one)."""
        return cls(AuthConfig(), RateLimitConfig())

    @property
    def is_auth_enabled(self) -> bool:
        return self.keys.is_enabled

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The key's principal; None when keys are off; ``TenancyError`` (UNAUTHENTICATED) without a
        valid key."""
        if not self.keys.is_enabled:
            return None
        try:
            return self.keys.principal(authorization, "")
        except AuthError as error:
            raise TenancyError(grpc.StatusCode.UNAUTHENTICATED, str(error)) from None

    def admit(
        self, principal: Principal | None, request: ValidRequest, claimed_field: str | None
    ) -> Admitted:
        """Admit a validated request (module docstring, seam 2); ``claimed_field``: the request field
        that names a tenant and is refused when it names another one (None: not a tenant claim)."""
        if principal is None:
            salt = self.keys.cache_salt(request.tenant)
            principal = Principal(request.tenant, salt, is_authenticated=False)
        elif claimed_field is not None and request.tenant and request.tenant != principal.tenant:
            raise TenancyError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{claimed_field}: the API key belongs to another tenant; leave {claimed_field} empty or "
                "set it to the key's tenant",
            )
        tenant = principal.tenant
        try:
            self.limiter.admit(tenant, len(request.prompt_token_ids))
        except RateLimited as error:
            self.usage.add(tenant, "rate_limited")
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            raise TenancyError(code, error.message, error.retry_after_s) from None
        except NeverFits as error:
            raise TenancyError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        self.usage.add(tenant, "requests")
        return Admitted(replace(request, tenant=principal.cache_salt), tenant)

    async def meter(
        self, admitted: Admitted, stream: AsyncIterator[pb.GenerateResponse]
    ) -> AsyncIterator[pb.GenerateResponse]:
        """``stream``, charging and metering each response before it is handed on (seam 3)."""
        tenant, is_first = admitted.tenant, True
        try:
            async for response in stream:
                if is_first:
                    self.usage.add(tenant, "prompt_tokens", len(admitted.request.prompt_token_ids))
                    is_first = False
                num_tokens = len(response.token_ids)
                self.usage.add(tenant, "generated_tokens", num_tokens)
                self.limiter.charge_output(tenant, num_tokens)
                if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    self.usage.add(tenant, "cached_tokens", response.usage.cached_tokens)
                yield response
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    # ---- the HTTP API's seams: the same, with refusals as OpenAI-shaped ``ApiError``s ------------------

    def http_principal(self, authorization: str | None) -> Principal | None:
        """``authenticate`` for the HTTP API: 401 in OpenAI's shape (``invalid_api_key``) without a key."""
        try:
            return self.authenticate(authorization)
        except TenancyError as error:
            raise http_error(error) from None

    def http_admit(self, principal: Principal | None, request: ValidRequest) -> Admitted:
        """``admit`` for the HTTP API: with keys on, ``user`` (OpenAI's end-user id) is not a tenant claim
        and is ignored; with keys off it names the tenant, as before."""
        try:
            return self.admit(principal, request, claimed_field=None)
        except TenancyError as error:
            raise http_error(error) from None

    def usage_for(self, principal: Principal | None) -> list[pb.TenantUsage]:
        """What ``ClusterInfo`` shows: every tenant with keys off or to an admin key, else the key's own."""
        if principal is None or principal.is_admin:
            return self.usage.messages()
        return self.usage.messages(principal.tenant)


def http_error(error: TenancyError) -> Any:
    """The HTTP API's ``ApiError`` for a tenancy refusal (401 ``invalid_api_key``, 429 with Retry-After)."""
    from cluster.openai_api.errors import ApiError, from_grpc

    if error.code == grpc.StatusCode.UNAUTHENTICATED:
        return ApiError(401, error.message, "invalid_request_error", None, "invalid_api_key")
    api_error = from_grpc(error.code, error.message)
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        api_error = replace(api_error, code="rate_limit_exceeded")  # OpenAI's code for a TPM limit
    if error.retry_after_s is not None:
        api_error = replace(api_error, retry_after_s=retry_after_header(error.retry_after_s))
    return api_error
