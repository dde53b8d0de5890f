"""Shared fixtures: every test must leave no session bound and no key locked."""
import os

import pytest

REQUIRE_REDIS = os.environ.get("TELESESSION_REQUIRE_REDIS") == "1"
