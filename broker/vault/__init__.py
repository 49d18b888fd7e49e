"""The credential vault: encryption at rest, the live registry of credentials and callers."""
