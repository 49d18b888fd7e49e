"""token-broker's benchmark suite (issue 6): `make bench`, or `python -m bench --help`."""
