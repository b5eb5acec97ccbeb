"""A private Docker Engine and Compose for `make test-deploy`, from Debian.

Bookworm's `docker.io` (20.10) is too old for the compose file (health check
`start_interval` needs Engine 25+), so trixie's `docker.io` 26.1, `docker-cli`,
`containerd`, `docker-compose` 2.26 and `docker-buildx` are downloaded with
`apt-get download` (trixie's package lists kept in a private apt directory)
and *extracted* with `dpkg-deb -x` into a prefix: installing them would pull
trixie's libc. `runc` is bookworm's (trixie's needs GLIBC 2.38), `tini`
bookworm's `docker-init`. `dockerd` runs with its own socket, data root, exec
root and containerd namespace (`--storage-driver overlay2`), so it touches no
Docker the machine may already have. `iptables` (bridge networking) and
`debootstrap` (the python stand-in) come from bookworm, installed when
missing.

Everything lives under STATE (default /var/tmp/marie-deploy, or
MARIE_DEPLOY_STATE): never in the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

STATE = Path(os.environ.get("MARIE_DEPLOY_STATE", "/var/tmp/marie-deploy"))
PREFIX = STATE / "prefix"
SOCKET = STATE / "run" / "docker.sock"
DOCKER_HOST = f"unix://{SOCKET}"
TRIXIE_PACKAGES = ("docker.io", "docker-cli", "containerd", "docker-compose", "docker-buildx")
BOOKWORM_PACKAGES = ("runc", "tini")
HOST_PACKAGES = {"iptables": "iptables", "debootstrap": "debootstrap"}
START_TIMEOUT_SECONDS = 60.0


def log(message: str) -> None:
    print(f"[test-deploy] {message}", flush=True)


def run(*command: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(part) for part in command], check=True, text=True, **kwargs)


def environment() -> dict[str, str]:
    """The environment in which `docker` and `docker compose` reach this engine."""
    path = f"{PREFIX}/usr/sbin:{PREFIX}/usr/bin:{os.environ['PATH']}"
    return {
        **os.environ,
        "PATH": path,
        "DOCKER_HOST": DOCKER_HOST,
        # The compose plugin comes from the prefix, not ~/.docker.
        "DOCKER_CONFIG": str(STATE / "docker-config"),
    }


def _apt_options(apt_dir: Path) -> list[str]:
    return [
        f"-oDir::Etc::sourcelist={apt_dir / 'sources.list'}",
        f"-oDir::Etc::sourceparts={apt_dir / 'sources.list.d'}",
        f"-oDir::State::Lists={apt_dir / 'lists'}",
        f"-oDir::Cache={apt_dir / 'cache'}",
    ]


def _download(packages: tuple[str, ...], into: Path, apt_options: list[str]) -> None:
    # `_apt` cannot write to a root-owned directory: download unsandboxed.
    run(
        "apt-get", *apt_options, "-oAPT::Sandbox::User=root", "-qq", "download", *packages, cwd=into
    )


def install() -> None:
    """Extracts the engine into PREFIX once; installs iptables and debootstrap when missing."""
    missing = [package for command, package in HOST_PACKAGES.items() if not shutil.which(command)]
    if missing:
        log(f"installing {' '.join(missing)} (bookworm)")
        run("apt-get", "-qq", "update")
        run(
            "apt-get",
            "install",
            "-y",
            "-qq",
            *missing,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    if (PREFIX / "usr" / "sbin" / "dockerd").exists():
        return
    debs = STATE / "debs"
    apt_dir = STATE / "apt"
    for folder in (
        debs,
        apt_dir / "sources.list.d",
        apt_dir / "lists" / "partial",
        apt_dir / "cache" / "archives" / "partial",
    ):
        folder.mkdir(parents=True, exist_ok=True)
    (apt_dir / "sources.list").write_text(
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://deb.debian.org/debian trixie main\n"
    )
    trixie = _apt_options(apt_dir)
    log("downloading trixie's docker.io, docker-cli, containerd, docker-compose, docker-buildx")
    run("apt-get", *trixie, "-qq", "update")
    _download(TRIXIE_PACKAGES, debs, trixie)
    log("downloading bookworm's runc and tini")
    _download(BOOKWORM_PACKAGES, debs, [])
    staging = STATE / "prefix.partial"
    shutil.rmtree(staging, ignore_errors=True)
    # Trixie's first, then bookworm's runc over anything of the same name.
    ordered = sorted(debs.glob("*.deb"), key=lambda deb: deb.name.startswith(("runc_", "tini_")))
    for deb in ordered:
        run("dpkg-deb", "-x", deb, staging)
    staging.replace(PREFIX)
    shutil.rmtree(debs)


def running() -> bool:
    result = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        check=False,
        env=environment(),
        capture_output=True,
        text=True,
    )
    return result.returncode == 0


def start() -> None:
    """Starts the private dockerd unless it already answers."""
    if running():
        return
    for folder in ("run", "data", "exec"):
        (STATE / folder).mkdir(parents=True, exist_ok=True)
    log(f"starting dockerd (socket {SOCKET}, data root {STATE / 'data'})")
    with (STATE / "dockerd.log").open("ab") as output:
        subprocess.Popen(
            [
                str(PREFIX / "usr" / "sbin" / "dockerd"),
                f"--host={DOCKER_HOST}",
                f"--data-root={STATE / 'data'}",
                f"--exec-root={STATE / 'exec'}",
                f"--pidfile={STATE / 'run' / 'dockerd.pid'}",
                "--storage-driver=overlay2",
                "--containerd-namespace=marie-deploy",
                "--containerd-plugins-namespace=marie-deploy-plugins",
            ],
            env=environment(),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not running():
        if time.monotonic() > deadline:
            log_file = STATE / "dockerd.log"
            raise RuntimeError(
                f"dockerd did not answer in {START_TIMEOUT_SECONDS:.0f} s; see {log_file}"
            )
        time.sleep(0.5)


def stop() -> None:
    """Stops the private dockerd (SIGTERM: it stops its containers first)."""
    pidfile = STATE / "run" / "dockerd.pid"
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text())
    subprocess.run(["kill", str(pid)], check=False)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.5)


def link_plugins() -> None:
    """The CLI finds its plugins (compose, buildx) under DOCKER_CONFIG."""
    plugins = STATE / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    for plugin in (PREFIX / "usr" / "libexec" / "docker" / "cli-plugins").iterdir():
        if not (plugins / plugin.name).exists():
            (plugins / plugin.name).symlink_to(plugin)


def ensure() -> dict[str, str]:
    install()
    link_plugins()
    start()
    return environment()
