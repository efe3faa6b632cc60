"""The sandbox's operator replicas: started into the record, one leads, `status` says which, and
stopping them hands nothing to nobody (the record is empty of them again)."""

from __future__ import annotations

import pathlib

from podwire.sandbox import controlplane, operatorproc, record
from tests.integration.operator.conftest import wait_for


def test_sandbox_operators_start_lead_report_and_stop(
    crds: controlplane.ControlPlane, namespace: str, tmp_path: pathlib.Path
) -> None:
    rec = record.Record()
    try:
        procs = operatorproc.start(rec, kubeconfig=crds.kubeconfig, workdir=tmp_path, namespace=namespace)  # fmt: skip
        assert [p.role for p in rec.processes] == ["operator", "operator"]

        def one_leader() -> list[operatorproc.Replica] | None:
            replicas = operatorproc.status(rec)
            return replicas if sum(r.leader for r in replicas) == 1 and all(r.ready for r in replicas) else None  # fmt: skip

        replicas = wait_for(one_leader, timeout=20, what="one leader, both ready")
        assert sorted(r.identity for r in replicas) == ["operator1", "operator2"]
        assert all(r.alive and r.metrics_port for r in replicas)
    finally:
        operatorproc.stop(rec)
    assert rec.find("operator") == []
    assert not any(p.alive() for p in procs)
