"""Host tools for the kernel matrix: Debian packages (qemu, ...) and virtme-ng in its own venv.

Both steps are idempotent and cost a few milliseconds when everything is already there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

#: Debian package -> why the harness needs it.
APT_PACKAGES: dict[str, str] = {
    "qemu-system-x86": "qemu-system-x86_64 runs the kernels",
    "kmod": "depmod, which virtme-ng runs on the extracted modules",
    "busybox-static": "virtme-ng builds its initramfs around busybox",
    "udev": "creates /dev/virtio-ports/*, through which virtme-ng passes output and exit code",
    "strace": "tests/test_process_kill.py kills the monitor at each ptrace call with it (the "
              "guests run the host's file system)",
}

#: The virtme-ng release the harness was written and measured with.
VIRTME_NG = "virtme-ng==1.42"


class HarnessError(RuntimeError):
    """Something the matrix needs is missing and could not be set up."""


def log(msg: str) -> None:
    print(f"pagewatch-vm: {msg}", flush=True)


def _dpkg_installed(pkg: str) -> bool:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True,
                             text=True, check=False).stdout
    except OSError:
        return False
    return out.strip() == "install ok installed"


def ensure_apt_packages() -> None:
    missing = [p for p in APT_PACKAGES if not _dpkg_installed(p)]
    if not missing:
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise HarnessError("the kernel matrix needs these Debian packages: " + ", ".join(
            f"{p} ({APT_PACKAGES[p]})" for p in missing)
            + "; install them as root: apt-get install -y --no-install-recommends "
            + " ".join(missing))
    log(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # A third-party source that fails to update must not stop the install from Debian's.
    subprocess.run(["apt-get", "update", "-q"], check=False, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def _base_python() -> str:
    return str(getattr(sys, "_base_executable", None) or sys.executable)


def ensure_virtme_ng(cache: Path) -> Path:
    """A venv under the cache with virtme-ng; returns its bin directory (vng, virtme-run)."""
    venv = cache / "tools"
    bindir = venv / "bin"
    stamp = venv / ".installed"
    if (bindir / "vng").exists() and stamp.exists() and stamp.read_text().strip() == VIRTME_NG:
        return bindir
    log(f"installing {VIRTME_NG} into {venv}")
    if not (bindir / "python").exists():
        subprocess.run([_base_python(), "-m", "venv", str(venv)], check=True)
    subprocess.run([str(bindir / "python"), "-m", "pip", "install", "-q", VIRTME_NG],
                   check=True)
    stamp.write_text(VIRTME_NG + "\n")
    return bindir


#: vng runs ``virtme-run`` from PATH; this one comes first.  It mounts the guest's root (the
#: host's /, over 9p, read-only) with ``cache=loose``: without a page cache every small read
#: and every fault on an mmap-ed file is a round trip to qemu, and from 6.9 on (netfs) one of a
#: whole msize (512 KiB).  Under TCG that made 6.12 ~100x slower at e.g. FreeType reading a
#: font (a matplotlib savefig: 150 s instead of 1.2 s).  Nothing on the host's / changes
#: during a run, so the loose cache is safe; the read/write directories are mounted apart.
SHIM = """#!{python}
import sys

import virtme.mkinitramfs as m

OLD = "msize=524288 /dev/root"
if OLD in m._MOUNT_ROOT_HOST:
    m._MOUNT_ROOT_HOST = m._MOUNT_ROOT_HOST.replace(OLD, "msize=524288,cache=loose /dev/root")
else:
    sys.stderr.write("pagewatch-vm: virtme-ng changed its root mount; 9p runs uncached\\n")
from virtme.commands.run import main

sys.exit(main())
"""


def ensure_shim(bindir: Path) -> Path:
    """The directory holding the ``virtme-run`` shim, to put before ``bindir`` in PATH."""
    shim = bindir.parent / "shim"
    script = shim / "virtme-run"
    text = SHIM.format(python=bindir / "python")
    if not script.exists() or script.read_text() != text:
        shim.mkdir(exist_ok=True)
        script.write_text(text)
        script.chmod(0o755)
    return shim


def qemu_version() -> str:
    try:
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                             text=True, check=False).stdout
    except OSError:
        return "?"
    return out.splitlines()[0] if out else "?"
