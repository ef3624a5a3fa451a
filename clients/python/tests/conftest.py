import pytest

from gateway import Gateway


@pytest.fixture(scope="module")
def gateway():
    gateway = Gateway(rooms='history_durable = true\n[[rooms.class]]\npattern = "volatile:*"\nhistory_durable = false')
    yield gateway
    gateway.stop()
