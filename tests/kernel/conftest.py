"""The kernel tier: a kernel with WireGuard, booted under QEMU, with this machine's root as its own.

This machine's kernel may have no WireGuard, so each test module boots the kernel that
hack/kernel/fetch.sh put in .cache/kernel, with virtme-ng: the guest sees the whole root
read-only (the repository and .venv included) and one folder of the host's read-write, through
which the host hands it commands (hack/kernel/guest_serve.py) and reads their results. Inside,
the tests make network namespaces as the integration tier does on the host.

One boot for the tier (under software emulation some 20 s to boot and as much again to import
the agent's modules); the VM is stopped, and killed by PID if it will not stop, whatever the
tests did. It boots with `init_on_alloc=1` (this Debian kernel's own default, said on the
command line so that the agent can tell); test_advisories.py boots a second VM with `=0`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
KERNEL_CACHE = REPO / ".cache" / "kernel"
GUEST_SERVE = REPO / "hack" / "kernel" / "guest_serve.py"
GUEST_SCRIPTS = pathlib.Path(__file__).resolve().parent / "guest"
# iproute2 recent enough to print the IPv4 BIG TCP sizes: the tests' own, independent reading.
GUEST_IP = KERNEL_CACHE / "iproute2" / "bin" / "ip"

# Imported once by the guest's command server, so that each guest script starts at once
# (hack/kernel/guest_serve.py): each costs seconds to import under software emulation.
PRELOAD = (
    "pyroute2",
    "podwire.agent.config",
    "podwire.agent.datapath",
    "podwire.agent.netlink",
    "podwire.sandbox.netns",
    "podwire.sandbox.tools",
)
BOOT_TIMEOUT = 300.0
# The session VM's kernel parameters: the agent reads init_on_alloc from the command line.
SESSION_CMDLINE = ("init_on_alloc=1",)
SETUP_HINT = "run `hack/setup.sh` (or `make test`): it installs QEMU, virtme-ng and the kernel"


class VmError(RuntimeError):
    """The VM did not boot, or a command in it could not be run; the message has its console."""


@dataclasses.dataclass(frozen=True)
class Result:
    argv: Sequence[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def check(self) -> Result:
        if self.returncode != 0:
            raise VmError(
                f"in the VM, `{' '.join(self.argv)}` exited {self.returncode}:\n"
                f"{self.stdout[-4000:]}\n{self.stderr[-8000:]}"
            )
        return self


def kernel_image() -> pathlib.Path:
    images = sorted(KERNEL_CACHE.glob("root/usr/lib/modules/*/vmlinuz"))
    if not images:
        pytest.fail(f"no test kernel in {KERNEL_CACHE}: {SETUP_HINT}", pytrace=False)
    return images[-1]


class GuestVM:
    """One VM: boot() it, run() commands in it, stop() it; the shared folder is `shared`."""

    def __init__(
        self,
        shared: pathlib.Path,
        *,
        cpus: int = 2,
        memory: str = "1G",
        append: Sequence[str] = SESSION_CMDLINE,
    ) -> None:
        self.shared = shared
        self.append = tuple(append)  # kernel command-line parameters
        self.cpus = cpus
        self.memory = memory
        self.console = shared / "console.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.boot_seconds = 0.0
        self.kernel = ""
        self.ready: dict[str, object] = {}
        self._ids = itertools.count(1)

    def command(self) -> list[str]:
        vng = VENV_BIN / "vng"
        if not vng.exists():
            pytest.fail(f"virtme-ng is not installed in .venv: {SETUP_HINT}", pytrace=False)
        args = [
            str(vng), "--run", str(kernel_image()),
            "--cpus", str(self.cpus), "--memory", self.memory,
            "--rwdir", str(self.shared), "--cwd", str(REPO),
            "--exec", f"{sys.executable} {GUEST_SERVE} {self.shared} --preload {','.join(PRELOAD)}",
            # The guest kernel's console to ours (the console log; vng's --verbose): without
            # it a guest that panics or reboots (QEMU runs with -no-reboot, so either ends it)
            # leaves nothing to say why. loglevel=4 below keeps it to warnings and worse: the
            # OOM killer, lockups, hung tasks, panics.
            "--verbose",
        ]  # fmt: skip
        for parameter in (*self.append, "loglevel=4"):
            args += ["--append", parameter]
        # This machine's /dev/kvm may be present and still unusable (nested virtualization):
        # software emulation unless told that KVM works.
        if os.environ.get("PODWIRE_VM_KVM") != "1":
            # One host thread runs both vCPUs (QEMU's default is a thread each). The guest
            # kernel rewrites its own code while running (an int3 put over the bytes, the
            # other CPUs synced by an IPI, the int3 taken away); with a thread per vCPU one of
            # them can still run a stale translation holding that int3 after the sync, and the
            # guest dies at boot with "Oops: int3" (CI, 2026-12-01: in ktime_get_with_offset,
            # from init's clone). With one thread a write invalidates the stale translation
            # before the other vCPU runs again.
            args += ["--disable-kvm", "--qemu-opt=-accel", "--qemu-opt=tcg,thread=single"]
        return args

    def boot(self, timeout: float = BOOT_TIMEOUT) -> None:
        (self.shared / "requests").mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        started = time.monotonic()
        with open(self.console, "ab") as out:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, cwd=REPO, start_new_session=True,
            )  # fmt: skip
        ready = self.shared / "ready.json"
        while not ready.exists():
            if self.process.poll() is not None:
                raise VmError(f"the VM exited ({self.process.returncode}) before it was ready:\n"
                              f"{self.tail()}")  # fmt: skip
            if time.monotonic() - started > timeout:
                raise VmError(f"the VM was not ready after {timeout}s:\n{self.tail()}")
            time.sleep(0.1)
        self.boot_seconds = time.monotonic() - started
        self.ready = json.loads(ready.read_text())
        self.kernel = str(self.ready["kernel"])

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        timeout: float = 300,
        env: dict[str, str] | None = None,
    ) -> Result:
        """Runs argv in the guest (as root, cwd the repository) and waits for its answer."""
        request = {"argv": [str(a) for a in argv], "timeout": timeout, "env": env or {},
                   "cwd": str(REPO)}  # fmt: skip
        return self._request(request, [str(a) for a in argv], timeout)

    def _request(self, request: dict[str, object], argv: list[str], timeout: float) -> Result:
        assert self.process is not None, "boot() first"
        name = f"{next(self._ids):05d}.json"
        tmp = self.shared / "requests" / (name + ".tmp")
        tmp.write_text(json.dumps(request))
        tmp.rename(self.shared / "requests" / name)
        answer = self.shared / "responses" / name
        deadline = time.monotonic() + timeout + 30
        while not answer.exists():
            if self.process.poll() is not None:
                raise VmError(
                    f"the VM died running {argv} (QEMU exited {self.process.returncode}):\n"
                    f"{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise VmError(f"no answer from the VM for {argv} after {timeout + 30}s")
            time.sleep(0.05)
        got = json.loads(answer.read_text())
        return Result(argv, got["returncode"], got["stdout"], got["stderr"], got["seconds"])

    def python(self, script: str, *args: str, timeout: float = 300) -> dict[str, object]:
        """Runs tests/kernel/guest/<script> in a child of the guest's preloaded Python; its JSON."""
        path = str(GUEST_SCRIPTS / script)
        request = {"script": path, "args": list(args), "timeout": timeout}
        result = self._request(request, [path, *args], timeout).check()
        lines = result.stdout.strip().splitlines()
        if not lines:
            raise VmError(f"{script} printed nothing:\n{result.stderr[-8000:]}")
        facts: dict[str, object] = json.loads(lines[-1])
        facts["_stderr"] = result.stderr
        facts["_seconds"] = result.seconds
        return facts

    def tail(self, lines: int = 60) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, grace: float = 30.0) -> None:
        """Asks the guest to power off; kills QEMU and vng by PID if it does not."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                tmp = self.shared / "requests" / "99999.json.tmp"
                tmp.write_text(json.dumps({"stop": True}))
                tmp.rename(self.shared / "requests" / "99999.json")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        if proc.poll() is None:
            for pid in [*_descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(10)
        self.process = None


def _descendants(pid: int) -> list[int]:
    """The processes started under pid (vng runs QEMU, QEMU may run helpers), deepest first."""
    found: list[int] = []
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found = [*_descendants(int(child)), int(child), *found]
    return found


_running: list[GuestVM] = []


@contextlib.contextmanager
def booted(shared: pathlib.Path, *, append: Sequence[str]) -> Iterator[GuestVM]:
    """Another VM, for a test that needs other kernel parameters; stopped (or killed) after."""
    guest = GuestVM(shared, append=append)
    _running.append(guest)
    try:
        guest.boot()
        yield guest
    finally:
        guest.stop()
        _running.remove(guest)


@pytest.fixture(scope="session")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestVM]:
    """One booted VM for the whole tier; stopped (or killed) afterwards, even on failure."""
    guest = GuestVM(pathlib.Path(tmp_path_factory.mktemp("vm")))
    _running.append(guest)
    try:
        guest.boot()
        print(f"\nkernel {guest.kernel}: ready in {guest.boot_seconds:.1f}s (booted "
              f"{guest.ready['booted']}s, preloaded {guest.ready['preloaded']}s)")  # fmt: skip
        yield guest
    finally:
        guest.stop()
        _running.remove(guest)


@pytest.fixture(scope="module")
def vm_init_on_alloc_off(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestVM]:
    """A second VM, booted with `init_on_alloc=0`, for the module that asks for it."""
    shared = pathlib.Path(tmp_path_factory.mktemp("vm-init-on-alloc-off"))
    with booted(shared, append=("init_on_alloc=0",)) as guest:
        print(f"\nkernel {guest.kernel} with init_on_alloc=0: ready in {guest.boot_seconds:.1f}s")
        yield guest


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    # The VM is the session's, but the other tiers that run after this one in the same session
    # should not share the machine's two cores with an emulated one: stop it after the last
    # kernel test (the fixture's own teardown then has nothing left to do).
    here = pathlib.Path(__file__).resolve().parent
    if nextitem is None or here not in pathlib.Path(str(nextitem.fspath)).resolve().parents:
        for guest in _running:
            guest.stop()
