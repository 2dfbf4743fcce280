"""Shared pytest configuration: fixtures live in one module per area."""

import os
import tempfile

# The settings follow Hugging Face conventions (HF_HOME, HF_TOKEN, HF_ENDPOINT, the cached
# login): keep the developer's own Hub cache, token and endpoint out of every test.
for _name in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_CACHE", "HF_TOKEN_PATH"):
    os.environ.pop(_name, None)
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="auditor-test-hf-home-")

pytest_plugins = ["tests.fixtures_hub", "tests.fixtures_zoo", "tests.fixtures_store"]
