"""The agent's settings: defaults, environment, file, and errors that name the setting."""

from __future__ import annotations

import ipaddress
import json
import pathlib

import pytest

from podwire.agent import config

BASE_ENV = {"NODE_NAME": "node-a", "PODWIRE_CLUSTER_POD_CIDRS": "10.244.0.0/16"}


def test_defaults() -> None:
    cfg = config.load(environ=BASE_ENV)
    assert cfg.node_name == "node-a"
    assert cfg.key_path == pathlib.Path("/var/lib/podwire/private.key")
    assert cfg.datapath == "auto"
    assert cfg.listen_port == 51871
    assert cfg.device == "podwire_wg0"
    assert cfg.cluster_pod_cidrs == (ipaddress.ip_network("10.244.0.0/16"),)
    assert cfg.fail_closed is True
    assert cfg.mtu == 0
    assert cfg.features == config.Features(gro=True, big_tcp=True, udp_gro_forwarding=True)
    assert cfg.api_socket == pathlib.Path("/var/run/podwire/agent.sock")
    assert cfg.metrics_port == 9871
    assert cfg.resync_period == 300.0
    assert cfg.kubeconfig is None


def test_every_setting_from_the_environment() -> None:
    env = {
        "NODE_NAME": "node-b.example.com",
        "PODWIRE_KEY_PATH": "/tmp/k",
        "PODWIRE_DATAPATH": "userspace",
        "PODWIRE_LISTEN_PORT": "51999",
        "PODWIRE_DEVICE": "wgtest0",
        "PODWIRE_CLUSTER_POD_CIDRS": "10.244.0.0/16, fd00:10:244::/56",
        "PODWIRE_FAIL_CLOSED": "Yes",
        "PODWIRE_STRICT_MODE": "off",
        "PODWIRE_MTU": "1380",
        "PODWIRE_GRO": "off",
        "PODWIRE_BIG_TCP": "0",
        "PODWIRE_UDP_GRO_FORWARDING": "true",
        "PODWIRE_API_SOCKET": "/run/x.sock",
        "PODWIRE_METRICS_PORT": "19871",
        "PODWIRE_RESYNC_PERIOD": "30.5",
        "KUBECONFIG": "/etc/kubeconfig",
        "UNRELATED": "ignored",
    }
    cfg = config.load(environ=env)
    assert cfg == config.Config(
        node_name="node-b.example.com",
        key_path=pathlib.Path("/tmp/k"),
        datapath="userspace",
        listen_port=51999,
        device="wgtest0",
        cluster_pod_cidrs=(
            ipaddress.IPv4Network("10.244.0.0/16"),
            ipaddress.IPv6Network("fd00:10:244::/56"),
        ),
        fail_closed=True,
        strict_mode=False,
        mtu=1380,
        features=config.Features(gro=False, big_tcp=False, udp_gro_forwarding=True),
        api_socket=pathlib.Path("/run/x.sock"),
        metrics_port=19871,
        resync_period=30.5,
        kubeconfig=pathlib.Path("/etc/kubeconfig"),
    )


def test_empty_variables_count_as_unset() -> None:
    cfg = config.load(environ={**BASE_ENV, "PODWIRE_DATAPATH": "", "KUBECONFIG": ""})
    assert cfg.datapath == "auto" and cfg.kubeconfig is None


def test_file_then_environment(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "agent.json"
    path.write_text(
        json.dumps(
            {
                "datapath": "kernel",
                "listen_port": 6000,
                "cluster_pod_cidrs": ["10.1.0.0/16"],
                "features": {"big_tcp": False},
            }
        )
    )
    env = {
        "NODE_NAME": "n",
        "PODWIRE_CONFIG": str(path),
        "PODWIRE_LISTEN_PORT": "7000",
        "PODWIRE_GRO": "false",
    }
    cfg = config.load(environ=env)
    assert cfg.datapath == "kernel"
    assert cfg.listen_port == 7000  # the environment wins
    assert cfg.cluster_pod_cidrs == (ipaddress.ip_network("10.1.0.0/16"),)
    assert cfg.features == config.Features(gro=False, big_tcp=False, udp_gro_forwarding=True)


def test_yaml_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("node_name: node-y\nfail_closed: false\nmtu: 1400\n")
    cfg = config.load(environ={}, path=path)
    assert (cfg.node_name, cfg.fail_closed, cfg.mtu) == ("node-y", False, 1400)


@pytest.mark.parametrize(
    ("env", "setting", "hint"),
    [
        ({"NODE_NAME": ""}, "node_name", "required"),
        ({"NODE_NAME": "Node_A"}, "node_name", "Kubernetes Node name"),
        ({"PODWIRE_DATAPATH": "ebpf"}, "datapath", "auto, kernel, userspace"),
        ({"PODWIRE_LISTEN_PORT": "0"}, "listen_port", "1..65535"),
        ({"PODWIRE_LISTEN_PORT": "65536"}, "listen_port", "1..65535"),
        ({"PODWIRE_LISTEN_PORT": "port"}, "listen_port", "integer"),
        ({"PODWIRE_DEVICE": "a" * 16}, "device", "1-15 characters"),
        ({"PODWIRE_DEVICE": "wg/0"}, "device", "no '/'"),
        ({"PODWIRE_CLUSTER_POD_CIDRS": "10.244.0.1/16"}, "cluster_pod_cidrs", "host bits"),
        ({"PODWIRE_CLUSTER_POD_CIDRS": "bogus"}, "cluster_pod_cidrs", "not a CIDR"),
        ({"PODWIRE_CLUSTER_POD_CIDRS": ""}, "cluster_pod_cidrs", "fail_closed"),
        ({"PODWIRE_FAIL_CLOSED": "maybe"}, "fail_closed", "true/false"),
        ({"PODWIRE_MTU": "100"}, "mtu", "0 (automatic) or in 576..65535"),
        ({"PODWIRE_GRO": "2"}, "features.gro", "true/false"),
        ({"PODWIRE_METRICS_PORT": "-1"}, "metrics_port", "1..65535"),
        ({"PODWIRE_RESYNC_PERIOD": "0"}, "resync_period", "positive"),
        ({"PODWIRE_RESYNC_PERIOD": "soon"}, "resync_period", "seconds"),
    ],
)
def test_bad_values_name_the_setting_and_what_is_allowed(
    env: dict[str, str], setting: str, hint: str
) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.load(environ={**BASE_ENV, **env})
    assert err.value.setting == setting
    assert setting in str(err.value) and hint in str(err.value)


def test_node_name_is_required() -> None:
    with pytest.raises(config.ConfigError, match="NODE_NAME") as err:
        config.load(environ={"PODWIRE_CLUSTER_POD_CIDRS": "10.244.0.0/16"})
    assert err.value.setting == "node_name"


def test_fail_closed_off_needs_no_cidrs() -> None:
    cfg = config.load(environ={"NODE_NAME": "n", "PODWIRE_FAIL_CLOSED": "off"})
    assert cfg.fail_closed is False and cfg.cluster_pod_cidrs == ()


def test_strict_mode_is_on_by_default_from_env_or_file(tmp_path: pathlib.Path) -> None:
    cfg = config.load(environ={"NODE_NAME": "n", "PODWIRE_CLUSTER_POD_CIDRS": "10.244.0.0/16"})
    assert cfg.strict_mode is True
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"node_name": "n", "fail_closed": False, "strict_mode": False}))
    assert config.load(environ={}, path=path).strict_mode is False
    with pytest.raises(config.ConfigError, match="true/false") as err:
        config.load(environ={"NODE_NAME": "n", "PODWIRE_STRICT_MODE": "sometimes"}, path=path)
    assert err.value.setting == "strict_mode"


def test_unknown_setting_in_a_file_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"node_name": "n", "listen_prot": 1}))
    with pytest.raises(config.ConfigError, match="listen_port") as err:
        config.load(environ={}, path=path)
    assert err.value.setting == "listen_prot"


def test_unknown_feature_is_refused() -> None:
    with pytest.raises(config.ConfigError) as err:
        config.from_mapping({"node_name": "n", "fail_closed": False, "features": {"tso": True}})
    assert err.value.setting == "features.tso"


@pytest.mark.parametrize(
    ("content", "hint"),
    [("{not json", "not valid JSON"), ("[1, 2]", "object of settings")],
)
def test_bad_file_is_refused(tmp_path: pathlib.Path, content: str, hint: str) -> None:
    path = tmp_path / "agent.json"
    path.write_text(content)
    with pytest.raises(config.ConfigError, match=hint) as err:
        config.load(environ=BASE_ENV, path=path)
    assert str(path) in str(err.value)


def test_missing_file_is_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot be read"):
        config.load(environ=BASE_ENV, path=tmp_path / "nope.json")


def test_booleans_in_a_file_must_be_booleans_or_words() -> None:
    with pytest.raises(config.ConfigError, match="fail_closed"):
        config.from_mapping({"node_name": "n", "fail_closed": 3})
    assert config.from_mapping({"node_name": "n", "fail_closed": "off"}).fail_closed is False


def test_a_config_is_valid_by_construction() -> None:
    with pytest.raises(config.ConfigError, match="datapath"):
        config.Config(node_name="n", fail_closed=False, datapath="fast")  # type: ignore[arg-type]
    with pytest.raises(config.ConfigError, match="cluster_pod_cidrs"):
        config.Config(node_name="n")


def test_engine_mode_is_child_unless_the_chart_says_external() -> None:
    assert config.load(environ=BASE_ENV).engine_mode == "child"
    env = {**BASE_ENV, "PODWIRE_ENGINE_MODE": "external"}
    assert config.load(environ=env).engine_mode == "external"
    with pytest.raises(config.ConfigError) as err:
        config.load(environ={**BASE_ENV, "PODWIRE_ENGINE_MODE": "sidecar"})
    assert err.value.setting == "engine_mode"
    assert "child, external" in str(err.value) and "'sidecar'" in str(err.value)
