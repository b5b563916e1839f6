"""Fetch and cache Debian kernels (5.10, 6.1, 6.12) for the qemu test harness.

The host kernel has no kprobes, Debian's stock kernels do.  Each kernel comes
from the ``linux-image-amd64`` metapackage of one Debian suite, fetched with a
private apt configuration (own sources list, lists and cache directories) so
the machine's apt setup is neither read for packages nor changed.  The mirror
URL is taken from the machine's existing apt sources.  The real package
(``linux-image-<release>``) is downloaded with ``apt-get download`` and
unpacked with ``dpkg-deb -x`` into::

    $TRACER_VM_CACHE/<version>/root/      unpacked package: boot/, lib/modules/
    $TRACER_VM_CACHE/<version>/release    uname -r, written last: "complete"

(``lib/`` is ``usr/lib/`` from trixie on; default cache:
/var/cache/tracer-bpf-vm).  A kernel whose ``release`` file
exists is used as is, without any network access.

    python3 test/vm/kernels.py [--refresh] [5.10 6.1 6.12]
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

KERNELS = {"5.10": "bullseye", "6.1": "bookworm", "6.12": "trixie"}
CACHE = os.environ.get("TRACER_VM_CACHE", "/var/cache/tracer-bpf-vm")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


class Kernel(object):
    """One unpacked kernel: version key, release (uname -r) and paths."""

    def __init__(self, version, release, root):
        self.version = version
        self.release = release
        self.root = root
        self.vmlinuz = os.path.join(root, "boot", "vmlinuz-" + release)
        self.modules = os.path.join(root, "lib", "modules", release)
        if not os.path.isdir(self.modules):      # merged /usr (trixie on)
            self.modules = os.path.join(root, "usr", "lib", "modules", release)

    def __repr__(self):
        return "Kernel(%s, %s, %s)" % (self.version, self.release, self.root)


def debian_mirror():
    """Return the Debian archive URL configured in this machine's apt sources."""
    texts = []
    for path in ["/etc/apt/sources.list"] + sorted(
            glob.glob("/etc/apt/sources.list.d/*.list")
            + glob.glob("/etc/apt/sources.list.d/*.sources")):
        if os.path.isfile(path):
            with open(path) as f:
                texts.append(f.read())
    urls = []
    for text in texts:
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.match(r"URIs:\s*(.*)", line)          # deb822 .sources
            if m:
                urls.extend(m.group(1).split())
            m = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)", line)  # one-line
            if m:
                urls.append(m.group(1))
    for url in urls:
        if url.rstrip("/").endswith("/debian"):
            return url.rstrip("/")
    raise SystemExit("kernels: no Debian archive found in /etc/apt/sources.list(.d)")


def _apt_options(work):
    """apt -o options that confine apt to the private directory ``work``."""
    return [
        "-oDir::Etc::SourceList=" + os.path.join(work, "sources.list"),
        "-oDir::Etc::SourceParts=" + os.path.join(work, "sources.list.d"),
        "-oDir::Etc::Preferences=" + os.path.join(work, "preferences"),
        "-oDir::Etc::PreferencesParts=" + os.path.join(work, "preferences.d"),
        "-oDir::State=" + os.path.join(work, "state"),
        "-oDir::State::Lists=" + os.path.join(work, "lists"),
        "-oDir::State::status=" + os.path.join(work, "status"),
        "-oDir::Cache=" + os.path.join(work, "cache"),
        "-oAPT::Architecture=amd64",
        "-oAPT::Architectures::=amd64",
        "-oAcquire::Languages=none",
        "-oAcquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false",
        "-oDebug::NoLocking=true",
        "-oAPT::Sandbox::User=root",
    ]


def _apt_setup(suite):
    work = os.path.join(CACHE, "apt", suite)
    for sub in ("sources.list.d", "preferences.d", "state", "lists/partial",
                "cache/archives/partial"):
        os.makedirs(os.path.join(work, sub), exist_ok=True)
    with open(os.path.join(work, "sources.list"), "w") as f:
        f.write("deb [signed-by=%s] %s %s main\n" % (KEYRING, debian_mirror(), suite))
    open(os.path.join(work, "status"), "a").close()
    return work, _apt_options(work)


def _log(msg):
    sys.stderr.write("kernels: %s\n" % msg)
    sys.stderr.flush()


def cached(version):
    """Return the cached Kernel for ``version``, or None if not complete."""
    base = os.path.join(CACHE, version)
    try:
        with open(os.path.join(base, "release")) as f:
            release = f.read().strip()
    except IOError:
        return None
    return Kernel(version, release, os.path.join(base, "root"))


def fetch(version, refresh=False):
    """Return the Kernel for ``version`` ("5.10", "6.1", "6.12"), fetching it
    (network: the Debian mirror only) unless it is already cached."""
    if version not in KERNELS:
        raise SystemExit("kernels: unknown kernel %r (choose from %s)"
                         % (version, ", ".join(KERNELS)))
    kernel = None if refresh else cached(version)
    if kernel:
        return kernel
    suite = KERNELS[version]
    work, opts = _apt_setup(suite)
    _log("apt-get update (%s)" % suite)
    subprocess.check_call(["apt-get", "-q", "update"] + opts,
                          stdout=subprocess.DEVNULL)
    show = subprocess.check_output(
        ["apt-cache"] + opts + ["show", "--no-all-versions", "linux-image-amd64"],
        universal_newlines=True)
    m = re.search(r"^Depends:.*?\b(linux-image-([0-9][^\s,]*))", show, re.M)
    if not m:
        raise SystemExit("kernels: cannot resolve linux-image-amd64 in %s" % suite)
    package, release = m.group(1), m.group(2)
    if release.endswith("-unsigned"):
        release = release[:-len("-unsigned")]
    _log("downloading %s" % package)
    debdir = os.path.join(work, "deb")
    shutil.rmtree(debdir, ignore_errors=True)
    os.makedirs(debdir)
    subprocess.check_call(["apt-get", "-q", "download"] + opts + [package],
                          cwd=debdir, stdout=subprocess.DEVNULL)
    deb = glob.glob(os.path.join(debdir, "*.deb"))[0]
    base = os.path.join(CACHE, version)
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    _log("unpacking %s" % os.path.basename(deb))
    subprocess.check_call(["dpkg-deb", "-x", deb, os.path.join(base, "root")])
    shutil.rmtree(debdir)
    kernel = Kernel(version, release, os.path.join(base, "root"))
    if not os.path.isfile(kernel.vmlinuz) or not os.path.isdir(kernel.modules):
        raise SystemExit("kernels: %s lacks %s or %s"
                         % (package, kernel.vmlinuz, kernel.modules))
    with open(os.path.join(base, "release.tmp"), "w") as f:
        f.write(release + "\n")
    os.rename(os.path.join(base, "release.tmp"), os.path.join(base, "release"))
    return kernel


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--refresh", action="store_true",
                    help="fetch again even if cached (picks up new releases)")
    ap.add_argument("versions", nargs="*", default=list(KERNELS),
                    help="kernel versions (default: all of %s)" % ", ".join(KERNELS))
    args = ap.parse_args()
    for version in args.versions:
        k = fetch(version, args.refresh)
        print("%s %s %s" % (version, k.release, k.root))


if __name__ == "__main__":
    main()
