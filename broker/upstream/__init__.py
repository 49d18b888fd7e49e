"""Talking to authorization servers: client auth, discovery, the token request, its answers."""

from broker.upstream.client import UpstreamClient, new_http_client
from broker.upstream.response import FetchedToken
from broker.upstream.rotation import SecretRotation

__all__ = ["FetchedToken", "SecretRotation", "UpstreamClient", "new_http_client"]
