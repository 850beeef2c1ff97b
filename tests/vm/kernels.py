"""Debian kernels for the matrix, fetched with apt into a cache and kept there.

``6.1`` is bookworm's ``linux-image-amd64`` (with bookworm-security's updates), ``6.12`` the one
in bookworm-backports.  apt runs with a private state directory under the cache (its own sources,
lists and package cache), so the system's apt configuration is only read, never changed.  The
Debian mirror is taken from the machine's own apt sources at run time.  A kernel is fetched once:
later runs find ``kernels/LABEL/kernel.json`` and boot at once (``--refresh`` fetches again).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.vm.tools import HarnessError, log

DIST = "bookworm"
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

#: label -> the apt suite to take ``linux-image-amd64`` from ("" = the default candidate).
KNOWN: dict[str, str] = {"6.1": "", "6.12": f"{DIST}-backports"}


@dataclass
class Kernel:
    label: str
    release: str  # uname -r
    package: str  # e.g. linux-image-6.1.0-56-amd64
    version: str  # Debian version of the package
    image: str  # ROOT/boot/vmlinuz-RELEASE; virtme-ng takes modules from ROOT/lib/modules

    @property
    def vmlinuz(self) -> Path:
        return Path(self.image)


@dataclass
class _Source:
    types: list[str]
    uris: list[str]
    suites: list[str]
    signed_by: str


def _parse_sources() -> list[_Source]:
    """The system's apt sources, one-line (``.list``) and deb822 (``.sources``) alike."""
    etc = Path("/etc/apt")
    files = [etc / "sources.list"] if (etc / "sources.list").exists() else []
    parts = etc / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    found: list[_Source] = []
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes").lower() == "no" or "uris" not in fields:
                    continue
                found.append(_Source(fields.get("types", "deb").split(), fields["uris"].split(),
                                     fields.get("suites", "").split(),
                                     fields.get("signed-by", "")))
        else:
            for line in text.splitlines():
                m = re.match(r"^\s*(deb|deb-src)\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)", line)
                if not m:
                    continue
                opts = dict(o.split("=", 1) for o in (m.group(2) or "").split() if "=" in o)
                found.append(_Source([m.group(1)], [m.group(3)], [m.group(4)],
                                     opts.get("signed-by", "")))
    return found


def debian_mirrors() -> tuple[str, str | None, str]:
    """(archive URI, security URI or None, keyring) from the machine's apt sources."""
    codename = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                codename = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    names = {DIST, codename} - {""}
    archive: str | None = None
    security: str | None = None
    keyring = DEFAULT_KEYRING
    for src in _parse_sources():
        if "deb" not in src.types:
            continue
        for suite in src.suites:
            base, _, pocket = suite.partition("-")
            if base not in names and suite.split("/")[0] not in names:
                continue
            if pocket == "security" or suite.endswith("/updates"):
                security = security or src.uris[0]
            elif archive is None:
                archive = src.uris[0]
                if src.signed_by.startswith("/"):
                    keyring = src.signed_by
    if archive is None:
        raise HarnessError("found no Debian archive in /etc/apt/sources.list{,.d/*}: "
                           f"need an entry for suite {codename or DIST} to derive the mirror")
    if not Path(keyring).exists():
        keyring = DEFAULT_KEYRING
    return archive.rstrip("/"), security.rstrip("/") if security else None, keyring


class PrivateApt:
    """apt-get/apt-cache with their own sources, lists and cache under ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.updated = False

    def _opts(self) -> list[str]:
        b = self.base
        opts = {
            "Dir::Etc::SourceList": str(b / "sources.list"),
            "Dir::Etc::SourceParts": str(b / "sources.list.d"),
            "Dir::State::Lists": str(b / "lists"),
            "Dir::Cache": str(b / "cache"),
            "Debug::NoLocking": "1",
        }
        if os.geteuid() == 0:
            opts["APT::Sandbox::User"] = "root"
        return [x for k, v in opts.items() for x in ("-o", f"{k}={v}")]

    def update(self) -> None:
        if self.updated:
            return
        archive, security, keyring = debian_mirrors()
        lines = [f"deb [signed-by={keyring}] {archive} {DIST} main",
                 f"deb [signed-by={keyring}] {archive} {DIST}-updates main",
                 f"deb [signed-by={keyring}] {archive} {DIST}-backports main"]
        if security:
            lines.append(f"deb [signed-by={keyring}] {security} {DIST}-security main")
        for d in ("sources.list.d", "lists/partial", "cache/archives/partial"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        (self.base / "sources.list").write_text("\n".join(lines) + "\n")
        log(f"apt-get update ({DIST}, -updates, -backports, -security) in {self.base}")
        self.run("apt-get", "update", "-q", quiet=True)
        self.updated = True

    def run(self, tool: str, *args: str, cwd: Path | None = None, quiet: bool = False) -> str:
        proc = subprocess.run([tool, *self._opts(), *args], capture_output=True, text=True,
                              cwd=cwd, check=False)
        if proc.returncode != 0:
            raise HarnessError(f"{tool} {' '.join(args)} failed ({proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return proc.stdout if not quiet else ""


#: Module directories (under lib/modules/RELEASE/kernel/) kept in the cache: file systems (9p,
#: overlay, fuse, ...), virtio, block devices (zram, loop, virtio_blk), and what they depend on.
#: The rest (ahci, cdrom, kvm, sound, input, watchdog, ...) would only be loaded by udev's coldplug
#: for qemu's emulated hardware: without them the guest reaches its shell ~8 s sooner under TCG.
KEEP_MODULES = ("fs/", "net/9p/", "drivers/virtio/", "drivers/block/",
                "drivers/char/virtio_console.ko", "drivers/char/hw_random/", "lib/", "mm/",
                "crypto/", "block/")
MODULES_LAYOUT = "pruned-1"


def prune_modules(root: Path, release: str) -> None:
    moddir = root / "lib" / "modules" / release
    kdir = moddir / "kernel"
    for path in sorted(kdir.rglob("*.ko*")):
        if not str(path.relative_to(kdir)).startswith(KEEP_MODULES):
            path.unlink()
    for empty in sorted((d for d in kdir.rglob("*") if d.is_dir()), reverse=True):
        if not any(empty.iterdir()):
            empty.rmdir()
    # Debian's packages leave modules.dep to their postinst; virtme-ng needs it.
    subprocess.run(["depmod", "-a", "-b", str(root), release], check=True)


def cached_kernel(cache: Path, label: str) -> Kernel | None:
    meta = cache / "kernels" / label / "kernel.json"
    try:
        data = json.loads(meta.read_text())
        layout = data.pop("modules", None)
        k = Kernel(**data)
    except (OSError, ValueError, TypeError):
        return None
    if not k.vmlinuz.exists():
        return None
    if layout != MODULES_LAYOUT:
        prune_modules(k.vmlinuz.parent.parent, k.release)
        meta.write_text(json.dumps({**asdict(k), "modules": MODULES_LAYOUT}, indent=1))
    return k


def fetch_kernel(cache: Path, label: str, apt: PrivateApt) -> Kernel:
    if label not in KNOWN:
        raise HarnessError(f"unknown kernel {label!r}: choose from {', '.join(KNOWN)} "
                           "(or give the path of a vmlinuz)")
    apt.update()
    suite = KNOWN[label]
    meta = "linux-image-amd64" + (f"/{suite}" if suite else "")
    deps = apt.run("apt-cache", "depends", meta)
    m = re.search(r"Depends:\s*(linux-image-\S+)", deps)
    if not m:
        raise HarnessError(f"apt-cache depends {meta}: no linux-image dependency in:\n{deps}")
    package = m.group(1)
    release = package.removeprefix("linux-image-")
    if not release.startswith(label + "."):
        raise HarnessError(f"{meta} depends on {package}, which is not a {label} kernel")
    final = cache / "kernels" / label
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{label}-", dir=final.parent))
    try:
        log(f"apt-get download {package}")
        apt.run("apt-get", "download", "-q", package, cwd=work)
        debs = list(work.glob("*.deb"))
        if len(debs) != 1:
            raise HarnessError(f"apt-get download {package} left {debs}")
        version = subprocess.run(["dpkg-deb", "-f", str(debs[0]), "Version"], check=True,
                                 capture_output=True, text=True).stdout.strip()
        root = work / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
        debs[0].unlink()
        if not (root / "boot" / f"vmlinuz-{release}").exists():
            raise HarnessError(f"{package} has no boot/vmlinuz-{release}")
        prune_modules(root, release)
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    k = Kernel(label=label, release=release, package=package, version=version,
               image=str(final / "root" / "boot" / f"vmlinuz-{release}"))
    (final / "kernel.json").write_text(json.dumps({**asdict(k), "modules": MODULES_LAYOUT},
                                                  indent=1))
    log(f"kernel {label}: {package} {version} cached in {final}")
    return k


def kernel_from_path(path: Path) -> Kernel:
    """A vmlinuz given by path (``.../boot/vmlinuz-RELEASE``): modules from ``../lib/modules``."""
    name = path.name
    release = name.removeprefix("vmlinuz-") if name.startswith("vmlinuz-") else name
    return Kernel(label=release, release=release, package=str(path), version="",
                  image=str(path.resolve()))


def get_kernel(cache: Path, label: str, apt: PrivateApt, refresh: bool = False) -> Kernel:
    p = Path(label)
    if label not in KNOWN and p.exists():
        return kernel_from_path(p)
    if not refresh:
        k = cached_kernel(cache, label)
        if k is not None:
            return k
    return fetch_kernel(cache, label, apt)
