"""The ``http:`` section of the cluster config (the OpenAI HTTP API)."""

from __future__ import annotations

import pytest

from cluster.config import ClusterConfig, ConfigError, config_from_dict


def test_http_defaults_and_override() -> None:
    config = ClusterConfig()
    assert (config.http.enabled, config.http.host, config.http.port) == (True, "127.0.0.1", 8000)
    assert config.http.max_body_bytes == 8 * 2**20
    changed = config.override({"http.port": 0, "http.enabled": False})
    assert (changed.http.port, changed.http.enabled) == (0, False)
    assert config_from_dict(changed.to_dict()) == changed


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"port": 70000}, "http.port"),
        ({"hots": "0.0.0.0"}, "http.hots"),
        ({"enabled": "yes"}, "http.enabled"),
        ({"max_body_bytes": 0}, "http.max_body_bytes"),
    ],
)
def test_http_refusals_name_the_field(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config_from_dict({"http": section})
