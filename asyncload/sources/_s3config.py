"""S3 settings: explicit options first, then the AWS environment variables, then a profile.

Resolution follows what the AWS CLI and SDKs do, so a machine already set up
for them works unchanged:

* credentials: ``S3Options`` keys, else ``S3Options.profile``, else
  ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
  else the profile named by ``AWS_PROFILE`` (or ``default``) in
  ``~/.aws/credentials`` and ``~/.aws/config`` (``AWS_SHARED_CREDENTIALS_FILE``,
  ``AWS_CONFIG_FILE``). A profile without static keys (SSO, assumed role,
  ``credential_process``) goes through boto3 when it is installed. Without any
  credentials: against AWS itself the client's own chain (instance metadata,
  web identity, container credentials); against another endpoint, unsigned
  requests (public buckets).
* endpoint: ``S3Options.endpoint``, ``AWS_ENDPOINT_URL_S3``,
  ``AWS_ENDPOINT_URL``, the profile's ``endpoint_url``; none means AWS.
* region: ``S3Options.region``, ``AWS_REGION``, ``AWS_DEFAULT_REGION``, the
  profile's ``region``, else ``us-east-1``.

Plain ``http://`` endpoints are accepted only on loopback addresses unless
``S3Options(allow_http=True)`` or ``ASYNCLOAD_S3_ALLOW_HTTP=1``: anywhere else
the request signatures (not the secret itself) and every byte would cross the
network in clear text.

Nothing here ever formats a secret: :class:`S3Options` and
:class:`S3Settings` keep keys out of their ``repr``.
"""

from __future__ import annotations

import configparser
import importlib
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .._config import MiB
from .._exceptions import SourceUnavailableError

__all__ = ["DEFAULT_S3_OPTIONS", "S3Options", "S3Settings", "display_endpoint", "is_loopback", "resolve"]

# S3's smallest part (except the last) is 5 MiB; AWS and Ceph RGW both enforce it.
MIN_PART_SIZE = 5 * MiB
# Profile keys that only an SDK can turn into credentials.
_DYNAMIC_PROFILE_KEYS = frozenset(
    {"role_arn", "source_profile", "credential_process", "web_identity_token_file", "credential_source"}
)


@dataclass(frozen=True, slots=True)
class S3Options:
    """Settings for :class:`~asyncload.sources.S3Source`; ``None`` fields come from the environment.

    Timeouts are in seconds: ``connect_timeout`` for the TCP/TLS connect,
    ``stall_timeout`` for any gap between two reads of a response (first
    byte included), ``request_timeout`` for one whole request including its
    body. Failed requests (5xx, 503 SlowDown, connection errors, timeouts)
    are retried up to ``max_retries`` times with exponential backoff and
    jitter, within ``retry_timeout``; a response body that breaks off is
    resumed from where it stopped, as often. ``max_connections`` bounds the
    requests in flight (and idle connections kept) per source. Objects
    larger than ``multipart_threshold`` are written as a multipart upload of
    ``part_size`` parts, ``multipart_concurrency`` at a time.

    ``direct_reads`` (default on) sends block reads as SigV4-signed ranged GETs
    through asyncload's own HTTP client, on the source's own I/O thread, with
    each body received straight into the caller's buffer (no copy); it applies
    with static keys or unsigned access. Everything else, and every read that
    the server answers with an error, goes through obstore.
    """

    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    profile: str | None = None
    allow_http: bool | None = None
    virtual_hosted_style: bool | None = None
    connect_timeout: float = 5.0
    stall_timeout: float = 20.0
    request_timeout: float = 120.0
    max_retries: int = 3
    retry_timeout: float = 60.0
    max_connections: int = 16
    multipart_threshold: int = 64 * MiB
    part_size: int = 16 * MiB
    multipart_concurrency: int = 4
    direct_reads: bool = True

    def __post_init__(self) -> None:
        if self.part_size < MIN_PART_SIZE:
            raise ValueError(
                f"S3Options.part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum part)"
            )
        if self.multipart_threshold < self.part_size:
            raise ValueError("S3Options.multipart_threshold must be at least part_size")
        if self.max_connections < 1 or self.multipart_concurrency < 1 or self.max_retries < 0:
            raise ValueError("S3Options: max_connections and multipart_concurrency >= 1, max_retries >= 0")
        for name in ("connect_timeout", "stall_timeout", "request_timeout", "retry_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"S3Options.{name} must be positive")


DEFAULT_S3_OPTIONS = S3Options()


@dataclass(frozen=True, slots=True)
class S3Settings:
    """What :func:`resolve` decided: endpoint, region and where the credentials came from."""

    endpoint: str | None
    region: str
    access_key_id: str | None = field(repr=False)
    secret_access_key: str | None = field(repr=False)
    session_token: str | None = field(repr=False)
    profile: str | None
    credentials_from: (
        str  # "options", "environment", "profile NAME", "boto3 profile NAME", "default chain", "none"
    )
    allow_http: bool
    virtual_hosted_style: bool


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ::1."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def display_endpoint(endpoint: str | None, region: str) -> str:
    """The endpoint for messages, without any ``user:password@`` part."""
    if endpoint is None:
        return f"AWS S3 ({region})"
    u = urlsplit(endpoint)
    host = u.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{u.port}" if u.port else host
    return urlunsplit((u.scheme, netloc, u.path, "", ""))


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _read_ini(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as e:
        raise SourceUnavailableError(
            f"cannot parse AWS configuration file {str(path)!r}: {type(e).__name__}"
        ) from None
    return parser


def _profile_values(profile: str) -> dict[str, str]:
    """Keys of ``profile`` from the shared credentials file, then the config file (credentials win)."""
    home = Path.home()
    creds = Path(_env("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials").expanduser()
    conf = Path(_env("AWS_CONFIG_FILE") or home / ".aws" / "config").expanduser()
    values: dict[str, str] = {}
    if conf.is_file():
        parser = _read_ini(conf)
        section = "default" if profile == "default" else f"profile {profile}"
        for name in (section, profile):
            if parser.has_section(name):
                values.update({k: v.strip() for k, v in parser.items(name)})
                break
    if creds.is_file():
        parser = _read_ini(creds)
        if parser.has_section(profile):
            values.update({k: v.strip() for k, v in parser.items(profile)})
    return values


def resolve(options: S3Options) -> S3Settings:
    """Endpoint, region, credentials and the plain-http decision for ``options`` and the environment."""
    profile = options.profile or _env("AWS_PROFILE") or _env("AWS_DEFAULT_PROFILE")
    pvalues = _profile_values(profile or "default")
    if options.profile and not pvalues:
        raise SourceUnavailableError(
            f"AWS profile {options.profile!r} not found in the AWS configuration files"
        )

    ak, sk, token, source = options.access_key_id, options.secret_access_key, options.session_token, "options"
    if not (ak and sk) and options.profile:
        ak, sk = pvalues.get("aws_access_key_id"), pvalues.get("aws_secret_access_key")
        token, source = pvalues.get("aws_session_token"), f"profile {options.profile}"
    if not (ak and sk):
        ak, sk = _env("AWS_ACCESS_KEY_ID"), _env("AWS_SECRET_ACCESS_KEY")
        token, source = _env("AWS_SESSION_TOKEN"), "environment"
    if not (ak and sk):
        ak, sk = pvalues.get("aws_access_key_id"), pvalues.get("aws_secret_access_key")
        token, source = pvalues.get("aws_session_token"), f"profile {profile or 'default'}"
    if not (ak and sk):
        ak = sk = token = None
        source = "default chain"
        if any(k.startswith("sso_") or k in _DYNAMIC_PROFILE_KEYS for k in pvalues):
            source = f"boto3 profile {profile or 'default'}"

    endpoint = (
        options.endpoint
        or _env("AWS_ENDPOINT_URL_S3")
        or _env("AWS_ENDPOINT_URL")
        or pvalues.get("endpoint_url")
        or None
    )
    region = (
        options.region
        or _env("AWS_REGION")
        or _env("AWS_DEFAULT_REGION")
        or pvalues.get("region")
        or "us-east-1"
    )
    if endpoint is not None:
        endpoint = endpoint.rstrip("/")
        u = urlsplit(endpoint)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise SourceUnavailableError(
                f"S3 endpoint {display_endpoint(endpoint, region)!r} is not an http:// or https:// URL"
            )
        if source == "default chain":
            source = "none"  # no instance-metadata lookups for a non-AWS endpoint: unsigned requests

    allow = options.allow_http if options.allow_http is not None else _truthy(_env("ASYNCLOAD_S3_ALLOW_HTTP"))
    plain = endpoint is not None and urlsplit(endpoint).scheme == "http"
    if plain and not allow and not is_loopback(urlsplit(endpoint or "").hostname or ""):
        raise SourceUnavailableError(
            f"S3 endpoint {display_endpoint(endpoint, region)!r} is plain http on a non-loopback address; "
            "use https, or allow it explicitly with S3Options(allow_http=True) or ASYNCLOAD_S3_ALLOW_HTTP=1"
        )
    vhost = options.virtual_hosted_style
    if vhost is None:
        vhost = endpoint is None  # AWS: bucket.s3.region.amazonaws.com; others: path style
    return S3Settings(
        endpoint=endpoint,
        region=region,
        access_key_id=ak,
        secret_access_key=sk,
        session_token=token,
        profile=profile,
        credentials_from=source,
        allow_http=plain,
        virtual_hosted_style=vhost,
    )


def boto3_provider(profile: str) -> Any:
    """obstore's boto3 credential provider for a profile without static keys (SSO, roles)."""
    try:
        boto3 = importlib.import_module("boto3")
        provider = importlib.import_module("obstore.auth.boto3")
    except ImportError:
        raise SourceUnavailableError(
            f"AWS profile {profile!r} has no static keys; install boto3 to use SSO, role or "
            "credential_process profiles"
        ) from None
    return provider.Boto3CredentialProvider(boto3.Session(profile_name=profile))
