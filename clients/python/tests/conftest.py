"""A real agentd for the tests: the built binary in a temporary data directory, with the
test guest (scripts/build-testguest.sh) registered and warmed as template ``tg``.

Binaries: $GROVE_AGENTD (else target/release/agentd), $GROVE_VMM (else grove-vmm beside
agentd), $GROVE_TESTGUEST (else scripts/build-testguest.sh builds it). A missing binary or
a host without a usable /dev/kvm fails the tests with the reason: nothing is skipped.

Cleanup, pass or fail: agentd is killed by its PID, then every VMM it started: the pids in
DATA/vmm/*/pid whose command line names this data directory, and any other grove-vmm
process naming it (one spawned just before its pid file was written), as agentd's Rust
end-to-end tests do (agentd/tests/common/mod.rs).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

from grove_client import Client, GroveError, NotFound, Sandbox, Snapshot

REPO = Path(__file__).resolve().parents[3]
# The test guest in fork mode: it fills 8 MiB, prints its identity once per new identity.
TEMPLATE = "tg"
GUEST_CMDLINE = "tg.mode=fork tg.touch_mib=8 tg.idle_us=1000"
# Hang guard for waits (not a timing assertion).
DEADLINE = 120.0


def wait_until(what: str, cond: Callable[[], bool], deadline: float = DEADLINE) -> None:
    """Polls ``cond`` until it holds; fails after ``deadline`` seconds (a hang guard)."""
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline:.0f} s waiting for {what}")
        time.sleep(0.05)


def _binary(env: str, default: Path, how: str) -> Path:
    p = Path(os.environ[env]) if os.environ.get(env) else default
    if not (p.is_file() and os.access(p, os.X_OK)):
        pytest.fail(f"{p} is missing ({how}; or set {env})", pytrace=False)
    return p


def _test_guest() -> Path:
    if os.environ.get("GROVE_TESTGUEST"):
        return _binary("GROVE_TESTGUEST", Path(), "scripts/build-testguest.sh builds it")
    out = subprocess.run(
        [str(REPO / "scripts/build-testguest.sh")], stdout=subprocess.PIPE, text=True
    )
    if out.returncode != 0 or not out.stdout.strip():
        pytest.fail("scripts/build-testguest.sh failed (see its output above)", pytrace=False)
    return Path(out.stdout.strip().splitlines()[-1])


def _require_kvm() -> None:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        pytest.fail(f"/dev/kvm is not usable here ({e}): these tests boot VMs", pytrace=False)


def _cmdline(pid: int) -> List[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _is_vmm_of(pid: int, data: Path) -> bool:
    argv = _cmdline(pid)
    return bool(argv) and Path(argv[0]).name == "grove-vmm" and any(str(data) in a for a in argv)


def vmm_pids(data: Path) -> List[int]:
    """Live grove-vmm processes of this data directory: its pid files, checked against
    their command lines, and a /proc scan for any whose pid file was never written."""
    pids = set()
    for f in (data / "vmm").glob("*/pid"):
        try:
            pid = int(f.read_text().strip())
        except (OSError, ValueError):
            continue
        if _is_vmm_of(pid, data):
            pids.add(pid)
    for e in os.listdir("/proc"):
        if e.isdigit() and _is_vmm_of(int(e), data):
            pids.add(int(e))
    return sorted(pids)


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


class Agentd:
    """The running agentd: its process, data directory and endpoint."""

    def __init__(self, root: Path, proc: subprocess.Popen) -> None:
        self.root = root
        self.proc = proc
        self.data = root / "data"
        self.sock = root / "agentd.sock"
        self.log = root / "agentd.log"
        self.endpoint = f"unix:{self.sock}"

    def vmm_pids(self) -> List[int]:
        return vmm_pids(self.data)


@pytest.fixture(scope="session")
def agentd(request: pytest.FixtureRequest) -> Iterator[Agentd]:
    _require_kvm()
    bin_ = _binary(
        "GROVE_AGENTD", REPO / "target/release/agentd", "cargo build --release builds it"
    )
    vmm = _binary("GROVE_VMM", bin_.with_name("grove-vmm"), "cargo build --release builds it")
    root = Path(tempfile.mkdtemp(prefix="grove-pytest-", dir="/tmp"))
    data, sock = root / "data", root / "agentd.sock"
    with open(root / "agentd.log", "wb") as log:
        proc = subprocess.Popen(
            [str(bin_), "--data-dir", str(data), "--listen", f"unix:{sock}",
             "--metrics-listen", "", "--vmm", str(vmm), "--pool-size", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")},
        )  # fmt: skip
    a = Agentd(root, proc)
    try:
        end = time.monotonic() + DEADLINE
        while not sock.exists():
            if proc.poll() is not None:
                pytest.fail(f"agentd exited with {proc.returncode}:\n{a.log.read_text()}")
            if time.monotonic() > end:
                pytest.fail("agentd did not create its socket")
            time.sleep(0.02)
        yield a
    finally:
        if request.session.testsfailed:
            tail = a.log.read_text(errors="replace").splitlines()[-40:]
            print("\n---- agentd.log (last 40 lines) ----\n" + "\n".join(tail), file=sys.stderr)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for pid in a.vmm_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 10
        while (left := [p for p in a.vmm_pids() if alive(p)]) and time.monotonic() < end:
            time.sleep(0.05)  # killed, not yet reaped by init
        shutil.rmtree(root, ignore_errors=True)
        if left:
            pytest.fail(f"grove-vmm processes survived the cleanup: {left}")


@pytest.fixture(scope="session")
def client(agentd: Agentd) -> Iterator[Client]:
    with Client(agentd.endpoint) as c:
        yield c


@pytest.fixture(scope="session")
def template(client: Client) -> str:
    """The test guest registered and warmed as template ``tg``."""
    client.register_template(
        TEMPLATE,
        str(_test_guest()),
        cmdline=GUEST_CMDLINE,
        vcpus=1,
        memory_mib=128,
        ready_text="READY",
    )
    t = client.warm_template(TEMPLATE)
    assert t.snapshot > 0, "the warm template names no snapshot"
    return TEMPLATE


class Made:
    """What a test created, deleted at its end even when it fails (subtrees, then
    snapshots); what is already gone is passed over."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.sandboxes: List[Sandbox] = []
        self.snapshots: List[Snapshot] = []

    def sandbox(self, sb: Sandbox) -> Sandbox:
        self.sandboxes.append(sb)
        return sb

    def snapshot(self, s: Snapshot) -> Snapshot:
        self.snapshots.append(s)
        return s

    def cleanup(self) -> None:
        errors = []
        for sb in reversed(self.sandboxes):
            try:
                sb.delete(subtree=True)
            except NotFound:
                pass
            except GroveError as e:
                errors.append(f"delete {sb.id}: {e}")
        for s in reversed(self.snapshots):
            try:
                self.client.delete_snapshot(s)
            except NotFound:
                pass
            except GroveError as e:
                errors.append(f"delete snapshot {s.id}: {e}")
        assert not errors, errors


@pytest.fixture
def made(client: Client) -> Iterator[Made]:
    m = Made(client)
    yield m
    m.cleanup()
