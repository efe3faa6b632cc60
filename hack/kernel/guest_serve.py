"""Runs inside the test VM: executes the commands the host drops into a shared folder.

The host (tests/kernel/conftest.py) boots one VM per test module with this as its only program,
and a folder writable by both. A request is `requests/<id>.json` (argv, timeout, env); its
answer is `responses/<id>.json` (returncode, stdout, stderr, seconds), written whole and then
renamed, so the host never reads half of one. A request with "script" instead of "argv" runs a
Python file in a child forked from this process, which imported the modules named by --preload
once: under software emulation one import of the agent's modules takes half a minute, and a
forked child pays it never. A request {"stop": true} ends this program, and so powers the VM off. With no request for IDLE_LIMIT seconds it stops by itself, so a VM whose
host went away does not run on.

Standard library only, until the preloads are imported.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import platform
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback

POLL = 0.05
IDLE_POLL = 0.5  # after IDLE_AFTER seconds without a request: an emulated CPU is dear
IDLE_AFTER = 5.0
IDLE_LIMIT = 900.0


def _write(path: pathlib.Path, data: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


def _execute(request: dict[str, object]) -> dict[str, object]:
    argv = [str(a) for a in request["argv"]]  # type: ignore[attr-defined]
    env = {**os.environ, **request.get("env", {})}  # type: ignore[dict-item]
    started = time.monotonic()
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=env,
            cwd=str(request.get("cwd") or "/"),
            timeout=float(request.get("timeout", 300)),  # type: ignore[arg-type]
            stdin=subprocess.DEVNULL,
        )
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code = -1
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = (exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or "") + (
            f"\ntimed out after {exc.timeout}s"
        )
    except OSError as exc:
        code, out, err = -1, "", f"could not start {argv[0]}: {exc}"
    return {
        "returncode": code,
        "stdout": out,
        "stderr": err,
        "seconds": round(time.monotonic() - started, 3),
    }


def _run_script(request: dict[str, object]) -> dict[str, object]:
    """Runs request["script"] as __main__ in a forked child; its output and exit code."""
    script = str(request["script"])
    args = [str(a) for a in request.get("args", [])]  # type: ignore[attr-defined]
    timeout = float(request.get("timeout", 300))  # type: ignore[arg-type]
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path = pathlib.Path(tmp, "out"), pathlib.Path(tmp, "err")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(script, args, out_path, err_path, request.get("env", {}))  # never returns
        code = _wait(pid, timeout)
        out, err = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    if code is None:
        code, err = -1, err + f"\ntimed out after {timeout}s"
    return {
        "returncode": code,
        "stdout": out,
        "stderr": err,
        "seconds": round(time.monotonic() - started, 3),
    }


def _child(script: str, args: list[str], out: pathlib.Path, err: pathlib.Path, env: object) -> None:
    code = 1
    try:
        os.setsid()
        os.environ.update(env)  # type: ignore[arg-type]
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.argv = [script, *args]
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, timeout: float) -> int | None:
    """The child's exit code; None (and the child killed) after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(POLL)


def serve(shared: pathlib.Path, preload: list[str]) -> int:
    requests, responses = shared / "requests", shared / "responses"
    responses.mkdir(exist_ok=True)
    booted = _uptime()
    for module in preload:
        importlib.import_module(module)
    _write(
        shared / "ready.json",
        {
            "kernel": platform.release(),
            "booted": booted,
            "preloaded": round(_uptime() - booted, 3),
            "python": sys.version.split()[0],
        },
    )
    last = time.monotonic()
    while time.monotonic() - last < IDLE_LIMIT:
        pending = sorted(requests.glob("*.json"))
        if not pending:
            time.sleep(POLL if time.monotonic() - last < IDLE_AFTER else IDLE_POLL)
            continue
        for path in pending:
            request = json.loads(path.read_text())
            path.unlink()
            if request.get("stop"):
                _write(responses / path.name, {"returncode": 0, "stopped": True})
                return 0
            run = _run_script if "script" in request else _execute
            _write(responses / path.name, run(request))
        last = time.monotonic()
    return 1


def _uptime() -> float:
    return float(pathlib.Path("/proc/uptime").read_text().split()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shared", type=pathlib.Path, help="the folder the host shares")
    parser.add_argument("--preload", default="", help="modules to import once, comma-separated")
    args = parser.parse_args()
    return serve(args.shared, [m for m in args.preload.split(",") if m])


if __name__ == "__main__":
    sys.exit(main())
