"""Talking to authorization servers: client auth, discovery, the token request, its answers.

Nothing is re-exported here: importing one module of the package (broker/upstream/exchange.py,
from the caller JWT verifier) must not load the token client and prometheus_client with it.
"""
