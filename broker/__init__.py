"""token-broker."""
