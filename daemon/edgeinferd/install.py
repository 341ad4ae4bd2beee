"""Install or remove edgeinferd as a systemd service, in one command.

``edgeinferd install`` puts the daemon in its own virtual environment
(/opt/edgeinfer/venv), the unit, the service account (sysusers.d), the
ownership rules (tmpfiles.d), a default config (never overwriting one that
exists) and, optionally, an example model repository; then it tells systemd.
``edgeinferd uninstall`` undoes that, keeping the config and the models
unless ``--purge``.

``--root DIR`` installs into a staging tree (an image, a package) without
touching the running system: no accounts are created, nothing is chowned and
systemd is not called; the ownership meant for each path is printed and is
applied on the target by the tmpfiles.d rules at boot. ``--dry-run`` prints
the plan and changes nothing.

The unit, the sysusers/tmpfiles rules and the config template are read from
the project checkout (its ``systemd/`` folder), so the installed files are
exactly the ones reviewed and tested there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Layout", "main"]

USER = "edgeinfer"
GROUP = "edgeinfer"
UNIT_NAME = "edgeinferd.service"


@dataclass(frozen=True)
class Layout:
    """Where everything goes on the target system (absolute, before ``--root``)."""

    prefix: Path = Path("/opt/edgeinfer")
    unit: Path = Path("/etc/systemd/system") / UNIT_NAME
    sysusers: Path = Path("/usr/lib/sysusers.d/edgeinfer.conf")
    tmpfiles: Path = Path("/usr/lib/tmpfiles.d/edgeinfer.conf")
    config_dir: Path = Path("/etc/edgeinfer")
    config: Path = Path("/etc/edgeinfer/edgeinferd.toml")
    state_dir: Path = Path("/var/lib/edgeinfer")
    models: Path = Path("/var/lib/edgeinfer/models")

    @property
    def venv(self) -> Path:
        return self.prefix / "venv"

    @property
    def docs(self) -> Path:
        return self.prefix / "docs" / "operations.md"


# Files from the checkout's systemd/ folder, by their role.
SOURCES = {
    "unit": "edgeinferd.service",
    "sysusers": "edgeinferd.sysusers.conf",
    "tmpfiles": "edgeinferd.tmpfiles.conf",
    "config": "edgeinferd.toml",
}


def _checkout() -> Path | None:
    """The project checkout this module runs from, if it is one."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "systemd" / SOURCES["unit"]).is_file() else None


@dataclass
class Step:
    """One change to the system: what is printed, and how it is applied."""

    verb: str
    target: str
    detail: str = ""
    apply: Callable[[], None] | None = None

    def describe(self) -> str:
        return f"{self.verb:<8} {self.target}" + (f"  ({self.detail})" if self.detail else "")


@dataclass
class Plan:
    """The ordered steps of an install or uninstall, printed before (or instead of) running."""

    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(
        self, verb: str, target: object, detail: str = "", apply: Callable[[], None] | None = None
    ) -> None:
        self.steps.append(Step(verb, str(target), detail, apply))

    def run(self, dry_run: bool, out: Callable[[str], None]) -> None:
        out("plan (dry run, nothing changed):" if dry_run else "plan:")
        for step in self.steps:
            out("  " + step.describe())
            if not dry_run and step.apply is not None:
                step.apply()
        for note in self.notes:
            out(note)


class Installer:
    """Builds the plan for one invocation; paths are mapped under ``root``."""

    def __init__(self, root: Path | None, layout: Layout, out: Callable[[str], None]) -> None:
        self.root = root
        self.layout = layout
        self.out = out
        # Accounts exist and ownership can be applied only on the live system.
        self.live = root is None

    def path(self, target: Path) -> Path:
        return target if self.root is None else self.root / target.relative_to("/")

    # --- primitives ------------------------------------------------------------

    def _owner_note(self, user: str, group: str) -> str:
        applied_later = not self.live and (user, group) != ("root", "root")
        return f"owner {user}:{group}" + (", applied on the target by tmpfiles.d" * applied_later)

    def _chown(self, path: Path, user: str, group: str) -> None:
        if self.live:
            shutil.chown(path, user, group)

    def mkdir(
        self, plan: Plan, target: Path, mode: int, user: str = "root", group: str = "root"
    ) -> None:
        path = self.path(target)

        def apply() -> None:
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(mode)
            self._chown(path, user, group)

        plan.add("mkdir", target, f"{mode:04o} {self._owner_note(user, group)}", apply)

    def write(
        self,
        plan: Plan,
        target: Path,
        content: bytes,
        mode: int,
        user: str = "root",
        group: str = "root",
        *,
        keep_existing: bool = False,
    ) -> None:
        path = self.path(target)
        if keep_existing and path.exists():
            plan.add("keep", target, "already present, not overwritten")
            return

        def apply() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written beside and renamed: a reader never sees half a file.
            temporary = path.with_name(f".{path.name}.tmp")
            temporary.write_bytes(content)
            temporary.chmod(mode)
            self._chown(temporary, user, group)
            temporary.replace(path)

        plan.add("write", target, f"{mode:04o} {self._owner_note(user, group)}", apply)

    def remove(self, plan: Plan, target: Path) -> None:
        path = self.path(target)
        if not path.exists() and not path.is_symlink():
            return

        def apply() -> None:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

        plan.add("remove", target, "", apply)

    def command(self, plan: Plan, argv: list[str], detail: str = "") -> None:
        def apply() -> None:
            subprocess.run(argv, check=True)

        plan.add("run", " ".join(argv), detail, apply)

    # --- install -----------------------------------------------------------------

    def install(self, args: argparse.Namespace) -> Plan:
        plan = Plan()
        layout = self.layout
        source: Path = args.source
        files = {role: (source / "systemd" / name).read_bytes() for role, name in SOURCES.items()}

        if not args.skip_venv:
            self._venv(plan, args)

        self.write(plan, layout.sysusers, files["sysusers"], 0o644)
        self.write(plan, layout.tmpfiles, files["tmpfiles"], 0o644)
        if self.live:
            self._create_account(plan)

        self.write(plan, layout.unit, files["unit"], 0o644)
        # The unit's Documentation= points here, so `systemctl help` works offline.
        self.write(plan, layout.docs, (source / "docs" / "operations.md").read_bytes(), 0o644)
        self.mkdir(plan, layout.config_dir, 0o755)
        self.write(plan, layout.config, files["config"], 0o640, "root", GROUP, keep_existing=True)
        self.mkdir(plan, layout.state_dir, 0o750, USER, GROUP)
        self._models(plan, args.examples)

        if self.live and Path("/run/systemd/system").is_dir():
            self.command(plan, ["systemctl", "daemon-reload"])
            plan.notes.append(
                "next: systemctl enable --now edgeinferd; add client users to group "
                f"{GROUP} (usermod -aG {GROUP} USER)"
            )
        elif self.live:
            plan.notes.append(
                "systemd is not running here: nothing was reloaded. On the next boot, or "
                "once systemd runs: systemctl daemon-reload && systemctl enable --now edgeinferd"
            )
        else:
            plan.notes.append(
                f"installed under {self.root}: on the target, systemd-sysusers and "
                "systemd-tmpfiles --create create the account and apply ownership at boot; "
                "then systemctl enable --now edgeinferd"
            )
        return plan

    def _venv(self, plan: Plan, args: argparse.Namespace) -> None:
        venv = self.path(self.layout.venv)
        if not self.live:
            plan.notes.append(
                f"warning: a virtual environment records its own path; the one in {venv} "
                f"will only run once the tree is at / (build it on the target, or use --skip-venv)"
            )
        python: str = args.python
        if (venv / "bin" / "python").exists():
            plan.add("keep", self.layout.venv, "virtual environment already present")
        else:
            argv = [python, "-m", "venv"] + (["--without-pip"] if args.no_pip else []) + [str(venv)]
            self.command(plan, argv, "the daemon's own virtual environment")
        if args.no_pip:
            return
        requirement = f"{args.wheel or args.source}[daemon]"
        # The service cannot write bytecode next to the sources (ProtectSystem=
        # strict), so it must be there before the first start; compiling all of
        # torch takes minutes on a small device, while importing the daemon once
        # writes exactly the modules it loads.
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--upgrade", "--no-compile"]
        if args.wheelhouse is not None:
            pip += ["--no-index", "--find-links", str(args.wheelhouse)]
            detail = f"the daemon and its dependencies, offline from {args.wheelhouse}"
        else:
            detail = "the daemon and its dependencies"
        self.command(plan, [*pip, requirement], detail)
        self.command(
            plan,
            [str(venv / "bin" / "python"), "-c", "import edgeinferd.cli, edgeinferd.server"],
            "write the bytecode of the modules the daemon loads (the service cannot)",
        )

    def _create_account(self, plan: Plan) -> None:
        sysusers = shutil.which("systemd-sysusers")
        if sysusers is not None:
            self.command(plan, [sysusers, str(self.layout.sysusers)], f"user and group {USER}")
            return

        def apply() -> None:
            if subprocess.run(["getent", "passwd", USER], capture_output=True).returncode == 0:
                return
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--user-group",
                    "--home-dir",
                    str(self.layout.state_dir),
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--comment",
                    "edgeinfer inference daemon",
                    USER,
                ],
                check=True,
            )

        plan.add("run", f"useradd --system --user-group {USER}", "unless it exists", apply)

    def _models(self, plan: Plan, examples: Path | None) -> None:
        target = self.layout.models
        path = self.path(target)
        if path.exists():
            plan.add("keep", target, "model repository already present")
            return
        if examples is None:
            self.mkdir(plan, target, 0o750, "root", GROUP)
            return

        def apply() -> None:
            shutil.copytree(examples, path)
            for directory, _, names in os.walk(path):
                here = Path(directory)
                here.chmod(0o750)
                self._chown(here, "root", GROUP)
                for name in names:
                    (here / name).chmod(0o640)
                    self._chown(here / name, "root", GROUP)

        plan.add(
            "copy",
            f"{examples} -> {target}",
            f"dirs 0750, files 0640, {self._owner_note('root', GROUP)}",
            apply,
        )

    # --- uninstall ---------------------------------------------------------------

    def uninstall(self, args: argparse.Namespace) -> Plan:
        plan = Plan()
        layout = self.layout
        systemd_running = self.live and Path("/run/systemd/system").is_dir()
        if systemd_running and self.path(layout.unit).exists():
            self.command(plan, ["systemctl", "disable", "--now", UNIT_NAME])
        self.remove(plan, layout.unit)
        self.remove(plan, layout.tmpfiles)
        self.remove(plan, layout.sysusers)
        self.remove(plan, layout.prefix)
        if args.purge:
            self.remove(plan, layout.config_dir)
            self.remove(plan, layout.state_dir)
        else:
            plan.notes.append(
                f"kept {layout.config_dir} and {layout.state_dir} (use --purge to remove them)"
            )
        if systemd_running:
            self.command(plan, ["systemctl", "daemon-reload"])
        # Accounts stay: a reused UID would inherit any file the old one owned.
        plan.notes.append(f"kept user and group {USER} (remove with: userdel {USER})")
        return plan


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeinferd", description="Install or remove edgeinferd as a systemd service."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    install = commands.add_parser("install", help="install the daemon, unit, account and config")
    install.add_argument(
        "--source",
        type=Path,
        default=_checkout(),
        help="project checkout providing systemd/ files (and the package, unless --wheel)",
    )
    install.add_argument("--wheel", type=Path, help="install this wheel into the venv instead")
    install.add_argument(
        "--wheelhouse",
        type=Path,
        help="install offline: every dependency comes from the wheels in this folder",
    )
    install.add_argument(
        "--examples", type=Path, help="folder copied as the model repository if none exists"
    )
    install.add_argument("--python", default=sys.executable, help="interpreter for the venv")
    venv = install.add_mutually_exclusive_group()
    venv.add_argument(
        "--skip-venv", action="store_true", help="do not touch the virtual environment"
    )
    venv.add_argument(
        "--no-pip", action="store_true", help="create the venv but install nothing into it"
    )

    uninstall = commands.add_parser("uninstall", help="remove what install created")
    uninstall.add_argument("--purge", action="store_true", help="also remove the config and models")

    for command in (install, uninstall):
        command.add_argument("--root", type=Path, help="install into this staging tree (DESTDIR)")
        command.add_argument("--dry-run", action="store_true", help="print the plan only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``install ...`` or ``uninstall ...``; returns the process exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    root: Path | None = args.root.resolve() if args.root is not None else None

    if args.command == "install":
        if args.source is None or not (args.source / "systemd" / SOURCES["unit"]).is_file():
            parser.error(
                "--source must name the project checkout (with systemd/edgeinferd.service)"
            )
        args.source = args.source.resolve()
        if args.examples is not None and not args.examples.is_dir():
            parser.error(f"--examples {args.examples}: not a folder")
        if args.wheelhouse is not None and not args.wheelhouse.is_dir():
            parser.error(f"--wheelhouse {args.wheelhouse}: not a folder")
    if root is None and not args.dry_run and os.geteuid() != 0:
        parser.error("installing into the system needs root; use --root DIR to stage, or --dry-run")

    installer = Installer(root, Layout(), print)
    plan = installer.install(args) if args.command == "install" else installer.uninstall(args)
    try:
        plan.run(args.dry_run, print)
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"edgeinferd {args.command}: failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
