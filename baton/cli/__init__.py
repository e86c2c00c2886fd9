"""The ``baton`` command line."""
