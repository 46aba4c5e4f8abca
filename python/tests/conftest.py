"""Fixtures the suites share."""

import pytest

import mha


@pytest.fixture
def tapes_made(monkeypatch):
    """A list that grows by one for each training tape a layer creates."""
    made, create = [], mha.layer._core.tape_create

    def counted():
        made.append(1)
        return create()
    monkeypatch.setattr(mha.layer._core, "tape_create", counted)
    return made
