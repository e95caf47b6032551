"""In-process nftables reads through libnftables, the library the ``nft`` command wraps.

Why not run ``nft -j list table ...`` per reading: measured on the 2-core reference host
(docs/benchmarks.md), ``nsenter --net=... nft -j list table`` costs about 6 ms of CPU per
call, so 200 cells at a 1 s tick would need 1.2 cores for nftables alone. The same command
through libnftables in this process costs a fraction of that. We bind the library with
ctypes rather than depend on a Python wrapper: Debian's ``python3-nftables`` is not
installable into a virtualenv, its PyPI copy is an unmaintained repackaging, and we need
control of which network namespace each step runs in, which no wrapper offers.

Namespaces: a context's nftables netlink socket belongs to the namespace its thread was
in when the context was created, but libnftables also opens an rtnetlink socket *per
command* to name interfaces (``iif "eth0"``), in the calling thread's namespace at that
moment. So the worker thread enters the cell's namespace (``setns``) to create the
context and again around every command, and returns to its own right after. Were the
names taken from the host's namespace they would be wrong (interface indexes are per
namespace), and the dump of every host link (hundreds of TAPs) would cost milliseconds.

All library calls run on one worker thread: libnftables keeps process-wide state (the
interface cache) and documents no thread safety, and its calls block on netlink. A
:class:`Session` is one context bound to one namespace; it notices when the namespace
path names a different namespace (the cell was restarted) and rebinds, so an old
namespace is never kept alive by our socket or descriptor. Freeing a session (when its
cell goes away) closes both for the same reason.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from probes.base import Io, PlatformUnsupported

__all__ = ["Libnftables", "Session", "shared"]

_SONAME: Final = "libnftables.so.1"
_CLONE_NEWNET: Final = 0x40000000
_NFT_CTX_DEFAULT: Final = 0
_NFT_CTX_OUTPUT_JSON: Final = 1 << 4
_PROBE: Final = "nftables"
_HOME: Final = "/proc/thread-self/ns/net"


@dataclass(slots=True)
class _Bound:
    ctx: int
    netns_fd: int | None
    """Held open so each command runs inside the namespace; None: the producer's own."""
    netns_id: tuple[int, int] | None
    """(st_dev, st_ino) of the namespace file when it was opened."""


class Session:
    """One libnftables context for one network namespace path (None: ours)."""

    def __init__(self, lib: Libnftables, netns: str | None) -> None:
        self._lib = lib
        self.netns = netns
        self._bound: _Bound | None = None

    def run(self, command: str) -> bytes:
        """Run ``command`` (e.g. ``list table inet t``) for JSON output.

        Call on :attr:`Libnftables.worker` only.
        """
        netns_id = None if self.netns is None else _identity(self.netns)
        if self._bound is None or self._bound.netns_id != netns_id:
            self._unbind()
            self._bound = self._bind()
        with self._lib.inside(self._bound.netns_fd, self.netns):
            return self._lib.run_command(self._bound.ctx, command)

    def free(self) -> None:
        """Close the context's socket (on the worker); the next :meth:`run` opens another."""
        with contextlib.suppress(RuntimeError):  # the worker is shut down at exit
            self._lib.worker.submit(self._unbind)

    def _bind(self) -> _Bound:
        if self.netns is None:
            return _Bound(self._lib.new_context(), None, None)
        try:
            fd = os.open(self.netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise Io(_PROBE, f"network namespace: {exc.strerror}", path=self.netns) from exc
        try:
            st = os.fstat(fd)
            with self._lib.inside(fd, self.netns):
                ctx = self._lib.new_context()
        except BaseException:
            os.close(fd)
            raise
        return _Bound(ctx, fd, (st.st_dev, st.st_ino))

    def _unbind(self) -> None:
        if self._bound is not None:
            self._lib.free_context(self._bound.ctx)
            if self._bound.netns_fd is not None:
                os.close(self._bound.netns_fd)
            self._bound = None


def _identity(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise Io(_PROBE, f"network namespace: {exc.strerror}", path=path) from exc
    return (st.st_dev, st.st_ino)


class Libnftables:
    """The loaded library, its worker thread, and the producer's own namespace."""

    def __init__(self, soname: str = _SONAME) -> None:
        if not sys.platform.startswith("linux"):
            raise PlatformUnsupported(_PROBE, f"nftables exists only on Linux, not {sys.platform}")
        try:
            lib = ctypes.CDLL(soname, use_errno=True)
            libc = ctypes.CDLL(None, use_errno=True)
        except OSError as exc:
            raise PlatformUnsupported(
                _PROBE, f"cannot load {soname} (Debian: apt-get install libnftables1): {exc}"
            ) from exc
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
        self._lib = lib
        self._libc = libc
        self.worker: Final = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="libnftables"
        )
        """Every library call runs here."""
        self._home: int | None = None  # the worker's own namespace, opened on first use
        self._lost = False

    def session(self, netns: str | None) -> Session:
        return Session(self, netns)

    # The methods below run on the worker thread only.

    @contextlib.contextmanager
    def inside(self, netns_fd: int | None, path: str | None) -> Iterator[None]:
        """Run the block with the worker thread in ``netns_fd`` (None: stay home).

        Needed for every command, not only for creating the context: libnftables names
        interfaces (``iif``, ``oif``) from an rtnetlink dump it makes in the calling
        thread's namespace, which must be the cell's for the names to be the cell's (and,
        on a host with hundreds of TAPs, to be cheap).
        """
        if self._lost:
            raise Io(_PROBE, "the libnftables worker could not return to its namespace")
        if netns_fd is None:
            yield
            return
        if self._home is None:
            self._home = os.open(_HOME, os.O_RDONLY | os.O_CLOEXEC)
        self._setns(netns_fd, path or "")
        try:
            yield
        finally:
            try:
                self._setns(self._home, _HOME)
            except Io:
                self._lost = True  # every later command would run in the wrong namespace
                raise

    def new_context(self) -> int:
        """A JSON-output context whose socket lives in the thread's current namespace."""
        ctx: int | None = self._lib.nft_ctx_new(_NFT_CTX_DEFAULT)
        if not ctx:
            raise Io(_PROBE, "nft_ctx_new failed")
        self._lib.nft_ctx_output_set_flags(ctx, _NFT_CTX_OUTPUT_JSON)
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)
        return ctx

    def run_command(self, ctx: int, command: str) -> bytes:
        lib = self._lib
        rc = lib.nft_run_cmd_from_buffer(ctx, command.encode())
        output: bytes = lib.nft_ctx_get_output_buffer(ctx) or b""
        errors: bytes = lib.nft_ctx_get_error_buffer(ctx) or b""
        if rc != 0:
            first = errors.decode(errors="replace").strip().splitlines()
            reason = first[0] if first else "libnftables failed without a message"
            raise Io(_PROBE, reason, command=command, returncode=rc)
        return output

    def free_context(self, ctx: int) -> None:
        self._lib.nft_ctx_free(ctx)

    def _setns(self, fd: int, path: str) -> None:
        if self._libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise Io(_PROBE, f"setns: {os.strerror(err)}", path=path)


_shared: Libnftables | None = None
_shared_lock = threading.Lock()


def shared() -> Libnftables:
    """The process's one :class:`Libnftables`, loaded on first use.

    Raises :class:`PlatformUnsupported` (every time) when the library cannot be loaded.
    """
    global _shared  # noqa: PLW0603 - one loaded C library and worker per process
    with _shared_lock:
        if _shared is None:
            _shared = Libnftables()
        return _shared
