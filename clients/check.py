"""Contract check for the client libraries (`make clients-check`, run by CI).

1. Every client is regenerated from protos/ (`make clients-<lang>` after removing its stamp) and
   what is committed under clients/ must not change: generated code that is
   committed (Go's, as Go modules require) is current, and generated code that
   is build output stays ignored.
2. Every package carries clients/VERSION, whose major is the contracts'
   package version (marie.*.v1 -> 1).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ROOT / "clients"

# language -> (toolchain needed to generate, target, stamp that forces regeneration)
GENERATORS = {
    "python": (None, "clients-python", "clients/python/src/marie/.stamp"),
    "typescript": ("npm", "clients-typescript", "clients/typescript/dist/.stamp"),
    "go": ("go", "clients-go", None),
}


def contract_major() -> int:
    majors = {
        int(m.group(1))
        for proto in (ROOT / "protos").rglob("*.proto")
        for m in re.finditer(r"^package marie\.\w+\.v(\d+);", proto.read_text(), re.M)
    }
    if len(majors) != 1:
        sys.exit(f"clients-check: contracts disagree on their version: {sorted(majors)}")
    return majors.pop()


def package_versions() -> dict[str, str]:
    found = {}
    pyproject = (CLIENTS / "python/pyproject.toml").read_text()
    found["python/pyproject.toml"] = re.search(r'^version = "(.+)"', pyproject, re.M)[1]  # type: ignore[index]
    init = (CLIENTS / "python/src/marie_client/__init__.py").read_text()
    found["python/__init__.py"] = re.search(r'__version__ = "(.+)"', init)[1]  # type: ignore[index]
    ts = CLIENTS / "typescript/package.json"
    if ts.exists():
        found["typescript/package.json"] = json.loads(ts.read_text())["version"]
    pom = CLIENTS / "java/pom.xml"
    if pom.exists():
        pattern = r"<artifactId>marie-client</artifactId>.*?<version>(.+?)</version>"
        found["java/pom.xml"] = re.search(pattern, pom.read_text(), re.S)[1]  # type: ignore[index]
    ts_index = CLIENTS / "typescript/src/index.ts"
    if ts_index.exists():
        found["typescript/src/index.ts"] = re.search(r'VERSION = "(.+)"', ts_index.read_text())[1]  # type: ignore[index]
    java = CLIENTS / "java/src/main/java/dev/marie/client/MarieClient.java"
    if java.exists():
        found["java/MarieClient.java"] = re.search(r'VERSION = "(.+)"', java.read_text())[1]  # type: ignore[index]
    go = CLIENTS / "go/version.go"
    if go.exists():
        found["go/version.go"] = re.search(r'Version = "(.+)"', go.read_text())[1]  # type: ignore[index]
    return found


def main() -> int:
    failures = []
    version = (CLIENTS / "VERSION").read_text().strip()
    major = contract_major()
    if int(version.split(".")[0]) != major:
        failures.append(f"clients/VERSION {version} is not for contracts v{major}")
    for where, found in package_versions().items():
        if found != version:
            failures.append(f"clients/{where} says {found}, clients/VERSION says {version}")

    for language, (tool, target, stamp) in GENERATORS.items():
        if tool is not None and shutil.which(tool) is None:
            failures.append(f"{language}: {tool} is not installed, cannot regenerate")
            continue
        if stamp is not None:
            (ROOT / stamp).unlink(missing_ok=True)
        done = subprocess.run(["make", "-s", target], cwd=ROOT, check=False)  # noqa: S603, S607
        if done.returncode != 0:
            failures.append(f"{language}: `make {target}` failed")
    status = subprocess.run(
        ["git", "status", "--porcelain", "--", "clients"],  # noqa: S607
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if status:
        failures.append(f"regenerating the clients changed what is committed:\n{status}")

    for failure in failures:
        print(f"clients-check: {failure}", file=sys.stderr)
    if not failures:
        print(f"clients-check: every client matches protos/ (version {version})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
