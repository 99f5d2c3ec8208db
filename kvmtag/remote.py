"""The caller's memory, reached over the connection: the daemon's `UserMemory`.

For one ioctl request, copy_from_user / copy_to_user / find_vmas become READ, WRITE and VMAS
callbacks that the client answers from its own memory, in windows of at most `wire.WINDOW`
bytes. A struct the client passed as a buffer travels inline with the request and is served
from here; the model reaches it at INLINE_ADDR, 2**64, which no 64-bit pointer can name.

The model runs on the connection's thread; a callback is a blocking send and receive on the
connection, so a large copy never blocks other connections.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable, Hashable, Sequence

from kvmtag import wire
from kvmtag.usermem import Buffer, Vma

log = logging.getLogger("kvmtag.daemon")

BULK = 4096  # copies larger than this use the shared window, when the connection has one
# Not a 64-bit value at all, so no pointer inside a struct can ever name the inline struct.
INLINE_ADDR = 2**64
Roundtrip = Callable[[wire.Event], wire.Event]


class RemoteMemory:
    """`UserMemory` for one request of one connection."""

    def __init__(
        self,
        request: wire.Ioctl,
        process: Hashable,
        roundtrip: Roundtrip | None,
        adopt_vmas: Callable[[list[Vma]], list[Vma]],
        window: int = wire.WINDOW,
        shared: mmap.mmap | None = None,
    ) -> None:
        self._req = request
        self._process = process
        self._roundtrip = roundtrip  # None: no callbacks (the caller has no memory to reach)
        self._adopt = adopt_vmas
        self._window = window
        # The connection's shared window, if it has one: bulk callbacks move their data there
        # (READ_WINDOW, WRITE_WINDOW) instead of through the socket.
        self._shared = memoryview(shared) if shared is not None else None
        self._bounce: memoryview | None = None  # the last bounce_buffer, if it is the window
        self.inline = bytearray(request.inline) if request.inline is not None else None
        self.written_back = False

    @property
    def process(self) -> Hashable:
        return self._process

    def _in_inline(self, addr: int) -> bool:
        return self.inline is not None and INLINE_ADDR <= addr < INLINE_ADDR + len(self.inline)

    def copy_from_user(self, addr: int, size: int) -> Buffer:
        if size <= 0:
            return b""
        if self._in_inline(addr):
            assert self.inline is not None
            at = addr - INLINE_ADDR
            return bytes(self.inline[at : at + size])
        if not 0 <= addr < INLINE_ADDR:
            return b""  # beyond the inline struct, or no address at all: a fault
        if self._shared is not None and size > BULK:
            return self._read_shared(addr, size)
        pieces: list[Buffer] = []
        done = 0
        while done < size:
            n = min(self._window, size - done, INLINE_ADDR - addr - done)
            if n <= 0:
                break  # the address space ends here
            got = self._call(wire.Read(self._req.id, addr + done, n))
            if got is None:
                break
            if not isinstance(got, wire.ReadData) or len(got.data) > n:
                raise wire.RemoteProtocolError(f"READ answered with {got!r:.80}")
            pieces.append(got.data)
            done += len(got.data)
            if len(got.data) < n:
                break
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def copy_to_user(self, addr: int, data: Buffer) -> int:
        view = memoryview(data).cast("B")
        if not len(view):
            return 0
        if self._in_inline(addr):
            assert self.inline is not None
            if not self._req.inline_writable:
                return 0  # a read-only buffer: the kernel's copy_to_user faults
            at = addr - INLINE_ADDR
            n = min(len(view), len(self.inline) - at)
            self.inline[at : at + n] = view[:n]
            self.written_back = True
            return n
        if not 0 <= addr < INLINE_ADDR:
            return 0
        if self._shared is not None and len(view) > BULK:
            return self._write_shared(addr, view, staged=data is self._bounce)
        done = 0
        while done < len(view):
            n = min(self._window, len(view) - done, INLINE_ADDR - addr - done)
            if n <= 0:
                break
            got = self._call(wire.Write(self._req.id, addr + done, view[done : done + n]))
            if got is None:
                break
            if not isinstance(got, wire.WriteDone) or got.written > n:
                raise wire.RemoteProtocolError(f"WRITE answered with {got!r:.80}")
            done += got.written
            if got.written < n:
                break
        return done

    def bounce_buffer(self, size: int) -> memoryview:
        """The shared window itself when it is large enough: filling it and giving it to
        copy_to_user then costs no extra copy."""
        if self._shared is not None and BULK < size <= len(self._shared):
            self._bounce = self._shared[:size]
            return self._bounce
        return memoryview(bytearray(size))

    def _read_shared(self, addr: int, size: int) -> Buffer:
        """A bulk copy_from_user through the shared window. Within one window the answer is
        the window itself (valid until the next callback of this request: the model uses
        each read at once); beyond, the windows are gathered."""
        assert self._shared is not None
        window = len(self._shared)
        pieces: list[Buffer] = []
        done = 0
        while done < size:
            n = min(window, size - done, INLINE_ADDR - addr - done)
            if n <= 0:
                break  # the address space ends here
            got = self._window_call(wire.ReadWindow(self._req.id, addr + done, n), n)
            if size <= window:
                return self._shared[:got]
            pieces.append(bytes(self._shared[:got]))
            done += got
            if got < n:
                break
        return b"".join(pieces)

    def _write_shared(self, addr: int, view: memoryview, staged: bool) -> int:
        """A bulk copy_to_user through the shared window; `staged`: the data is already there
        (it is the bounce buffer)."""
        assert self._shared is not None
        window = len(self._shared)
        self._bounce = None
        done = 0
        while done < len(view):
            n = min(window, len(view) - done, INLINE_ADDR - addr - done)
            if n <= 0:
                break
            if not staged:
                self._shared[:n] = view[done : done + n]
            got = self._window_call(wire.WriteWindow(self._req.id, addr + done, n), n)
            done += got
            if got < n:
                break
        return done

    def _window_call(self, event: wire.ReadWindow | wire.WriteWindow, n: int) -> int:
        got = self._call(event)
        if got is None:
            return 0
        if not isinstance(got, wire.WindowDone) or got.count > n:
            raise wire.RemoteProtocolError(f"{type(event).__name__} answered with {got!r:.80}")
        return got.count

    def find_vmas(self, start: int, end: int) -> Sequence[Vma]:
        got = self._call(wire.Vmas(self._req.id, start, end))
        if got is None:
            return []
        if not isinstance(got, wire.VmasData):
            raise wire.RemoteProtocolError(f"VMAS answered with {got!r:.80}")
        return self._adopt(got.vmas)

    def _call(self, event: wire.Event) -> wire.Event | None:
        if self._roundtrip is None:
            log.error("request %#x needed a callback without a connection", self._req.request)
            return None  # a fault rather than a hang
        return self._roundtrip(event)
