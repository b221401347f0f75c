"""Markers of the federated tests."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "integration: starts Flower's SuperLink and SuperNodes as separate processes"
    )
