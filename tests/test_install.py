"""`edgeinferd install/uninstall` into a staging root, never the running system."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgeinferd.install import main

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_FILES = REPO / "systemd"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    folder = tmp_path / "examples"
    (folder / "digits" / "1").mkdir(parents=True)
    (folder / "digits" / "config.toml").write_text("max_batch_size = 8\n")
    (folder / "digits" / "1" / "model.pt").write_bytes(b"not really a model")
    return folder


def install(root: Path, *extra: str) -> int:
    return main(["install", "--root", str(root), "--source", str(REPO), "--skip-venv", *extra])


def test_install_stages_every_file_with_its_mode(tmp_path: Path, examples: Path) -> None:
    """Under --root the unit, account rules, config and models land with their intended modes."""
    root = tmp_path / "root"
    assert install(root, "--examples", str(examples)) == 0
    unit = root / "etc/systemd/system/edgeinferd.service"
    config = root / "etc/edgeinfer/edgeinferd.toml"
    sysusers = root / "usr/lib/sysusers.d/edgeinfer.conf"
    tmpfiles = root / "usr/lib/tmpfiles.d/edgeinfer.conf"
    models = root / "var/lib/edgeinfer/models"
    assert unit.read_bytes() == (SYSTEMD_FILES / "edgeinferd.service").read_bytes()
    assert config.read_bytes() == (SYSTEMD_FILES / "edgeinferd.toml").read_bytes()
    assert sysusers.read_bytes() == (SYSTEMD_FILES / "edgeinferd.sysusers.conf").read_bytes()
    assert tmpfiles.read_bytes() == (SYSTEMD_FILES / "edgeinferd.tmpfiles.conf").read_bytes()
    assert [mode(unit), mode(config), mode(sysusers), mode(tmpfiles)] == [
        0o644,
        0o640,
        0o644,
        0o644,
    ]
    assert mode(root / "etc/edgeinfer") == 0o755
    assert mode(root / "var/lib/edgeinfer") == 0o750
    assert (models / "digits/1/model.pt").read_bytes() == b"not really a model"
    assert [mode(models), mode(models / "digits"), mode(models / "digits/1")] == [0o750] * 3
    assert mode(models / "digits/1/model.pt") == 0o640
    docs = root / "opt/edgeinfer/docs/operations.md"
    assert docs.read_bytes() == (REPO / "docs/operations.md").read_bytes()
    assert mode(docs) == 0o644
    assert not (root / "opt/edgeinfer/venv").exists()  # --skip-venv


def test_plan_records_the_owners_meant_for_the_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The printed plan says who should own the config and state, since --root chowns nothing."""
    assert install(tmp_path / "root") == 0
    plan = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert (
        "0640 owner root:edgeinfer, applied on the target" in plan["/etc/edgeinfer/edgeinferd.toml"]
    )
    assert "0750 owner edgeinfer:edgeinfer, applied on the target" in plan["/var/lib/edgeinfer"]
    assert not any(line.split()[0] == "run" for line in plan.values())  # no useradd, no systemctl


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers/systemd-tmpfiles not installed (Debian: apt-get install systemd)",
)
@pytest.mark.skipif(os.geteuid() != 0, reason="applying ownership in the staged tree needs root")
def test_staged_rules_create_the_account_and_ownership(tmp_path: Path, examples: Path) -> None:
    """systemd-sysusers and systemd-tmpfiles, run on the staged tree, give the intended owners."""
    root = tmp_path / "root"
    assert install(root, "--examples", str(examples)) == 0
    subprocess.run(["systemd-sysusers", f"--root={root}"], check=True, capture_output=True)
    subprocess.run(
        ["systemd-tmpfiles", f"--root={root}", "--create"], check=True, capture_output=True
    )
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    groups = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/group").read_text().splitlines()
    }
    uid, gid = int(passwd["edgeinfer"][2]), int(groups["edgeinfer"][2])
    assert passwd["edgeinfer"][6] == "/usr/sbin/nologin"
    config = (root / "etc/edgeinfer/edgeinferd.toml").stat()
    assert (config.st_uid, config.st_gid, stat.S_IMODE(config.st_mode)) == (0, gid, 0o640)
    state = (root / "var/lib/edgeinfer").stat()
    assert (state.st_uid, state.st_gid) == (uid, gid)
    model = (root / "var/lib/edgeinfer/models/digits/1/model.pt").stat()
    assert (model.st_uid, model.st_gid) == (0, gid)


def test_existing_config_and_models_are_kept(tmp_path: Path, examples: Path) -> None:
    """A second install leaves an edited config and an existing repository untouched."""
    root = tmp_path / "root"
    assert install(root) == 0
    config = root / "etc/edgeinfer/edgeinferd.toml"
    config.write_text('repository = "/srv/models"\n')
    (root / "var/lib/edgeinfer/models/mine").mkdir()
    assert install(root, "--examples", str(examples)) == 0
    assert config.read_text() == 'repository = "/srv/models"\n'
    assert sorted(p.name for p in (root / "var/lib/edgeinfer/models").iterdir()) == ["mine"]


def test_dry_run_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--dry-run prints the plan and creates no file."""
    root = tmp_path / "root"
    assert install(root, "--dry-run") == 0
    assert not root.exists()
    assert "write    /etc/systemd/system/edgeinferd.service" in capsys.readouterr().out


def test_uninstall_keeps_config_and_models_unless_purged(tmp_path: Path, examples: Path) -> None:
    """Uninstall removes the unit, rules and venv; only --purge removes config and models."""
    root = tmp_path / "root"
    assert install(root, "--examples", str(examples)) == 0
    (root / "opt/edgeinfer/venv/bin").mkdir(parents=True)  # as a real install leaves it
    assert (root / "opt/edgeinfer/docs/operations.md").exists()
    assert main(["uninstall", "--root", str(root)]) == 0
    assert not (root / "etc/systemd/system/edgeinferd.service").exists()
    assert not (root / "usr/lib/sysusers.d/edgeinfer.conf").exists()
    assert not (root / "usr/lib/tmpfiles.d/edgeinfer.conf").exists()
    assert not (root / "opt/edgeinfer").exists()
    assert (root / "etc/edgeinfer/edgeinferd.toml").exists()
    assert (root / "var/lib/edgeinfer/models/digits/1/model.pt").exists()
    assert main(["uninstall", "--root", str(root), "--purge"]) == 0
    assert not (root / "etc/edgeinfer").exists()
    assert not (root / "var/lib/edgeinfer").exists()


def test_no_pip_creates_an_empty_virtual_environment(tmp_path: Path) -> None:
    """--no-pip builds the daemon's venv under the root but installs nothing into it."""
    root = tmp_path / "root"
    code = main(["install", "--root", str(root), "--source", str(REPO), "--no-pip"])
    assert code == 0
    venv = root / "opt/edgeinfer/venv"
    assert (venv / "pyvenv.cfg").is_file()
    assert os.access(venv / "bin/python", os.X_OK)
    assert not list(venv.glob("lib/python*/site-packages/edgeinfer*"))


def test_bad_examples_folder_is_refused(tmp_path: Path) -> None:
    """An --examples path that is not a folder stops the install before anything is written."""
    root = tmp_path / "root"
    with pytest.raises(SystemExit) as exit_info:
        install(root, "--examples", str(tmp_path / "nope"))
    assert exit_info.value.code == 2
    assert not root.exists()


def test_runs_as_a_module(tmp_path: Path) -> None:
    """`python -m edgeinferd.install install --dry-run` works without the CLI wiring."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "daemon"), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeinferd.install",
            "install",
            "--root",
            str(tmp_path),
            "--skip-venv",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "plan (dry run, nothing changed):" in result.stdout


def test_default_config_is_accepted_by_the_daemon() -> None:
    """The config the installer ships loads cleanly and matches the unit's paths."""
    from edgeinferd.config import load_config

    config = load_config(SYSTEMD_FILES / "edgeinferd.toml")
    assert config.repository == Path("/var/lib/edgeinfer/models")
    assert config.listen.unix == Path("/run/edgeinfer/edgeinfer.sock")
    assert config.listen.unix_mode == 0o660
    assert config.listen.tcp is None
    assert config.metrics_listen is None
    assert config.grace_period_s < 30  # the unit's TimeoutStopSec


def test_offline_install_plan_uses_only_the_wheelhouse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--wheelhouse installs with pip --no-index from that folder, skips pip's compile-all
    and writes the bytecode of what the daemon imports instead (the service cannot)."""
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    root = tmp_path / "root"
    argv = ["install", "--root", str(root), "--source", str(REPO), "--dry-run"]
    assert main([*argv, "--wheelhouse", str(wheelhouse)]) == 0
    out = capsys.readouterr().out
    venv_python = f"{root}/opt/edgeinfer/venv/bin/python"
    assert (
        f"run      {venv_python} -m pip install --upgrade --no-compile --no-index "
        f"--find-links {wheelhouse} {REPO}[daemon]"
    ) in out
    assert f"run      {venv_python} -c import edgeinferd.cli, edgeinferd.server" in out
    assert not root.exists()
    with pytest.raises(SystemExit):
        main([*argv, "--wheelhouse", str(tmp_path / "missing")])
    assert "--wheelhouse" in capsys.readouterr().err
