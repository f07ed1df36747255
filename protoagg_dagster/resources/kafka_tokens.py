"""OAUTHBEARER token providers (PROTOAGG_KAFKA_OAUTH_PROVIDER) behind ``kafka.clients.TokenSource``.

``gcp``: Application Default Credentials made into the token Google Cloud's managed Kafka takes
(``core.kafka_client.gcp_kafka_token``). ``oidc``: an OIDC client-credentials grant at a token
endpoint (Confluent Cloud, Keycloak, Okta, ...). Both reuse a token until a minute before it
expires, so the many clients of a sensor tick or a run ask once.
"""

from __future__ import annotations

import datetime
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import requests

from protoagg_dagster.core import settings
from protoagg_dagster.core.errors import AccessRefused, ConfigError
from protoagg_dagster.core.kafka_client import KafkaClientSettings, gcp_kafka_token
from protoagg_dagster.kafka.clients import TokenSource

_REFRESH_BEFORE_SECONDS = 60.0
_GCP_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


class CachedToken:
    """A token from ``fetch`` (token, expiry in epoch seconds), fetched again near its expiry."""

    def __init__(self, fetch: Callable[[], tuple[str, float]]) -> None:
        self._fetch = fetch
        self._lock = threading.Lock()
        self._token: tuple[str, float] | None = None

    def token(self) -> tuple[str, float]:
        with self._lock:
            if self._token is None or self._token[1] - _REFRESH_BEFORE_SECONDS < time.time():
                self._token = self._fetch()
            return self._token


def oidc_token(client: KafkaClientSettings) -> tuple[str, float]:
    """A client-credentials grant (RFC 6749 section 4.4) at ``oauth_token_url``."""
    form = {"grant_type": "client_credentials"}
    if client.oauth_scope:
        form["scope"] = client.oauth_scope
    try:
        answer = requests.post(
            client.oauth_token_url,
            data=form,
            auth=(client.oauth_client_id, client.oauth_client_secret),
            timeout=10,
        )
    except requests.RequestException as exc:
        raise ConfigError(
            f"the OAuth token endpoint {client.oauth_token_url} does not answer: {exc} "
            f"(check {settings.KAFKA_OAUTH_TOKEN_URL.env})"
        ) from exc
    if answer.status_code in (400, 401, 403):
        raise AccessRefused(
            f"the OAuth token endpoint {client.oauth_token_url} refused the client "
            f"credentials: HTTP {answer.status_code} {answer.text[:200]} (check "
            f"{settings.KAFKA_OAUTH_CLIENT_ID.env}, {settings.KAFKA_OAUTH_CLIENT_SECRET.env} "
            f"and {settings.KAFKA_OAUTH_SCOPE.env})"
        )
    try:
        answer.raise_for_status()
        body: dict[str, Any] = answer.json()
        return str(body["access_token"]), time.time() + float(body.get("expires_in", 300))
    except (requests.RequestException, ValueError, KeyError) as exc:
        raise ConfigError(
            f"the OAuth token endpoint {client.oauth_token_url} gave no access token: {exc}"
        ) from exc


def gcp_token() -> tuple[str, float]:
    """Application Default Credentials as Google Cloud's managed Kafka wants them."""
    import google.auth
    import google.auth.exceptions
    import google.auth.transport.requests

    try:
        credentials, _project = google.auth.default(scopes=[_GCP_SCOPE])
        credentials.refresh(google.auth.transport.requests.Request())  # type: ignore[no-untyped-call]
    except google.auth.exceptions.GoogleAuthError as exc:
        raise AccessRefused(
            f"{settings.KAFKA_OAUTH_PROVIDER.env}=gcp needs Application Default Credentials: "
            f"{exc} (run `gcloud auth application-default login`, or set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service account's key file)"
        ) from exc
    email = getattr(credentials, "service_account_email", None)
    if not email or email == "default":
        raise ConfigError(
            f"{settings.KAFKA_OAUTH_PROVIDER.env}=gcp needs a service account's credentials "
            "(the token names its email); these Application Default Credentials have none"
        )
    # google-auth keeps the expiry as a naive datetime in UTC.
    expires = credentials.expiry
    expiry = expires.replace(tzinfo=datetime.UTC).timestamp() if expires else time.time() + 300
    return gcp_kafka_token(str(credentials.token), email, time.time(), expiry), expiry


@functools.cache
def token_source(client: KafkaClientSettings) -> TokenSource | None:
    """The process's one token source for these settings, or None without OAUTHBEARER."""
    if not (client.uses_sasl and client.sasl_mechanism == "OAUTHBEARER"):
        return None
    if client.oauth_provider == "gcp":
        return CachedToken(gcp_token)
    return CachedToken(functools.partial(oidc_token, client))
