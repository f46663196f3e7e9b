"""Test helpers: a local Hub-compatible HTTP server (`hub`) and the pytest fixtures that start it (`fixtures`)."""
