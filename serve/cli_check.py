"""`qwen-serve check`: ask each configured identity provider what a login would, without running the daemon.

The configuration is loaded as `qwen-serve run` loads it, the providers are the daemon's own classes, and
the IdP client has the daemon's settings (TLS context, timeouts, proxies from the environment, loopback
reached directly), so a check sees what a login would see. Per provider:

- rfc8628: discovery (unless both endpoints are configured); whether the token endpoint accepts the client
  (`Rfc8628Provider.probe_client`: a token request for a device code no IdP issued, which an IdP that knows
  the client refuses for the code alone); whether the device authorization endpoint answers.
- qwen-oauth: whether its base URL answers (it has no discovery).
- `--start`: one real device authorization request instead of the last step. Its user code and URL are
  shown; its device code never is, and simply expires unused at the IdP.

Each problem is printed with its failure class, the facts behind it and its fix: the diagnosis and hint a
failed login would carry (`serve.errors.Diagnosis`). Exit 0 when every provider passed, 1 when any failed,
2 for a bad flag, an unknown provider or a bad configuration key.

`serve.cli` imports this module for its command table, so httpx, the providers and the daemon's settings
are imported only when a check runs: the other commands start no slower.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Literal, TextIO

import trio

from serve.audit import sanitize
from serve.config import Config, load_config
from serve.errors import ConfigError, Diagnosis, UpstreamError

if TYPE_CHECKING:
    import httpx

    from serve.providers.base import DeviceFlowProvider
    from serve.providers.rfc8628 import Rfc8628Provider

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

CHECK_DESCRIPTION = """\
Check each configured identity provider (or those named) without running the daemon: discovery, the
client, the endpoints; with --start, also one real device authorization request."""

CHECK_EPILOG = """\
what is checked, with the configuration `qwen-serve run` would use and the daemon's own IdP client
settings (SSL_CERT_FILE, HTTPS_PROXY and NO_PROXY apply; a loopback IdP is always reached directly):
  rfc8628      discovery (unless both endpoints are configured); whether the token endpoint accepts
               the client (a token request for a device code no IdP issued: an IdP that knows the
               client refuses only the code, one that does not answers invalid_client); whether the
               device authorization endpoint answers
  qwen-oauth   whether base_url answers
  --start      also one real device authorization request per provider: its user code and URL are
               shown, its device code never is (it expires unused at the IdP)

Each problem is printed with its class (idp_unreachable, idp_timeout, discovery_failed, client_rejected,
request_rejected, client_secret_unavailable, bad_idp_reply), the facts behind it and what to fix: the
`failure` and `hint` a failed login's 502 carries. Each step is bounded by device_flow.start_timeout_s.

exit codes:
  0  every provider checked passed (warnings allowed)
  1  at least one provider failed
  2  a bad flag, an unknown PROVIDER (the configured ones are listed) or a bad configuration key

examples:
  qwen-serve check --config ~/.config/qwen-serve.toml
  qwen-serve check keycloak --start
"""


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="a TOML file layered over the defaults, as for `run`; default: $QWEN_SERVE_CONFIG if set",
    )
    parser.add_argument(
        "--start",
        action="store_true",
        help="also make one real device authorization request per provider (its device code is never shown)",
    )
    parser.add_argument("providers", nargs="*", metavar="PROVIDER", help="the providers to check (default: all)")


def run_check(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """The `check` command: load the configuration as `run` does, check, print, return the exit code."""
    from serve import cli  # serve.cli imports this module for its command table: import it once running

    try:
        config = load_config(cli.config_files(args, env), env=env)
    except ConfigError as exc:
        return cli.fail_config(exc)
    try:
        return trio.run(partial(check_providers, config, args.providers, start=args.start, env=env, out=sys.stdout))
    except KeyboardInterrupt:
        print("qwen-serve: check interrupted", file=sys.stderr)
        return 130


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of a provider's verdict: what was checked, how it went, the facts, and the fix."""

    status: Literal["ok", "warn", "FAIL"]
    what: str
    detail: str = ""
    fix: str | None = None


async def check_providers(
    config: Config, provider_ids: Sequence[str], *, start: bool, env: Mapping[str, str], out: TextIO
) -> int:
    """Check `provider_ids` (all when empty) in configuration order and print a verdict for each on `out`.

    Returns the exit code. An unknown id prints one line on stderr naming the configured ones (exit 2).
    """
    from serve.daemon import describe_providers, idp_client
    from serve.providers import build_providers

    described = describe_providers(config)
    async with idp_client() as http:
        providers = build_providers(config, http, env=env)
        headlines = dict(zip(providers, described, strict=True))
        unknown = [provider_id for provider_id in provider_ids if provider_id not in providers]
        if unknown or not providers:
            configured = ", ".join(providers) or "none"
            named = f"unknown provider {sanitize(unknown[0])}; " if unknown else ""
            print(f"qwen-serve: {named}configured providers: {configured}", file=sys.stderr)
            return EXIT_USAGE
        chosen = [provider_id for provider_id in providers if not provider_ids or provider_id in provider_ids]
        failed = 0
        for provider_id in chosen:
            findings = await _check(providers[provider_id], config, http, start=start)
            verdict = "FAIL" if any(finding.status == "FAIL" for finding in findings) else "ok"
            failed += verdict == "FAIL"
            out.write(f"{headlines[provider_id]}\n")
            for finding in findings:
                out.write(_format(finding))
            out.write(f"  => {verdict}\n\n")
            out.flush()
    out.write(f"{len(chosen)} provider(s) checked: {len(chosen) - failed} ok, {failed} failed\n")
    return EXIT_FAILED if failed else EXIT_OK


def _format(finding: Finding) -> str:
    line = f"  {finding.status:<5} {sanitize(finding.what)}"
    if finding.detail:
        line += f" ({sanitize(finding.detail)})"
    line += "\n"
    if finding.fix is not None:
        line += f"        fix: {finding.fix}\n"
    return line


async def _check(
    provider: DeviceFlowProvider, config: Config, http: httpx.AsyncClient, *, start: bool
) -> list[Finding]:
    from serve.providers.rfc8628 import Rfc8628Provider

    bound_s = config.device_flow.start_timeout_s  # the registry's bound on a login's start
    if isinstance(provider, Rfc8628Provider):
        return await _check_rfc8628(provider, config, http, start=start, bound_s=bound_s)
    if start:
        return [await _check_start(provider, bound_s)]
    return [await _check_answers("base_url", config.qwen_oauth.base_url, http, bound_s)]


async def _check_rfc8628(
    provider: Rfc8628Provider, config: Config, http: httpx.AsyncClient, *, start: bool, bound_s: float
) -> list[Finding]:
    (settings,) = (p for p in config.providers if p.provider_id == provider.provider_id)
    configured = settings.device_authorization_endpoint is not None
    step = "endpoints" if configured else "discovery"
    try:
        with trio.fail_after(bound_s):
            endpoints = await provider.endpoints()
    except UpstreamError as exc:
        return [_failed(step, exc.diagnosis)]
    except trio.TooSlowError:
        return [_failed(step, _timed_out(bound_s))]
    pkce = "S256" in endpoints.code_challenge_methods_supported
    found = (
        f"device_authorization_endpoint {endpoints.device_authorization_endpoint}, "
        f"token_endpoint {endpoints.token_endpoint}"
    )
    if configured:
        findings = [Finding("ok", "endpoints: configured, no discovery", found)]
    else:
        findings = [
            Finding("ok", "discovery: the issuer's metadata is usable", found + (", PKCE S256" if pkce else ""))
        ]

    try:
        with trio.fail_after(bound_s):
            probe = await provider.probe_client()
    except UpstreamError as exc:
        return [*findings, _failed("client", exc.diagnosis)]
    except trio.TooSlowError:
        return [*findings, _failed("client", _timed_out(bound_s))]
    if probe.verdict == "accepted":
        what = f"client: the token endpoint accepts client_id {settings.client_id}"
        findings.append(Finding("ok", what, f"it refused only a made-up device code: {probe.detail}"))
    elif probe.verdict == "unclear":
        assert probe.diagnosis is not None
        what = "client: the token endpoint's answer does not tell whether it accepts the client"
        fix = f"{probe.diagnosis.hint}; `qwen-serve check --start` makes one real device authorization request"
        findings.append(Finding("warn", what, probe.detail, fix))
    else:
        return [*findings, _failed("client", probe.diagnosis)]

    if start:
        findings.append(await _check_start(provider, bound_s))
    else:
        url = endpoints.device_authorization_endpoint
        findings.append(await _check_answers("device_authorization_endpoint", url, http, bound_s))
    return findings


async def _check_start(provider: DeviceFlowProvider, bound_s: float) -> Finding:
    """One real device authorization request, through the provider's own `start` (as a login makes it)."""
    try:
        with trio.fail_after(bound_s):
            authorization = await provider.start()
    except UpstreamError as exc:
        return _failed("device authorization", exc.diagnosis)
    except trio.TooSlowError:
        return _failed("device authorization", _timed_out(bound_s))
    # The device code is a credential in the making: never shown. The user code and URL are what a person sees.
    expiry = f" and expires unused in {authorization.expires_in:g} s" if authorization.expires_in else ""
    shown = (
        f"user code {authorization.user_code} at {authorization.verification_uri}; the device code is not shown{expiry}"
    )
    return Finding("ok", "device authorization: the IdP issued a device code", shown)


async def _check_answers(name: str, url: str, http: httpx.AsyncClient, bound_s: float) -> Finding:
    """Whether `url` answers HTTP at all: a GET, whose status is shown but not judged (no code is minted)."""
    import httpx

    from serve.providers.oauth import ReplyTooLarge, idp_host, send, transport_diagnosis

    request = http.build_request("GET", url, headers={"Accept": "application/json"})
    where = idp_host(request.url)
    try:
        with trio.fail_after(bound_s):
            reply = await send(http, request)
    except trio.TooSlowError:
        return _failed(name, _timed_out(bound_s))
    except (httpx.HTTPError, ReplyTooLarge) as exc:
        return _failed(name, transport_diagnosis(exc, where))
    return Finding("ok", f"{name}: answers", f"HTTP {reply.status_code} to a GET from {where}")


def _failed(step: str, diagnosis: Diagnosis | None) -> Finding:
    if diagnosis is None:  # every provider path diagnoses its failures; a bare UpstreamError is a bug
        return Finding("FAIL", f"{step}: failed")
    return Finding("FAIL", f"{step}: {diagnosis.failure.value}", diagnosis.detail, diagnosis.hint)


def _timed_out(bound_s: float) -> Diagnosis:
    from serve.providers.oauth import timed_out

    return timed_out("answer", "start_timeout_s", bound_s)
