"""The coordination.k8s.io/v1 Lease calls leader election needs: get, create, replace.

podwire.agent.kube, the one module that imports the Kubernetes client, has no Lease calls (the
agent needs none), so these go through the ApiClient that kube.Client built, by path, and turn
answers into the same plain dicts and KubeError. They belong in kube.Client; until they move
there, this is the only other place that speaks to the apiserver directly.
"""

from __future__ import annotations

import json
from typing import Any

from podwire.agent import kube

Obj = dict[str, Any]

_PATH = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
TIMEOUT = (5, 10)  # a lease call slower than this is as good as failed


class LeaseApi:
    """One Lease, by namespace and name."""

    def __init__(self, client: kube.Client, *, namespace: str, name: str) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name

    def get(self) -> Obj | None:
        try:
            return self._call("GET", f"/{self.name}", what=f"reading Lease {self._where}")
        except kube.KubeError as e:
            if e.status == 404:
                return None
            raise

    def create(self, body: Obj) -> Obj:
        return self._call("POST", "", body=body, what=f"creating Lease {self._where}")

    def replace(self, body: Obj) -> Obj:
        """Fails with status 409 when the lease changed since body's resourceVersion."""
        return self._call("PUT", f"/{self.name}", body=body, what=f"updating Lease {self._where}")

    @property
    def _where(self) -> str:
        return f"{self.namespace}/{self.name}"

    def _call(self, method: str, suffix: str, *, what: str, body: Obj | None = None) -> Obj:
        api: Any = self.client.api
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            request = api.param_serialize(
                method=method,
                resource_path=_PATH + suffix,
                path_params={"namespace": self.namespace},
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            resp = api.call_api(*request, _request_timeout=TIMEOUT)
            resp.read()
        except Exception as e:  # refused, timed out, TLS: the apiserver is out of reach
            raise kube.KubeError(f"{what}: {e}", status=getattr(e, "status", None)) from e
        status = int(resp.status)
        data: Obj = json.loads(resp.data or b"{}")
        if status >= 300:
            raise kube.KubeError(f"{what}: {status} {data.get('message', '')}", status=status)
        return data
