"""The agent's and operator's only door to the Kubernetes API.

Everything else in podwire works on plain JSON dicts, as the API serves them (camelCase keys);
this module turns client calls into those dicts and back. Watches follow the informer pattern:
list (paged), then watch from the list's resourceVersion with bookmarks; on 410 Gone list
again; on a broken connection reconnect with backoff; relist every resync period anyway.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import kubernetes
from kubernetes.watch.watch import iter_resp_lines

from podwire.agent import log
from podwire.api import wgnode

Obj = dict[str, Any]

LIST_PAGE = 500
WATCH_TIMEOUT = 290  # the apiserver ends a watch after this; we simply start the next one
READ_TIMEOUT = 330  # a watch silent for longer than this is taken for a dead connection
BACKOFF_MIN, BACKOFF_MAX = 0.2, 30.0


class KubeError(RuntimeError):
    """A Kubernetes API call failed; carries the HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _error(e: kubernetes.client.ApiException, what: str) -> KubeError:
    reason = e.reason or ""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        reason = json.loads(e.body or "").get("message", reason)
    return KubeError(f"{what}: {e.status} {reason}", status=e.status)


class Client:
    """Typed calls on the resources podwire uses, returning and taking plain dicts."""

    def __init__(self, *, kubeconfig: str | None = None) -> None:
        """Raises KubeError when the kubeconfig (or the in-cluster config) cannot be used."""
        try:
            if kubeconfig:
                self.api = kubernetes.config.new_client_from_config(config_file=kubeconfig)
            else:
                cfg = kubernetes.client.Configuration()
                kubernetes.config.load_incluster_config(client_configuration=cfg)
                self.api = kubernetes.client.ApiClient(cfg)
        except Exception as e:  # a ConfigException, an OSError, a YAML error, a missing key...
            where = kubeconfig or "the in-cluster service account"
            raise KubeError(f"cannot use {where} to reach the apiserver: {e}") from None
        self.server_url: str = self.api.configuration.host  # https://host:port
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)

    # -- raw JSON in, raw JSON out -----------------------------------------------------------

    def _json(self, call: Callable[..., Any], *args: Any, what: str, **kwargs: Any) -> Obj:
        try:
            resp = call(*args, _preload_content=False, _request_timeout=(10, 60), **kwargs)
        except kubernetes.client.ApiException as e:
            raise _error(e, what) from e
        data: Obj = json.loads(resp.data)
        return data

    # -- Nodes ---------------------------------------------------------------------------------

    def get_node(self, name: str) -> Obj | None:
        try:
            return self._json(self.core.read_node, name, what=f"reading Node {name}")
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    # -- WireguardNodes ------------------------------------------------------------------------

    def _wg(self, method: str, *args: Any, what: str) -> Obj:
        """Calls CustomObjectsApi.<method> on the cluster-scoped wgnodes with args."""
        call: Callable[..., Any] = getattr(self.custom, method)
        return self._json(call, wgnode.GROUP, wgnode.VERSION, wgnode.PLURAL, *args, what=what)

    def get_wgnode(self, name: str) -> Obj | None:
        try:
            return self._wg("get_cluster_custom_object", name, what=f"reading WireguardNode {name}")
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def create_wgnode(self, body: Obj) -> Obj:
        name = body["metadata"]["name"]
        return self._wg("create_cluster_custom_object", body, what=f"creating WireguardNode {name}")

    def replace_wgnode(self, body: Obj) -> Obj:
        """Replaces the object as read: fails with status 409 if it changed since."""
        name = body["metadata"]["name"]
        return self._wg(
            "replace_cluster_custom_object", name, body, what=f"updating WireguardNode {name}"
        )

    def replace_wgnode_status(self, body: Obj) -> Obj:
        name = body["metadata"]["name"]
        what = f"updating the status of WireguardNode {name}"
        return self._wg("replace_cluster_custom_object_status", name, body, what=what)

    def patch_wgnode_status(self, name: str, patch: Obj) -> Obj:
        """A merge patch of the status subresource: the agent owns status, so no conflicts."""
        what = f"updating the status of WireguardNode {name}"
        return self._wg("patch_cluster_custom_object_status", name, patch, what=what)

    def patch_wgnode_metadata(self, name: str, patch: Obj) -> Obj:
        return self._wg(
            "patch_cluster_custom_object", name, patch, what=f"patching WireguardNode {name}"
        )

    def delete_wgnode(self, name: str) -> None:
        try:
            self._wg("delete_cluster_custom_object", name, what=f"deleting WireguardNode {name}")
        except KubeError as e:
            if e.status != 404:
                raise

    # -- Events --------------------------------------------------------------------------------

    def emit_event(
        self,
        *,
        involved: Obj,
        reason: str,
        message: str,
        event_type: str = "Normal",
        component: str = "podwire-agent",
        namespace: str = "default",
    ) -> None:
        """Records a core/v1 Event about involved (a Node or WireguardNode as read)."""
        meta = involved.get("metadata", {})
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'podwire')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta.get("name"),
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message,
            "type": event_type,
            "source": {"component": component},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self._json(
            self.core.create_namespaced_event, namespace, body, what=f"recording event {reason}"
        )

    # -- list and watch ------------------------------------------------------------------------

    def lister(self, kind: str) -> Callable[..., Any]:
        if kind == "nodes":
            return self.core.list_node

        def list_wgnodes(**kwargs: Any) -> Any:
            return self.custom.list_cluster_custom_object(
                wgnode.GROUP, wgnode.VERSION, wgnode.PLURAL, **kwargs
            )

        return list_wgnodes

    def list_all(self, kind: str) -> tuple[list[Obj], str]:
        """Every object of kind, in pages; returns them and the list's resourceVersion."""
        items: list[Obj] = []
        cont: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": LIST_PAGE}
            if cont:
                kwargs["_continue"] = cont
            page = self._json(self.lister(kind), what=f"listing {kind}", **kwargs)
            items.extend(page.get("items", []))
            cont = page.get("metadata", {}).get("continue")
            if not cont:
                return items, page["metadata"]["resourceVersion"]

    def watch_events(
        self, kind: str, resource_version: str, *, timeout_seconds: int = WATCH_TIMEOUT
    ) -> Iterator[Obj]:
        """Raw watch events from resource_version on; ends when the server ends the watch."""
        try:
            resp = self.lister(kind)(
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_seconds,
                _preload_content=False,
                _request_timeout=(10, READ_TIMEOUT),
            )
        except kubernetes.client.ApiException as e:
            raise _error(e, f"watching {kind}") from e
        try:
            for line in iter_resp_lines(resp):
                if line:
                    yield json.loads(line)
        finally:
            resp.release_conn()


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


@dataclass
class Informer:
    """A local copy of one kind of object, kept current by list and watch.

    on_change() is called (from the informer's thread) after every change to the copy and
    after every relist; consumers read `objects` and `synced` then, level-triggered.
    """

    client: Client
    kind: str
    on_change: Callable[[], None]
    resync_period: float = 300.0
    objects: dict[str, Obj] = field(default_factory=dict)
    synced: bool = False
    restarts: int = 0
    last_error: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    _log: Any = field(default_factory=lambda: log.get("informer"))

    def snapshot(self) -> list[Obj]:
        with self._lock:
            return list(self.objects.values())

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"informer-{self.kind}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        backoff = BACKOFF_MIN
        while not self._stop.is_set():
            try:
                rv = self._relist()
                backoff = BACKOFF_MIN
                deadline = time.monotonic() + self.resync_period
                while not self._stop.is_set() and time.monotonic() < deadline:
                    rv = self._watch_once(rv)
            except Gone:
                self.restarts += 1
                self._log.info("watch_expired_relisting", kind=self.kind)
                continue
            except Exception as e:  # the connection broke, the apiserver is away, ...
                # The copy is kept as it was: nothing is removed while the apiserver is away.
                self.last_error = str(e)
                self.restarts += 1
                self._log.warning(
                    "watch_failed", kind=self.kind, error=str(e), retry_in=round(backoff, 2)
                )
                self._stop.wait(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _relist(self) -> str:
        items, rv = self.client.list_all(self.kind)
        with self._lock:
            self.objects = {o["metadata"]["name"]: o for o in items}
            self.synced = True
            self.last_error = ""
        self.on_change()
        return rv

    def _watch_once(self, rv: str, *, timeout_seconds: int = WATCH_TIMEOUT) -> str:
        for ev in self.client.watch_events(self.kind, rv, timeout_seconds=timeout_seconds):
            if self._stop.is_set():
                break
            etype, obj = ev.get("type"), ev.get("object") or {}
            if etype == "ERROR":
                if obj.get("code") == 410:
                    raise Gone()
                raise KubeError(
                    f"watch of {self.kind} failed: {obj.get('message')}", status=obj.get("code")
                )
            meta = obj.get("metadata", {})
            rv = meta.get("resourceVersion", rv)
            if etype == "BOOKMARK":
                continue
            name = meta.get("name")
            if not name:
                continue
            with self._lock:
                if etype == "DELETED":
                    self.objects.pop(name, None)
                else:
                    self.objects[name] = obj
            self.on_change()
        return rv
