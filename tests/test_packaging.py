"""pyproject.toml: `pip install .` gives an importable package and a `bunpulse` command equal to
`python -m bunpulse`, with the runtime dependencies declared and the version kept in one place.

The install goes into a fresh virtual environment in a temporary directory; so that it takes
seconds, not minutes, the dependencies come from the test environment (a .pth file) and the
build uses its setuptools: the metadata is then checked to list every dependency."""
import email
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT


def copy_source(destination):
    """A copy of the working tree's files, as a clone would hold them: the build writes beside
    its source."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        source = os.path.join(ROOT, name)
        if os.path.isfile(source):
            target = os.path.join(destination, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(source, target)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("pkg")
    source, venv = base / "src", base / "venv"
    copy_source(source)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                              "'purelib'))"], capture_output=True, text=True,
                             check=True).stdout.strip()
    with open(os.path.join(purelib, "test-deps.pth"), "w") as handle:
        handle.write(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    "--no-deps", "--no-build-isolation", str(source)], check=True,
                   capture_output=True, timeout=120)
    return venv


def run(*args, cwd="/"):
    # From "/": the repository's own bunpulse/ must not be what gets imported.
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=30,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


def test_console_script_is_python_dash_m_bunpulse(installed):
    command = run(str(installed / "bin" / "bunpulse"), "--help")
    module = run(str(installed / "bin" / "python"), "-m", "bunpulse", "--help")
    assert command.returncode == 0, command.stderr
    assert "--heartbeat-interval" in command.stdout
    assert command.stdout == module.stdout


def test_the_installed_package_is_imported_with_its_version(installed):
    out = run(str(installed / "bin" / "python"), "-c",
              "import bunpulse, importlib.metadata as m; "
              "print(bunpulse.__file__); print(bunpulse.__version__, m.version('bunpulse'))")
    assert out.returncode == 0, out.stderr
    where, versions = out.stdout.splitlines()
    assert where.startswith(str(installed))
    # Every file of the package is installed, data (the dashboard's) as well as code.
    package = os.path.join(ROOT, "bunpulse")
    shipped = {os.path.relpath(os.path.join(folder, name), package)
               for folder, _, names in os.walk(package) if "__pycache__" not in folder
               for name in names}
    installed_package = os.path.dirname(where)
    missing = [name for name in shipped
               if not os.path.isfile(os.path.join(installed_package, name))]
    assert not missing
    version, metadata_version = versions.split()
    assert version == metadata_version
    assert version == re.search(r'__version__ = "([^"]+)"',
                                open(os.path.join(ROOT, "bunpulse", "__init__.py")).read())[1]


def test_metadata_lists_every_runtime_dependency_and_the_pins_satisfy_it(installed):
    out = run(str(installed / "bin" / "python"), "-c",
              "import importlib.metadata as m; print(m.metadata('bunpulse').as_string())")
    assert out.returncode == 0, out.stderr
    declared = {canonicalize_name(Requirement(r).name): Requirement(r)
                for r in email.message_from_string(out.stdout).get_all("Requires-Dist")}
    pinned = {}
    for line in open(os.path.join(ROOT, "requirements.txt")):
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            pinned[canonicalize_name(requirement.name)] = requirement
    assert set(declared) == set(pinned)
    for name, requirement in pinned.items():
        (pin,) = requirement.specifier
        assert declared[name].specifier.contains(pin.version), (name, pin.version)
        assert declared[name].extras == requirement.extras
    assert importlib.metadata.version("gevent") in pinned["gevent"].specifier
