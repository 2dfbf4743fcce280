"""Shared pytest configuration: fixtures live in one module per area."""

pytest_plugins = ["tests.fixtures_hub", "tests.fixtures_zoo", "tests.fixtures_store"]
