"""Shared pytest fixtures live in tests/fixtures/; this root conftest registers them."""

pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.ray", "tests.fixtures.proxy"]
