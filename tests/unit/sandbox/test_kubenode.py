"""The kubelet runtime's pure parts, without root: which image the nodes get, what the record
keeps for `down`, how a crash loop is told from a container's logs, the files a node is given."""

from __future__ import annotations

import json
import pathlib
import tomllib

import pytest
from cryptography import x509

from podwire.sandbox import certs, controlplane, kubenode, record


def test_the_image_is_the_one_hack_image_sh_names_and_the_pause_image_without_one(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    current = tmp_path / "current"
    monkeypatch.setattr(kubenode, "IMAGE_CURRENT", current)
    assert kubenode.pod_image() == (kubenode.PAUSE_IMAGE, kubenode.PAUSE_ARCHIVE)

    archive = tmp_path / "podwire-abc.tar"
    archive.write_bytes(b"tar")
    current.write_text(f"REF=localhost/podwire:abc\nARCHIVE={archive}\nHASH=abc\n")
    assert kubenode.pod_image() == ("localhost/podwire:abc", archive)

    # Kept for the whole `up`: a hard link, so a new build replacing the archive changes nothing.
    ref, kept = kubenode.keep_image(tmp_path / "images")
    assert ref == "localhost/podwire:abc" and kept.read_bytes() == b"tar"
    archive.unlink()
    assert kept.read_bytes() == b"tar"

    # An archive that is not there is said, not imported half-way.
    with pytest.raises(kubenode.NodeError, match=r"hack/image\.sh"):
        kubenode.pod_image()


def test_the_record_keeps_what_down_gives_back(tmp_path: pathlib.Path) -> None:
    st = record.Record(prefix="pws", directory=str(tmp_path), runtime="kubelet")
    node = record.Node("node1", 1, "pwsn1", "192.0.2.11", "10.244.1.0/24", "podwire_wg0", tmp_path)
    node.mounts_pid = 4242
    st.nodes.append(node)
    st.sysctls = {"kernel.panic": "0", "vm.overcommit_memory": "0"}
    st.cgroups = [f"/podwire-sandbox-{st.tag}/node1"]
    st.save()
    back = record.Record.load(tmp_path)
    assert back is not None
    assert back.runtime == "kubelet" and back.sysctls == st.sysctls and back.cgroups == st.cgroups
    assert back.nodes[0].mounts_pid == 4242
    # The chart's agent's socket is in the node's own /run, which its folder holds.
    assert str(back.nodes[0].api_socket) == "/proc/4242/root/run/podwire/agent.sock"
    # A record written before the kubelet runtime existed loads as the process runtime.
    raw = json.loads((tmp_path / record.STATE_FILE).read_text())
    for key in ("runtime", "sysctls", "cgroups"):
        raw.pop(key)
    raw["nodes"][0].pop("mounts_pid")
    (tmp_path / record.STATE_FILE).write_text(json.dumps(raw))
    old = record.Record.load(tmp_path)
    assert old is not None and old.runtime == "process" and old.nodes[0].mounts_pid == 0
    assert old.nodes[0].api_socket == tmp_path / "agent.sock"


def test_a_container_that_ran_three_times_is_a_crash_loop_told_by_its_last_ended_run(
    tmp_path: pathlib.Path,
) -> None:
    node = record.Node("node1", 1, "pwsn1", "192.0.2.11", "10.244.1.0/24", "podwire_wg0", tmp_path)
    pods = tmp_path / "root" / "var-log" / "pods"
    agent = pods / "default_podwire-agent-x_uid" / "agent"
    agent.mkdir(parents=True)
    (agent / "0.log").write_text("first run\n")
    (agent / "1.log").write_text("second run\n")
    assert kubenode.crashed_containers(node) == []
    (agent / "2.log").write_text("")
    crashed = kubenode.crashed_containers(node)
    assert crashed == [("default_podwire-agent-x_uid/agent", agent / "1.log")]


def test_a_node_is_given_its_pod_cidr_a_runc_containerd_and_a_kubelet_of_its_own(
    tmp_path: pathlib.Path,
) -> None:
    pki = tmp_path / "cp" / "pki"
    certs.make(pki)
    assert (pki / certs.CA_KEY).stat().st_mode & 0o777 == 0o600
    cp = controlplane.ControlPlane(tmp_path / "cp", apiserver_port=6443)
    st = record.Record(prefix="pws", directory=str(tmp_path), runtime="kubelet")
    workdir = tmp_path / "nodes" / "node2"
    workdir.mkdir(parents=True)
    node = record.Node("node2", 2, "pwsn2", "192.0.2.12", "10.244.2.0/24", "podwire_wg0", workdir)
    kn = kubenode.KubeNode(st, cp, node)
    kn.write_config("/podwire-sandbox-x/node2")

    cni = json.loads((workdir / "cni" / "10-podwire-sandbox.conflist").read_text())
    bridge = cni["plugins"][0]
    assert bridge["type"] == "bridge" and bridge["isGateway"]
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.244.2.0/24", "gateway": "10.244.2.1"}]]

    containerd = tomllib.loads(kn.containerd_config().read_text())
    cri = containerd["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] is True and cri["sandbox_image"] == kubenode.PAUSE_IMAGE
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False
    # Nothing of containerd's own outside the node's private mounts (its default is /opt).
    assert containerd["plugins"]["io.containerd.internal.v1.opt"]["path"].startswith("/var/lib/")

    kubelet = json.loads((workdir / "kubelet.yaml").read_text())
    assert (
        kubelet["cgroupDriver"] == "cgroupfs"
        and kubelet["cgroupRoot"] == "/podwire-sandbox-x/node2"
    )
    assert kubelet["failCgroupV1"] is False and kubelet["failSwapOn"] is False
    assert kubelet["address"] == "192.0.2.12" and kubelet["readOnlyPort"] == 0
    assert kubelet["authentication"]["anonymous"]["enabled"] is False

    # The kubelet authenticates as its node, with a key only root reads.
    kubeconfig = workdir / "kubelet.kubeconfig"
    assert kubeconfig.stat().st_mode & 0o777 == 0o600
    user = json.loads(kubeconfig.read_text())["users"][0]["user"]
    cert = x509.load_pem_x509_certificate(pathlib.Path(user["client-certificate"]).read_bytes())
    assert cert.subject.rfc4514_string() == "O=system:nodes,CN=system:node:node2"
    assert pathlib.Path(user["client-key"]).stat().st_mode & 0o777 == 0o600


def test_pods_hold_their_network_and_answer_sigterm() -> None:
    pause = kubenode.pod_manifest("node1-pod0", "node1", kubenode.PAUSE_IMAGE)
    spec = pause["spec"]
    assert isinstance(spec, dict)
    assert spec["nodeName"] == "node1" and "command" not in spec["containers"][0]
    python = kubenode.pod_manifest("node1-pod0", "node1", "localhost/podwire:abc")
    spec = python["spec"]
    assert isinstance(spec, dict)
    command = spec["containers"][0]["command"]
    assert command[0] == "python3" and "SIGTERM" in command[-1]
    assert spec["containers"][0]["imagePullPolicy"] == "Never"
