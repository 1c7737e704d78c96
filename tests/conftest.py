"""Fixtures every test in tests/ gets."""
import tempfile

import pytest


@pytest.fixture(autouse=True)
def temporary_files_in_tmp_path(tmp_path, monkeypatch):
    """What the code writes to the system's temporary folder (the key list of a model mismatch)
    goes to the test's own tmp_path, which pytest cleans up, not to /tmp."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
