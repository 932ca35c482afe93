"""`--cluster ADDRESS`: the accepted forms, and a ConfigError naming every malformed value."""

from __future__ import annotations

import sys

import pytest

from mer.cluster.cluster_address import parse_cluster_address
from mer.cluster.ray_cluster import ray_cluster
from mer.errors import ConfigError


def test_auto_joins_the_running_cluster():
    address = parse_cluster_address("auto")
    assert (address.kind, address.ray_address) == ("auto", "auto")


@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_local_n_names_its_node_count(count):
    address = parse_cluster_address(f"local:{count}")
    assert (address.kind, address.num_local_nodes, address.ray_address) == ("local", count, "")


@pytest.mark.parametrize("text", ["10.0.0.5:6379", "head.example:6379", "ray://head.example:10001"])
def test_host_port_and_ray_client_addresses_are_joined_as_given(text):
    address = parse_cluster_address(text)
    assert (address.kind, address.ray_address) == ("join", text)
    assert address.is_ray_client == text.startswith("ray://")


@pytest.mark.parametrize("text, message", [
    ("local:0", "from 1 to 8, not '0'"),
    ("local:9", "from 1 to 8, not '9'"),
    ("local:two", "not 'two'"),
    ("local:", "not ''"),
    ("local:-1", "not '-1'"),
    ("head", "is not an address"),
    ("", "is not an address"),
    (":6379", "is not an address"),
    ("http://head:80", "is not an address"),
    ("head:0", "port '0' is not an integer from 1 to 65535"),
    ("head:65536", "port '65536'"),
    ("head:port", "port 'port'"),
    ("ray://head", "is not an address"),
])
def test_malformed_addresses_are_refused_naming_the_value(text, message):
    with pytest.raises(ConfigError) as raised:
        parse_cluster_address(text)
    assert f"--cluster {text!r}" in str(raised.value)
    assert message in str(raised.value)


def test_ray_client_without_grpc_is_refused_before_connecting(monkeypatch):
    monkeypatch.setitem(sys.modules, "grpc", None)  # import grpc then raises ImportError
    with pytest.raises(ConfigError, match=r"--cluster 'ray://head:10001' .*ray\[client\]"):
        with ray_cluster("ray://head:10001"):
            pass
