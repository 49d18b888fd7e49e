"""Talking to authorization servers: client auth, discovery, the token request, its answers."""

from broker.upstream.client import UpstreamClient, new_http_client
from broker.upstream.response import FetchedToken

__all__ = ["FetchedToken", "UpstreamClient", "new_http_client"]
