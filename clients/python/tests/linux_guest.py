#!/usr/bin/env python3
"""Checks of the client against a Linux guest with guest-init's agent: run by the test
host's scenario (scripts/testhost/scenarios/agentd-python.sh), not by pytest here (this
host's test guest has no agent).

    python3 linux_guest.py ENDPOINT SANDBOX_ID run|files|watch|streams [N]

Each check prints what it saw and exits non-zero with the reason on the first mismatch.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import sys
import tempfile
import threading
import time
from typing import List

from grove_client import AlreadyExists, Client, NotFound, Sandbox, aio_channel
from grove_client.v1 import sandbox_pb2 as pb
from grove_client.v1 import sandbox_pb2_grpc as rpc


class CheckFailed(Exception):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def log(msg: str) -> None:
    print(f"py: {msg}", flush=True)


def check_run(client: Client, sb: Sandbox) -> None:
    r = sb.run("echo out; echo err >&2; exit 7")
    check((r.exit_code, r.signal) == (7, None), f"exit {r.exit_code} signal {r.signal}, not 7")
    check((r.stdout, r.stderr) == (b"out\n", b"err\n"), f"stdout {r.stdout!r} stderr {r.stderr!r}")
    r = sb.run(["wc", "-l"], stdin="a\nb\nc\n")
    check(r.ok and r.stdout.split() == [b"3"], f"stdin: wc -l said {r.stdout!r} ({r.exit_code})")
    blob = hashlib.sha256(b"grove").digest() * ((256 << 10) // 32)  # 256 KiB through cat
    r = sb.run("cat", stdin=blob)
    check(r.ok and r.stdout == blob, f"cat of {len(blob)} stdin bytes gave {len(r.stdout)}")
    r = sb.run('echo "$FOO"; pwd', env={"FOO": "bar"}, cwd="/tmp")
    check(r.stdout == b"bar\n/tmp\n", f"env/cwd: {r.stdout!r}")
    log("run: stdout, stderr, exit 7, stdin (wc -l, 256 KiB through cat), env and cwd")
    # Streaming: output as it comes, in order; the exit at the end.
    stream = sb.start("for i in 1 2 3; do echo n=$i; sleep 0.3; done; exit 4")
    seqs: List[int] = []
    data = b""
    for o in stream:
        check(o.stream == "stdout", f"unexpected {o.stream} chunk {o.data!r}")
        seqs.append(o.seq)
        data += o.data
    check(data == b"n=1\nn=2\nn=3\n" and stream.exit is not None and stream.exit.code == 4,
          f"stream gave {data!r}, exit {stream.exit}")  # fmt: skip
    check(seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"sequence numbers {seqs}")
    # Connect replays an ended process's output and its exit.
    again = client.get_process(stream.process.id).connect().collect()
    check((again.stdout, again.exit_code) == (data, 4), f"connect replay {again}")
    ids = {p.process_id: p for p in sb.processes()}
    check(stream.process.id in ids and not ids[stream.process.id].running, "not in processes()")
    # A signal ends a running process; a timeout kills one.
    s = sb.start(["sleep", "300"])
    s.process.signal(9)
    r = s.collect()
    check(
        (r.exit_code, r.signal) == (None, 9), f"killed sleep: exit {r.exit_code} signal {r.signal}"
    )
    r = sb.run(["sleep", "60"], timeout=1)
    check(r.timed_out and r.signal == 9, f"timeout: {r}")
    log("run: streamed in order (seq), connect replay, processes(), signal 9, timeout")
    # A PTY through the API: its size, a Resize before the process reads a typed line, the
    # size after it, the exit.
    s = sb.start("stty size; read line; stty size; echo got=$line", pty=(24, 80), stdin=True)
    first = b""
    for o in s:  # up to the first size, then the resize and the line it reads
        first += o.data
        if b"\n" in first:
            break
    check(first.replace(b"\r", b"") == b"24 80\n", f"pty: first output {first!r}")
    s.process.resize(40, 120)
    s.process.send_stdin(b"hello\n")
    r = s.collect()
    lines = r.stdout.replace(b"\r", b"").split(b"\n")
    check(r.exit_code == 0 and b"40 120" in lines and b"got=hello" in lines,
          f"pty: exit {r.exit_code}, output after the resize {r.stdout!r}")  # fmt: skip
    # A checkpoint when a process exits, then a rewind to it.
    r = sb.run("echo one >/root/cp && sync", checkpoint=True)
    check(r.ok and r.checkpoint is not None, f"no checkpoint: {r}")
    sb.run("echo two >/root/cp && sync")
    sb.rewind(r.checkpoint)
    got = sb.run("cat /root/cp").stdout
    check(got == b"one\n", f"after a rewind to checkpoint {r.checkpoint}: /root/cp is {got!r}")
    log("run: a PTY (24x80, resized to 40x120 before it read a typed line), a checkpoint and rewind")


def check_files(client: Client, sb: Sandbox) -> None:
    f = sb.files
    data = os.urandom((3 << 20) + 12345)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        n = f.write("/run/py/in/blob", io.BytesIO(data), make_parents=True)
        t1 = time.monotonic()
        check(n == len(data), f"write: {n} bytes, not {len(data)}")
        st = f.stat("/run/py/in/blob")
        check(st.type == "regular" and st.size == len(data), f"stat: {st}")
        got = os.path.join(tmp, "blob")
        check(f.download("/run/py/in/blob", got) == len(data), "download size")
        with open(got, "rb") as fh:
            check(fh.read() == data, "the downloaded file differs from what was written")
        t2 = time.monotonic()
        check(b"".join(f.read("/run/py/in/blob", offset=100, length=1000)) == data[100:1100],
              "a ranged read differs")  # fmt: skip
        log(f"files: {len(data)} bytes in {t1 - t0:.1f} s, out in {t2 - t1:.1f} s, identical")
        up = os.path.join(tmp, "up")
        with open(up, "wb") as fh:
            fh.write(data[:70000])
        f.upload(up, "/run/py/in/small")
    check(f.read_bytes("/run/py/in/small") == data[:70000], "upload round trip")
    f.mkdir("/run/py/a/b", parents=True)
    f.rename("/run/py/in/small", "/run/py/a/b/moved")
    names = [e.path for e in f.list("/run/py", depth=3)]
    for p in ("/run/py/in/blob", "/run/py/a/b/moved", "/run/py/a/b"):
        check(p in names, f"{p} not in list {names}")
    check(f.list("/run/py/a")[0].is_dir, "list: /run/py/a/b is not a directory")
    check(sb.run("cat /run/py/a/b/moved | wc -c").stdout.split() == [b"70000"], "guest size")
    try:
        f.stat("/run/py/in/small")
        check(False, "renamed file still there")
    except NotFound:
        pass
    try:
        f.remove("/run/py")
        check(False, "non-recursive remove of a non-empty directory worked")
    except AlreadyExists:
        pass  # guest-init answers ENOTEMPTY with ALREADY_EXISTS
    f.remove("/run/py", recursive=True)
    check(not f.exists("/run/py"), "/run/py left after remove")
    log("files: upload, mkdir, rename, list (depth), stat, remove; NotFound after a rename")


def check_watch(sb: Sandbox) -> None:
    """FilesystemService.Watch: every change after watch() returns, in order."""
    f = sb.files
    f.mkdir("/run/pyw", parents=True)
    w = f.watch("/run/pyw")
    guard = threading.Timer(120, w.cancel)  # hang guard: a missing event ends the loop
    guard.start()
    f.write("/run/pyw/f", b"a\n")
    f.mkdir("/run/pyw/d")
    f.rename("/run/pyw/f", "/run/pyw/g")
    f.remove("/run/pyw/g")
    f.remove("/run/pyw/d")
    got: List[tuple] = []
    for ev in w:
        e = (ev.kind, ev.path, ev.is_dir)
        if not got or got[-1] != e:  # modified may come twice (the write and the close)
            got.append(e)
        if e == ("removed", "/run/pyw/d", True):
            break
    guard.cancel()
    w.cancel()
    want = [
        ("created", "/run/pyw/f", False),
        ("modified", "/run/pyw/f", False),
        ("created", "/run/pyw/d", True),
        ("renamed_from", "/run/pyw/f", False),
        ("renamed_to", "/run/pyw/g", False),
        ("removed", "/run/pyw/g", False),
        ("removed", "/run/pyw/d", True),
    ]
    check(got == want, f"watch saw {got}, not {want}")
    try:
        f.watch("/run/nonexistent")
        check(False, "a watch of a missing directory was accepted")
    except NotFound:
        pass
    f.remove("/run/pyw", recursive=True)
    log("watch: created, modified, created (dir), renamed from/to, removed x2, in order")


async def check_streams(endpoint: str, sb: Sandbox, n: int, lines: int) -> None:
    """n concurrent Connect streams to one process that prints `lines` numbered lines once
    told to: every stream gets every line in order, then the exit; a run() on the same
    sandbox meanwhile succeeds."""
    go = f"/run/py-go-{os.getpid()}"
    script = (f"while [ ! -e {go} ]; do sleep 0.1; done; "
              f"i=1; while [ $i -le {lines} ]; do echo line-$i; i=$((i+1)); sleep 0.1; done; exit 3")  # fmt: skip
    ch = aio_channel(endpoint)
    stub = rpc.ProcessServiceStub(ch)
    start = stub.Start(pb.StartProcessRequest(sandbox_id=sb.id, argv=["sh", "-c", script]))
    first = await start.read()
    pid = first.started.process_id
    check(bool(pid), f"Start began with {first}")
    attached = asyncio.Event()
    n_started = 0

    async def one(i: int) -> bytes:
        nonlocal n_started
        call = stub.Connect(pb.ConnectProcessRequest(process_id=pid))
        out = b""
        exit_code = None
        async for ev in call:
            kind = ev.WhichOneof("event")
            if kind == "started":
                n_started += 1
                if n_started == n:
                    attached.set()
            elif kind == "output":
                out += ev.output.data
            elif kind == "exit":
                exit_code = ev.exit.code
        check(exit_code == 3, f"stream {i}: exit {exit_code}, not 3")
        return out

    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    await asyncio.wait_for(attached.wait(), 600)
    log(f"streams: {n} Connect streams attached in {time.monotonic() - t0:.1f} s")
    # Let the process print; a run() in the same sandbox meanwhile (blocking: in a thread).
    r = await asyncio.get_running_loop().run_in_executor(
        None, lambda: sb.run(f"echo go >{go}; echo meanwhile")
    )
    check(r.ok and r.stdout == b"meanwhile\n", f"run() meanwhile: {r}")
    outs = await asyncio.wait_for(asyncio.gather(*tasks), 600)
    want = "".join(f"line-{i}\n" for i in range(1, lines + 1)).encode()
    bad = [i for i, o in enumerate(outs) if o != want]
    check(not bad, f"{len(bad)} streams got other output, e.g. #{bad[:1]}: {outs[bad[0]][:200]!r}"
          if bad else "")  # fmt: skip
    start.cancel()  # Start's own stream was not read; the process has ended anyway
    await ch.close(None)
    log(f"streams: all {n} got {lines} lines in order and exit 3 "
        f"({time.monotonic() - t0:.1f} s); a run() meanwhile succeeded")  # fmt: skip


def main() -> int:
    try:
        checks(*sys.argv[1:])
    except CheckFailed as e:
        print(f"py: FAIL: {e}", flush=True)
        return 1
    return 0


def checks(endpoint: str, sandbox_id: str, what: str, *rest: str) -> None:
    with Client(endpoint) as client:
        sb = Sandbox.get(client, sandbox_id)
        if what == "run":
            check_run(client, sb)
        elif what == "files":
            check_files(client, sb)
        elif what == "watch":
            check_watch(sb)
        elif what == "streams":
            n = int(rest[0]) if rest else 1000
            asyncio.run(check_streams(endpoint, sb, n, lines=30))
            # agentd serves normally afterwards.
            check(sb.run("echo after").stdout == b"after\n", "run() after the streams")
            check(sb.refresh().state == "running", "the sandbox does not run")
            check(client.node_info().capacity.sandboxes >= 1, "node info")
            log("streams: agentd serves normally afterwards (run, get, node info)")
        else:
            raise SystemExit(f"unknown check {what!r}: run, files, watch or streams")


if __name__ == "__main__":
    sys.exit(main())
