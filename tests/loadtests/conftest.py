import pytest

from tests.loadtests.stub import StubServer


@pytest.fixture(scope="session")
def _stub_server():
    s = StubServer().start()
    yield s
    s.stop()


@pytest.fixture
def stub(_stub_server):
    """The stub API, its state reset for each test (configure with stub.reset(...))."""
    _stub_server.reset()
    return _stub_server
