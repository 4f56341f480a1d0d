"""Files in a sandbox's guest (FilesystemService). Reads and writes are streamed: a file
never has to be whole in memory on either side."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Iterator, List, Union

import grpc

from .errors import raise_from
from .models import FileEvent, FileInfo
from .v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from .client import Client

# Bytes per Write message (agentd takes at most 4 MiB each).
WRITE_CHUNK = 1 << 20

Data = Union[bytes, bytearray, memoryview, str, BinaryIO, Iterable[bytes]]


def _chunks(data: Data) -> Iterator[bytes]:
    """Bytes of ``data`` in pieces of at most WRITE_CHUNK, read lazily from files and
    iterables."""
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for i in range(0, len(view), WRITE_CHUNK):
            yield bytes(view[i : i + WRITE_CHUNK])
        return
    read = getattr(data, "read", None)
    if read is not None:
        while True:
            b = read(WRITE_CHUNK)
            if not b:
                return
            yield b
    else:
        for b in data:
            for i in range(0, len(b), WRITE_CHUNK):
                yield bytes(b[i : i + WRITE_CHUNK])


class Files:
    """``sandbox.files``: paths are absolute in the guest (confined to its root)."""

    def __init__(self, client: Client, sandbox_id: str) -> None:
        self._c = client
        self._id = sandbox_id

    def stat(self, path: str) -> FileInfo:
        m = self._c._unary(self._c.fs.Stat, pb.StatFileRequest(sandbox_id=self._id, path=path))
        return FileInfo.from_pb(m)

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists (Stat answers NOT_FOUND otherwise)."""
        from .errors import NotFound

        try:
            self.stat(path)
            return True
        except NotFound:
            return False

    def list(self, path: str, depth: int = 1) -> List[FileInfo]:
        """A directory's entries (sorted by path); ``depth`` > 1 adds its subdirectories'."""
        m = self._c._unary(
            self._c.fs.List, pb.ListFilesRequest(sandbox_id=self._id, path=path, depth=depth)
        )
        return [FileInfo.from_pb(e) for e in m.entries]

    def mkdir(self, path: str, parents: bool = False) -> None:
        self._c._unary(
            self._c.fs.MakeDir, pb.MakeDirRequest(sandbox_id=self._id, path=path, parents=parents)
        )

    def remove(self, path: str, recursive: bool = False) -> None:
        self._c._unary(
            self._c.fs.Remove,
            pb.RemoveFileRequest(sandbox_id=self._id, path=path, recursive=recursive),
        )

    def rename(self, src: str, dst: str) -> None:
        # `from` is a Python keyword: the field is set through the constructor's kwargs.
        req = pb.RenameFileRequest(**{"sandbox_id": self._id, "from": src, "to": dst})
        self._c._unary(self._c.fs.Rename, req)

    def watch(self, path: str) -> FileWatch:
        """Watches one directory (not its subdirectories): returns once the guest's watch is
        in place, so every change after the call is reported; iterate for
        :class:`FileEvent` s, :meth:`FileWatch.cancel` to stop."""
        return FileWatch(self._c.fs.Watch(pb.WatchDirRequest(sandbox_id=self._id, path=path)))

    def read(self, path: str, offset: int = 0, length: int = 0) -> Iterator[bytes]:
        """The file's bytes as the guest reads them, chunk by chunk (``length`` 0: to the
        end)."""
        req = pb.ReadFileRequest(sandbox_id=self._id, path=path, offset=offset, length=length)
        try:
            call = self._c.fs.Read(req)
            for chunk in call:
                yield chunk.data
        except grpc.RpcError as e:
            raise_from(e)

    def read_bytes(self, path: str) -> bytes:
        """The whole file in memory (small files; :meth:`read` or :meth:`download` else)."""
        return b"".join(self.read(path))

    def download(self, path: str, local: Union[str, "os.PathLike[str]"]) -> int:
        """Copies the guest's ``path`` to the local file ``local``; the bytes copied. A
        failed copy removes its partial local file."""
        n = 0
        try:
            with open(local, "wb") as f:
                for b in self.read(path):
                    f.write(b)
                    n += len(b)
        except BaseException:
            try:
                os.unlink(local)
            except FileNotFoundError:
                pass
            raise
        return n

    def write(
        self,
        path: str,
        data: Data,
        mode: int = 0,
        append: bool = False,
        make_parents: bool = False,
    ) -> int:
        """Writes ``data`` (bytes, str, a binary file object or an iterable of bytes, read
        as it is sent) to the guest's ``path``; the bytes written. ``mode`` 0 is 0644.

        The guest writes in place: if the call fails, what arrived so far stays (write a
        temporary name and :meth:`rename` for an atomic replace)."""
        first = pb.WriteFileRequest(
            sandbox_id=self._id, path=path, mode=mode, append=append, make_parents=make_parents
        )

        def requests() -> Iterator[pb.WriteFileRequest]:
            yield first
            for b in _chunks(data):
                yield pb.WriteFileRequest(data=b)

        return int(self._c._unary(self._c.fs.Write, requests()).bytes)

    def upload(
        self,
        local: Union[str, "os.PathLike[str]"],
        path: str,
        mode: int = 0,
        make_parents: bool = False,
    ) -> int:
        """Copies the local file ``local`` to the guest's ``path`` (streamed)."""
        with open(local, "rb") as f:
            return self.write(path, f, mode=mode, make_parents=make_parents)


class FileWatch(Iterator[FileEvent]):
    """The events of :meth:`Files.watch`, until cancelled (or the sandbox goes)."""

    def __init__(self, call: Any) -> None:
        self._call = call
        # agentd sends the response headers once the watch is in place; a refusal is an
        # answer without them (the call is then over), raised here, not at the first event.
        call.initial_metadata()
        if call.done() and call.code() != grpc.StatusCode.OK:
            raise_from(call)

    def __iter__(self) -> FileWatch:
        return self

    def __next__(self) -> FileEvent:
        try:
            return FileEvent.from_pb(next(self._call))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and self._call.cancelled():
                raise StopIteration from None
            raise_from(e)

    def cancel(self) -> None:
        """Ends the watch (iteration stops)."""
        self._call.cancel()
