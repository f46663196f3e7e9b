pytest_plugins = ["registry.testing.fixtures"]
