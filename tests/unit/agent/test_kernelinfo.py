"""Where the agent finds the kernel's build configuration and command line (kernelinfo)."""

from __future__ import annotations

import gzip
import pathlib

from podwire.agent import advisories
from podwire.agent.netlink import kernelinfo

DEFAULT_ON = "CONFIG_FOO=y\nCONFIG_INIT_ON_ALLOC_DEFAULT_ON=y\n"


def test_the_config_in_boot_for_the_running_release_comes_first(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config-6.12.0-1-amd64").write_text(DEFAULT_ON)
    (tmp_path / "config-6.1.0-9-amd64").write_text("# CONFIG_INIT_ON_ALLOC_DEFAULT_ON is not set\n")
    proc = tmp_path / "config.gz"
    proc.write_bytes(gzip.compress(b"# CONFIG_INIT_ON_ALLOC_DEFAULT_ON is not set\n"))
    text, where = kernelinfo.kernel_config(release="6.12.0-1-amd64", boot=tmp_path, proc=proc)
    assert where == str(tmp_path / "config-6.12.0-1-amd64")
    assert advisories.init_on_alloc("quiet", text) is True


def test_proc_config_gz_when_boot_has_none(tmp_path: pathlib.Path) -> None:
    proc = tmp_path / "config.gz"
    proc.write_bytes(gzip.compress(DEFAULT_ON.encode()))
    text, where = kernelinfo.kernel_config(release="7.0", boot=tmp_path / "boot", proc=proc)
    assert where == str(proc)
    assert advisories.init_on_alloc("quiet", text) is True


def test_neither_is_unknown_and_says_where_it_looked(tmp_path: pathlib.Path) -> None:
    text, why = kernelinfo.kernel_config(release="7.0", boot=tmp_path, proc=tmp_path / "none.gz")
    assert text is None
    assert str(tmp_path / "config-7.0") in why and "none.gz" in why
    assert advisories.init_on_alloc("quiet", text) is None


def test_a_damaged_config_gz_is_unknown(tmp_path: pathlib.Path) -> None:
    proc = tmp_path / "config.gz"
    proc.write_bytes(b"not gzip")
    assert kernelinfo.kernel_config(release="7.0", boot=tmp_path, proc=proc)[0] is None


def test_the_command_line_or_none(tmp_path: pathlib.Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("BOOT_IMAGE=/vmlinuz init_on_alloc=0 quiet\n")
    assert advisories.init_on_alloc(kernelinfo.cmdline(cmdline), DEFAULT_ON) is False
    assert kernelinfo.cmdline(tmp_path / "absent") is None


def test_threaded_napi_of_a_device_that_is_not_there_is_unknown() -> None:
    assert kernelinfo.threaded_napi("pw-no-such-dev") is None
    assert "no threaded NAPI switch" in kernelinfo.set_threaded_napi("pw-no-such-dev")
