"""A real single-node OpenSearch for tests, assembled from Maven Central.

OpenSearch is not on PyPI, but Maven Central serves everything a node needs:
the core distribution without a bundled JDK (`integ-test-zip`), the k-NN
plugin (its Maven zip holds the Java plugin only, no native faiss/nmslib
libraries: the lucene engine, which is pure Java, is what the store uses),
and, as plain jars, the two modules the integ-test distribution leaves out
that the store needs: `lang-painless` (k-NN extends it) and `reindex`
(`delete_by_query`). Every file is pinned by SHA-256 and cached under
`~/.cache/marie/opensearch` (or `MARIE_OPENSEARCH_CACHE`), so a machine
downloads ~65 MB once.

Version 2.19.1: the k-NN plugin must match the core version exactly, and
2.19.1 is the newest pair that Maven Central serves both of (k-NN 3.5.0.0 has
no 3.5.0 integ-test-zip); it runs on Java 17, the machine's default JDK.
The neural-search plugin (the `normalization-processor` of hybrid search
pipelines) is not published to Maven Central, nor is ml-commons, which it
requires, so this node has no such processor.

`OpenSearchNode.start()` unpacks a fresh node into a temporary directory,
starts it on ephemeral ports (`http.port: 0`, read back from the ports file),
security plugin absent, heap 512 MB, waits for green and returns; `stop()`
kills it and removes the directory.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.downloads import DownloadFailed, fetch_pinned

VERSION = "2.19.1"
KNN_VERSION = "2.19.1.0"
MAVEN = "https://repo1.maven.org/maven2"
START_TIMEOUT_SECONDS = 180.0
RUN_AS = "nobody"


@dataclass(frozen=True)
class Artifact:
    group: str
    name: str
    version: str
    sha256: str
    ext: str = "jar"

    @property
    def file_name(self) -> str:
        return f"{self.name}-{self.version}.{self.ext}"

    @property
    def url(self) -> str:
        return f"{MAVEN}/{self.group.replace('.', '/')}/{self.name}/{self.version}/{self.file_name}"


CORE = Artifact(
    "org.opensearch.distribution.integ-test-zip",
    "opensearch",
    VERSION,
    "af7152d8b7f6f1cee09d47276b32b70479fe6dd8cdbb61213f84eb7f8098b261",
    "zip",
)
KNN = Artifact(
    "org.opensearch.plugin",
    "opensearch-knn",
    KNN_VERSION,
    "eab8c9818865bc035212eab5068cdacae164baa09d4c152f49b736d6f6b0e85c",
    "zip",
)


@dataclass(frozen=True)
class Module:
    """A module the integ-test distribution lacks, assembled from its jars."""

    name: str
    classname: str
    description: str
    policy: str
    jars: tuple[Artifact, ...]


MODULES = (
    Module(
        "lang-painless",
        "org.opensearch.painless.PainlessPlugin",
        "An easy, safe and fast scripting language for OpenSearch",
        # As the module's own policy: it generates classes at run time.
        'grant {\n  permission java.lang.RuntimePermission "createClassLoader";\n'
        '  permission java.lang.RuntimePermission "getClassLoader";\n};\n',
        (
            Artifact(
                "org.opensearch.plugin",
                "lang-painless",
                VERSION,
                "3cf5e02efa40ff5b88e74e1ab66a0bc462de3509fab4a6a4ffe90b8d13777a9a",
            ),
            Artifact(
                "org.opensearch.plugin",
                "opensearch-scripting-painless-spi",
                VERSION,
                "c2598797a5f6f897ce7e8d05f593ff96de3fbc56c52f299d63cddcae41556dda",
            ),
            Artifact(
                "org.antlr",
                "antlr4-runtime",
                "4.13.1",
                "54665d2838cc66458343468efc539e454fc95b46a8a04b13c6ac43fc9be63505",
            ),
            Artifact(
                "org.ow2.asm",
                "asm",
                "9.7",
                "adf46d5e34940bdf148ecdd26a9ee8eea94496a72034ff7141066b3eea5c4e9d",
            ),
            Artifact(
                "org.ow2.asm",
                "asm-util",
                "9.7",
                "37a6414d36641973f1af104937c95d6d921b2ddb4d612c66c5a9f2b13fc14211",
            ),
            Artifact(
                "org.ow2.asm",
                "asm-tree",
                "9.7",
                "62f4b3bc436045c1acb5c3ba2d8ec556ec3369093d7f5d06c747eb04b56d52b1",
            ),
            Artifact(
                "org.ow2.asm",
                "asm-commons",
                "9.7",
                "389bc247958e049fc9a0408d398c92c6d370c18035120395d4cba1d9d9304b7a",
            ),
            Artifact(
                "org.ow2.asm",
                "asm-analysis",
                "9.7",
                "7bc6bcbc21379948a0c8c467fb0f864206e5b818f6bc0b546872f5c9f941556f",
            ),
        ),
    ),
    Module(
        "reindex",
        "org.opensearch.index.reindex.ReindexPlugin",
        "Reindex, update_by_query and delete_by_query",
        'grant {\n  permission java.net.SocketPermission "*", "connect";\n};\n',
        (
            Artifact(
                "org.opensearch.plugin",
                "reindex-client",
                VERSION,
                "eb2056ee54ac367f8820d5c13fa5cea2d10bb492b01f4d1a15a6dce163bf82ce",
            ),
            Artifact(
                "org.opensearch.client",
                "opensearch-rest-client",
                VERSION,
                "6ab691dc6cb2c12802bb9024df3379bd1779a2b626d3bd7b27ed5f974cbc1708",
            ),
            Artifact(
                "org.opensearch",
                "opensearch-ssl-config",
                VERSION,
                "30fe6a20a08004044be90abdf0e711313b7dfe2e5c7b12ac32498ae8e1cae927",
            ),
            Artifact(
                "org.apache.httpcomponents",
                "httpclient",
                "4.5.14",
                "c8bc7e1c51a6d4ce72f40d2ebbabf1c4b68bfe76e732104b04381b493478e9d6",
            ),
            Artifact(
                "org.apache.httpcomponents",
                "httpcore",
                "4.4.16",
                "6c9b3dd142a09dc468e23ad39aad6f75a0f2b85125104469f026e52a474e464f",
            ),
            Artifact(
                "org.apache.httpcomponents",
                "httpasyncclient",
                "4.1.5",
                "0c1877489a9d1ba4fa50f6cfcab11d1123618858cb31d56afaab5afdd5064d99",
            ),
            Artifact(
                "org.apache.httpcomponents",
                "httpcore-nio",
                "4.4.16",
                "4018736ede2d321034e8517ea90baefb31831a8608afccc446d8a699fb1d00d4",
            ),
            Artifact(
                "commons-codec",
                "commons-codec",
                "1.16.1",
                "ec87bfb55f22cbd1b21e2190eeda28b2b312ed2a431ee49fbdcc01812d04a5e4",
            ),
            Artifact(
                "commons-logging",
                "commons-logging",
                "1.2",
                "daddea1ea0be0f56978ab3006b8ac92834afeefbd9b7e4e6316fca57df0fa636",
            ),
        ),
    ),
)


class OpenSearchUnavailable(RuntimeError):
    """No node can be had here (no Java 17+, or the download failed); says why."""


def cache_dir() -> Path:
    configured = os.environ.get("MARIE_OPENSEARCH_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "marie" / "opensearch"


def fetch(artifact: Artifact) -> Path:
    """The artifact's file in the cache, downloaded first when missing; its
    SHA-256 is checked against the pinned one every time."""
    try:
        return fetch_pinned(artifact.url, artifact.sha256, cache_dir() / artifact.file_name)
    except DownloadFailed as exc:
        raise OpenSearchUnavailable(str(exc)) from exc


def java_home() -> Path:
    """A JDK of version 17 or newer: OPENSEARCH_JAVA_HOME, JAVA_HOME, or the
    `java` on PATH."""
    for variable in ("OPENSEARCH_JAVA_HOME", "JAVA_HOME"):
        if os.environ.get(variable):
            return Path(os.environ[variable])
    java = shutil.which("java")
    if java is None:
        raise OpenSearchUnavailable("no `java` on PATH (OpenSearch 2.19 needs Java 17+)")
    return Path(java).resolve().parent.parent


def _java_major(home: Path) -> int:
    release = home / "release"
    if release.exists():
        for line in release.read_text().splitlines():
            if line.startswith("JAVA_VERSION="):
                version = line.split("=", 1)[1].strip('"')
                return int(version.split(".")[0])
    return 0


def _descriptor(module: Module) -> str:
    return (
        f"description={module.description}\nversion={VERSION}\nname={module.name}\n"
        f"classname={module.classname}\njava.version=11\nopensearch.version={VERSION}\n"
        "extended.plugins=\nhas.native.controller=false\n"
    )


def install(target: Path) -> Path:
    """Unpacks a node with its modules and the k-NN plugin under `target`;
    answers the node's home."""
    with zipfile.ZipFile(fetch(CORE)) as archive:
        archive.extractall(target)
    home = target / f"opensearch-{VERSION}"
    for script in (home / "bin").iterdir():
        script.chmod(0o755)
    for module in MODULES:
        folder = home / "modules" / module.name
        folder.mkdir(parents=True)
        for jar in module.jars:
            shutil.copyfile(fetch(jar), folder / jar.file_name)
        (folder / "plugin-descriptor.properties").write_text(_descriptor(module))
        (folder / "plugin-security.policy").write_text(module.policy)
    with zipfile.ZipFile(fetch(KNN)) as archive:
        archive.extractall(home / "plugins" / "opensearch-knn")
    return home


@dataclass
class OpenSearchNode:
    home: Path
    process: subprocess.Popen[bytes]
    url: str
    workdir: Path
    startup_seconds: float

    @classmethod
    def start(cls) -> OpenSearchNode:
        home_jdk = java_home()
        major = _java_major(home_jdk)
        if major and major < 17:
            raise OpenSearchUnavailable(f"Java {major} at {home_jdk}; OpenSearch 2.19 needs 17+")
        began = time.monotonic()
        workdir = Path(tempfile.mkdtemp(prefix="marie-opensearch-"))
        try:
            home = install(workdir)
            config = home / "config"
            (config / "opensearch.yml").write_text(
                "cluster.name: marie-test\n"
                "node.name: node-1\n"
                "discovery.type: single-node\n"
                "network.host: 127.0.0.1\n"
                "http.port: 0\n"
                "transport.port: 0\n"
                "node.portsfile: true\n"
                f"path.data: {workdir / 'data'}\n"
                f"path.logs: {workdir / 'logs'}\n"
                # Small disks on shared machines must not turn indices read-only.
                "cluster.routing.allocation.disk.threshold_enabled: false\n"
                "action.auto_create_index: true\n"
            )
            options = (config / "jvm.options").read_text()
            options = options.replace("-Xms1g", "-Xms512m").replace("-Xmx1g", "-Xmx512m")
            (config / "jvm.options").write_text(options)
            log = (workdir / "stdout.log").open("wb")
            env = {
                **os.environ,
                "OPENSEARCH_JAVA_HOME": str(home_jdk),
                "OPENSEARCH_PATH_CONF": str(config),
                "OPENSEARCH_TMPDIR": str(workdir / "tmp"),
            }
            (workdir / "tmp").mkdir()
            # OpenSearch refuses to run as root (CI runs as root): then it runs
            # as `nobody`, owning its own directory.
            uid: int | None = None
            gid: int | None = None
            groups: list[int] | None = None
            if os.geteuid() == 0:
                user = pwd.getpwnam(RUN_AS)
                uid, gid, groups = user.pw_uid, user.pw_gid, []
                for path in (workdir, *workdir.rglob("*")):
                    os.chown(path, uid, gid, follow_symlinks=False)
            process = subprocess.Popen(
                [str(home / "bin" / "opensearch")],
                cwd=home,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=uid,
                group=gid,
                extra_groups=groups,
            )
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        node = cls(home, process, "", workdir, 0.0)
        try:
            node.url = node._wait_for_green(began)
            node._tune_for_tests()
        except BaseException:
            node.stop()
            raise
        node.startup_seconds = time.monotonic() - began
        return node

    def _tune_for_tests(self) -> None:
        # Test settings for every index the tests create, not the store's
        # behaviour: one node holds no replicas, and a 100 ms refresh makes
        # `refresh=wait_for` writes answer sooner than the default 1 s.
        reply = httpx.put(
            f"{self.url}/_index_template/marie-tests",
            json={
                "index_patterns": ["*"],
                "priority": 0,
                "template": {
                    "settings": {"index.number_of_replicas": 0, "index.refresh_interval": "100ms"}
                },
            },
            timeout=30,
        )
        reply.raise_for_status()

    def _wait_for_green(self, began: float) -> str:
        ports_file = self.workdir / "logs" / "http.ports"
        url = ""
        while time.monotonic() - began < START_TIMEOUT_SECONDS:
            if self.process.poll() is not None:
                raise OpenSearchUnavailable(
                    f"OpenSearch exited with code {self.process.returncode}:\n{self.log_tail()}"
                )
            if not url and ports_file.exists():
                address = ports_file.read_text().split()[0]
                url = f"http://{address}"
            if url:
                try:
                    reply = httpx.get(
                        f"{url}/_cluster/health",
                        params={"wait_for_status": "green", "timeout": "1s"},
                        timeout=5,
                    )
                    if reply.status_code == 200 and reply.json()["status"] == "green":
                        return url
                except httpx.HTTPError:
                    pass
            time.sleep(0.25)
        raise OpenSearchUnavailable(
            f"OpenSearch not green within {START_TIMEOUT_SECONDS:.0f} s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        log = self.workdir / "stdout.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


if __name__ == "__main__":  # python -m tests.opensearch_node: start one, print its URL
    node = OpenSearchNode.start()
    print(f"{node.url} (started in {node.startup_seconds:.1f} s); Ctrl-C stops it", flush=True)
    try:
        node.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
