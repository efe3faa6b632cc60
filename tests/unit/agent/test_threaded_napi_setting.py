"""Threaded NAPI is a feature of the configuration like GRO and BIG TCP: on unless turned off,
from the file, the environment or the chart, and handed to the datapath that applies it."""

from __future__ import annotations

import pathlib
import subprocess

import pytest

from podwire.agent import config
from podwire.agent.datapath import link

REPO = pathlib.Path(__file__).resolve().parents[3]
HELM = REPO / ".cache" / "tools" / "bin" / "helm"
BASE = {"NODE_NAME": "n1", "PODWIRE_CLUSTER_POD_CIDRS": "10.244.0.0/16"}


def test_threaded_napi_is_on_by_default_like_the_other_features() -> None:
    features = config.load(environ=BASE).features
    assert features == config.Features(
        gro=True, big_tcp=True, udp_gro_forwarding=True, threaded_napi=True
    )
    assert link.Wanted().threaded_napi


@pytest.mark.parametrize(("word", "on"), [("off", False), ("0", False), ("true", True)])
def test_threaded_napi_from_the_environment(word: str, on: bool) -> None:
    cfg = config.load(environ={**BASE, "PODWIRE_THREADED_NAPI": word})
    assert cfg.features.threaded_napi is on
    assert cfg.features.gro, "the other features keep their defaults"


def test_threaded_napi_from_the_file_and_a_typo_named(tmp_path: pathlib.Path) -> None:
    good = tmp_path / "c.json"
    good.write_text('{"features": {"threaded_napi": false}}')
    assert not config.load(environ=BASE, path=good).features.threaded_napi
    with pytest.raises(config.ConfigError) as caught:
        config.load(environ={**BASE, "PODWIRE_THREADED_NAPI": "sometimes"})
    assert caught.value.setting == "features.threaded_napi"


@pytest.mark.skipif(not HELM.exists(), reason="helm is built by hack/setup.sh")
@pytest.mark.parametrize(
    ("flag", "want"), [((), '"true"'), (("--set", "agent.features.threadedNAPI=false"), '"false"')]
)
def test_the_chart_passes_the_setting_to_the_agent(flag: tuple[str, ...], want: str) -> None:
    rendered = subprocess.run(
        [str(HELM), "template", "podwire", str(REPO / "deploy/helm/podwire"),
         "--set", "agent.clusterPodCIDRs=10.244.0.0/16", *flag],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lines = [x for x in rendered.splitlines() if "PODWIRE_THREADED_NAPI" in x]
    assert len(lines) == 1 and f"value: {want}" in lines[0]
