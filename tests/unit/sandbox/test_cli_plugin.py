"""`podwire` is the node's command line; the sandbox adds `podwire sandbox` as a plugin. Without
the plugin (an image that does not ship the sandbox) the node's commands still work and never
import it; with it, `podwire sandbox` offers its actions."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from podwire.agent import cli

# Run in a fresh interpreter: the sandbox cannot be importable, and is not, already.
WITHOUT_SANDBOX = textwrap.dedent(
    """
    import importlib.abc, importlib.metadata, sys

    class NoSandbox(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "podwire.sandbox" or name.startswith("podwire.sandbox."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoSandbox())
    if sys.argv[1] == "no-plugin":  # nothing registered in the group
        real = importlib.metadata.entry_points
        importlib.metadata.entry_points = (
            lambda **kw: [] if kw.get("group") == "podwire.cli" else real(**kw)
        )
    from podwire.agent import cli
    code = cli.main(sys.argv[2:])
    assert not [m for m in sys.modules if m.startswith("podwire.sandbox")], "sandbox imported"
    sys.exit(code)
    """
)


def _without_sandbox(how: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_SANDBOX, how, *argv],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("how", ["no-plugin", "plugin-not-installed"])
def test_the_node_cli_works_without_the_sandbox(how: str) -> None:
    helped = _without_sandbox(how, "--help")
    assert helped.returncode == 0, helped.stderr
    assert "status" in helped.stdout and "peers" in helped.stdout
    assert "sandbox" not in helped.stdout

    # No agent at the socket: the command runs, and says so as it does on a node.
    asked = _without_sandbox(how, "status", "--socket", "/nonexistent/agent.sock")
    assert asked.returncode == 1, asked.stderr
    assert "the agent at /nonexistent/agent.sock did not answer" in asked.stderr
    assert "Traceback" not in asked.stderr

    refused = _without_sandbox(how, "sandbox", "up")
    assert refused.returncode == 2 and "invalid choice: 'sandbox'" in refused.stderr


def test_the_sandbox_plugin_is_registered_and_lists_its_actions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert "sandbox" in cli._parser().format_help()
    with pytest.raises(SystemExit) as exc:
        cli.main(["sandbox", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for action in ("up", "down", "status", "verify"):
        assert action in out


def test_plugins_register_their_subcommands_and_handlers() -> None:
    def register(commands: object) -> None:
        hello = commands.add_parser("hello")  # type: ignore[attr-defined]
        hello.set_defaults(handler=lambda args: 7)

    assert cli._parser([register]).parse_args(["hello"]).handler(None) == 7
