"""The locks in requirements/: every install pinned and hashed, consistent with pyproject's
ranges and with each other, the venv built from them, the stubs' generator among them, and
`make lock` reproducible (when PyPI can be reached)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from importlib.metadata import distributions
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from .conftest import ROOT

REQUIREMENTS = ROOT / "requirements"


def _locks_module() -> ModuleType:
    """requirements/locks.py, a script beside the locks rather than part of a package."""
    spec = importlib.util.spec_from_file_location("requirements_locks", REQUIREMENTS / "locks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


locks = _locks_module()


def pyproject_requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def public(version: str) -> Version:
    """A version without its local label (torch's `2.13.0+cpu` is release 2.13.0)."""
    return Version(Version(version).public)


@pytest.mark.parametrize("lock", locks.LOCKS)
def test_every_package_of_every_lock_is_pinned_with_hashes(lock: str) -> None:
    pins = locks.read_lock(REQUIREMENTS / lock)
    assert len(pins) >= 5
    for name, pin in pins.items():
        assert pin.hashes, f"{lock}: {name} has no hash"
        Version(pin.version)  # an exact, valid version


def test_the_lock_reader_refuses_what_is_not_a_pin(tmp_path: Path) -> None:
    for line in ("numpy>=1.26", "numpy", "-e .", "numpy==2.4.6\nnumpy==2.4.7"):
        (tmp_path / "bad.txt").write_text(line + "\n")
        with pytest.raises(ValueError, match=r"bad\.txt:[12]: "):
            locks.read_lock(tmp_path / "bad.txt")


@pytest.mark.parametrize(
    ("lock", "extras"),
    [("dev.txt", ("server", "dev", "bench")), ("server.txt", ("server",)),
     ("server-cuda.txt", ("server",)), ("client.txt", ())],
)  # fmt: skip
def test_each_lock_holds_what_pyproject_asks_within_its_ranges(
    lock: str, extras: tuple[str, ...]
) -> None:
    """A dependency added or a range moved in pyproject.toml without `make lock` fails here."""
    pins = locks.read_lock(REQUIREMENTS / lock)
    for requirement in pyproject_requirements(*extras):
        name = locks.normalise(requirement.name)
        assert name in pins, f"{lock} lacks {requirement}: run `make lock`"
        version = public(pins[name].version)
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock} pins {name}=={version}, outside pyproject's {requirement}: run `make lock`"
        )
    for requirement in (Requirement(r) for r in ("setuptools>=68",)):  # the build backend
        assert requirement.specifier.contains(pins["setuptools"].version)


def test_the_client_lock_has_no_torch_and_the_cuda_lock_has_pypis_torch() -> None:
    assert "torch" not in locks.read_lock(REQUIREMENTS / "client.txt")
    cpu = locks.read_lock(REQUIREMENTS / "server.txt")["torch"]
    cuda = locks.read_lock(REQUIREMENTS / "server-cuda.txt")
    assert cpu.version.endswith("+cpu")
    assert cuda["torch"].version == Version(cpu.version).public
    assert any(name.startswith("nvidia-") for name in cuda)


@pytest.mark.parametrize("lock", ["server.txt", "client.txt", "server-cuda.txt"])
def test_every_lock_pins_a_package_as_the_dev_lock_does(lock: str) -> None:
    """What CI tests (dev.txt) is what the image and a client install get."""
    dev = locks.read_lock(REQUIREMENTS / "dev.txt")
    pins = locks.read_lock(REQUIREMENTS / lock)
    shared = pins.keys() & dev.keys()
    assert shared >= {"grpcio", "protobuf", "numpy"}
    for name in shared:
        if lock == "server-cuda.txt":  # other platform wheels: the same release, other hashes
            assert public(pins[name].version) == public(dev[name].version), name
        else:
            assert pins[name] == dev[name], name


def test_the_venv_holds_exactly_the_dev_lock() -> None:
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("not running in the checkout's .venv (make venv)")
    pins = locks.read_lock(REQUIREMENTS / "dev.txt")
    installed = {locks.normalise(d.metadata["Name"]): d.version for d in distributions()}
    installed.pop("embedding-service")
    installed.pop("pip")  # the interpreter's own, from `python -m venv`
    assert installed == {name: pin.version for name, pin in pins.items()}


def test_the_stubs_import_with_every_grpcio_pyproject_allows() -> None:
    """grpcio-tools writes its own version into the stubs as the lowest grpcio they import
    with: pyproject's floor may not sit below it, and the locked generator is the one that
    wrote the checked-in stubs (else the staleness test compares against another)."""
    stub = (ROOT / "client" / "embedding_client" / "proto" / "embedding_pb2_grpc.py").read_text()
    match = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'$", stub, re.MULTILINE)
    assert match, "the stubs no longer say which grpcio they need"
    generated = Version(match.group(1))
    dev = locks.read_lock(REQUIREMENTS / "dev.txt")
    assert Version(dev["grpcio-tools"].version) == generated
    for requirement in pyproject_requirements():
        if requirement.name.startswith("grpcio"):
            floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
            assert floors and min(floors) >= generated, (
                f"pyproject allows {requirement}, the stubs need grpcio>={generated}"
            )


def test_the_images_and_the_foreign_venv_install_from_the_locks() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    default = re.search(r"^ARG LOCK=(\S+)$", dockerfile, re.MULTILINE)
    assert default and default.group(1) == "requirements/server-cuda.txt"
    assert '--require-hashes -r "/build/$LOCK"' in dockerfile
    cpu = (ROOT / "docker" / "docker-compose.cpu.yml").read_text()
    smoke = (ROOT / "docker" / "smoke.sh").read_text()
    assert "LOCK: requirements/server.txt" in cpu
    assert "--build-arg LOCK=requirements/server.txt" in smoke
    assert "-r requirements/server.txt" in smoke
    assert "!requirements/" in (ROOT / ".dockerignore").read_text().splitlines()
    from .test_inference import FOREIGN_LOCK

    assert FOREIGN_LOCK == REQUIREMENTS / "foreign.txt"


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
    except OSError:
        return False
    return True


def test_make_lock_reproduces_the_checked_in_locks(tmp_path: Path) -> None:
    """The same LOCK_DATE resolves to the same files, whatever PyPI released since."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent))
    if uv is None:
        pytest.skip("uv is not installed beside this interpreter (make venv)")
    if not _pypi_reachable():
        pytest.skip("PyPI cannot be reached: the locks are resolved from it")
    date = re.search(r"^LOCK_DATE := (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert date
    done = subprocess.run(
        [str(REQUIREMENTS / "lock.sh"), uv, date.group(1), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for lock in locks.LOCKS:
        fresh = (tmp_path / lock).read_text().replace(str(tmp_path), "requirements")
        assert fresh == (REQUIREMENTS / lock).read_text(), f"{lock} differs: run `make lock`"
    assert locks.differences(REQUIREMENTS, tmp_path) == []
