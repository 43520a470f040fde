"""NetBSD's kernel as a test backend for perfused: a rump kernel in a process.

The rump kernel libraries (NetBSD's VFS, PUFFS and putter code built to run
inside a host process) give a real /dev/puffs, mount(2), page cache, name
cache and vnode life cycle.  A process can boot one rump kernel, once, so
each RumpKernel is a child process running this module as a script; the
caller drives it over a socket:

    kernel = RumpKernel()                   # boots NetBSD in a child process
    dev, dev_id = kernel.new_device()       # a host socket framed like /dev/puffs
    device = perfused.PuffsDevice(dev.fileno(), kernel.mounter(dev_id))
    ...perfused.serve_connection(sock, device=device)
    p = kernel.proc()                       # rump process 1; kernel.proc(uid=...) forks one
    fd = p.open("/mnt/f", O_RDWR | O_CREAT, 0o644)
    p.write(fd, b"data"); p.close(fd)
    kernel.report(dev_id)                   # rule breaks, kernel errors, requests unanswered

System calls take and return NetBSD numbers (open flags, errno, struct
stat); a failing call raises NetBSDError with the NetBSD errno.  Each rump
process is served by one thread of the child, so calls to different
processes run concurrently; a call that does not return within its timeout
raises KernelHang naming the PUFFS requests still unanswered, after the
devices were closed (which force-unmounts) so the kernel lets go.

The child bridges each /dev/puffs descriptor to one end of a host
SOCK_SEQPACKET socketpair (one frame per record) and records every frame
header both ways, to enforce the kernel's rules: one reply per non-FAF
request, replies within preq_buflen, no PUFFSOP_ERROR from the kernel.

The libraries are found at $RUMPLIB, else ../shared/rump/lib beside this
file's directory.  Used by test_perfused.py and by `make demo`.

One function of the rump kernel's own, not NetBSD's, is replaced: see
UNBUSY_SHIM.
"""

import ctypes
import hashlib
import os
import pickle
import queue
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LIBS = ("librumpuser.so", "librump.so", "librumpvfs.so", "librumpdev.so",
        "librumpdev_putter.so", "librumpfs_syspuffs.so", "librumpfs_tmpfs.so")


def library_dir():
    """Where the rump libraries are, or None."""
    for cand in (os.environ.get("RUMPLIB"),
                 os.path.join(HERE, "..", "shared", "rump", "lib")):
        if cand and all(os.path.exists(os.path.join(cand, n)) for n in LIBS):
            return os.path.abspath(cand)
    return None


# NetBSD numbers the callers use (sys/fcntl.h, sys/errno.h, sys/stat.h).
O_RDONLY, O_WRONLY, O_RDWR, O_NONBLOCK, O_APPEND = 0, 1, 2, 0x4, 0x8
O_CREAT, O_TRUNC, O_EXCL, O_DIRECTORY = 0x200, 0x400, 0x800, 0x200000
F_GETLK, F_SETLK, F_SETLKW = 7, 8, 9
F_RDLCK, F_UNLCK, F_WRLCK = 1, 2, 3
LOCK_SH, LOCK_EX, LOCK_NB, LOCK_UN = 1, 2, 4, 8
AT_FDCWD, UTIME_NOW, UTIME_OMIT = -100, (1 << 30) - 1, (1 << 30) - 2
EXTATTR_NAMESPACE_USER = 1
XATTR_CREATE, XATTR_REPLACE = 1, 2
MNT_FORCE = 0x80000
ERRNO = dict(EPERM=1, ENOENT=2, EIO=5, ENXIO=6, EBADF=9, EAGAIN=35, EACCES=13,
             EBUSY=16, EEXIST=17, EXDEV=18, ENOTDIR=20, EISDIR=21, EINVAL=22,
             ENOSPC=28, ERANGE=34, EOPNOTSUPP=45, ENAMETOOLONG=63, ENOTEMPTY=66,
             ESTALE=70, ENOSYS=78, ENODATA=89, ENOATTR=93, EPROTO=96)
ERRNO_NAMES = {v: k for k, v in ERRNO.items()}
PUFFS_OPNAMES = {
    (2, 0): "LOOKUP", (2, 1): "CREATE", (2, 2): "MKNOD", (2, 3): "OPEN", (2, 4): "CLOSE",
    (2, 5): "ACCESS", (2, 6): "GETATTR", (2, 7): "SETATTR", (2, 8): "READ",
    (2, 9): "WRITE", (2, 12): "POLL", (2, 15): "MMAP", (2, 16): "FSYNC", (2, 17): "SEEK",
    (2, 18): "REMOVE", (2, 19): "LINK", (2, 20): "RENAME", (2, 21): "MKDIR",
    (2, 22): "RMDIR", (2, 23): "SYMLINK", (2, 24): "READDIR", (2, 25): "READLINK",
    (2, 26): "ABORTOP", (2, 27): "INACTIVE", (2, 28): "RECLAIM", (2, 35): "PATHCONF",
    (2, 36): "ADVLOCK", (2, 41): "GETEXTATTR", (2, 42): "LISTEXTATTR",
    (2, 44): "DELETEEXTATTR", (2, 45): "SETEXTATTR", (2, 47): "FALLOCATE",
    (2, 48): "FDISCARD", (1, 2): "VFS_UNMOUNT", (1, 5): "VFS_STATVFS", (1, 6): "VFS_SYNC",
    (5, 0): "FLUSH", (7, 0): "UNMOUNT", (4, 0): "ERROR",
}


class NetBSDError(OSError):
    """A system call failed; errno is NetBSD's number."""

    def __str__(self):
        return "[%s] %s" % (ERRNO_NAMES.get(self.errno, self.errno), self.strerror or "")


class KernelHang(AssertionError):
    """A system call did not return in time; says what the kernel waited on."""


# ---------------------------------------------------------------------------
# The child: boots the kernel, runs system calls, bridges devices
# ---------------------------------------------------------------------------

c = ctypes


class Timespec(c.Structure):
    _fields_ = [("tv_sec", c.c_int64), ("tv_nsec", c.c_long)]


class Stat(c.Structure):                 # NetBSD struct stat (152 bytes on amd64)
    _fields_ = [("st_dev", c.c_uint64), ("st_mode", c.c_uint32), ("st_ino", c.c_uint64),
                ("st_nlink", c.c_uint32), ("st_uid", c.c_uint32), ("st_gid", c.c_uint32),
                ("st_rdev", c.c_uint64), ("st_atim", Timespec), ("st_mtim", Timespec),
                ("st_ctim", Timespec), ("st_birthtim", Timespec), ("st_size", c.c_int64),
                ("st_blocks", c.c_int64), ("st_blksize", c.c_uint32),
                ("st_flags", c.c_uint32), ("st_gen", c.c_uint32),
                ("st_spare", c.c_uint32 * 2)]


class Statvfs(c.Structure):              # the fields tests read, then padding
    _fields_ = [("f_flag", c.c_ulong), ("f_bsize", c.c_ulong), ("f_frsize", c.c_ulong),
                ("f_iosize", c.c_ulong), ("f_blocks", c.c_uint64), ("f_bfree", c.c_uint64),
                ("f_bavail", c.c_uint64), ("f_bresvd", c.c_uint64), ("f_files", c.c_uint64),
                ("f_ffree", c.c_uint64), ("f_favail", c.c_uint64), ("f_fresvd", c.c_uint64),
                ("f_stats", c.c_uint64 * 4), ("f_fsidx", c.c_int32 * 2), ("f_fsid", c.c_ulong),
                ("f_namemax", c.c_ulong), ("f_owner", c.c_uint32), ("f_spare", c.c_uint32 * 4),
                ("f_fstypename", c.c_char * 32), ("f_mntonname", c.c_char * 1024),
                ("f_mntfromname", c.c_char * 1024), ("f_mntfromlabel", c.c_char * 1024)]


class Flock(c.Structure):
    _fields_ = [("l_start", c.c_int64), ("l_len", c.c_int64), ("l_pid", c.c_int32),
                ("l_type", c.c_short), ("l_whence", c.c_short)]


class Timeval(c.Structure):
    _fields_ = [("tv_sec", c.c_int64), ("tv_usec", c.c_int)]


class PollFd(c.Structure):
    _fields_ = [("fd", c.c_int), ("events", c.c_short), ("revents", c.c_short)]


# struct puffs_req in the host C ABI: framelen, id, cookie, opclass, optype,
# rv, setbacks, pid, lid, buflen
PUFFS_REQ = struct.Struct("@QQPHHiIiiN")
PUFFS_REQ_SIZE = PUFFS_REQ.size + (-PUFFS_REQ.size % struct.calcsize("@Q"))
FAF, ISRESPONSE, OPCMASK, OP_ERROR = 0x10, 0x20, 0x7, 4
DIRENT = struct.Struct("=QHHB")
STR, INT, UINT, SIZE, OFF, PTR = c.c_char_p, c.c_int, c.c_uint, c.c_size_t, c.c_int64, c.c_void_p
SYSCALLS = {           # name: (symbol, argument types, result type)
    "open": ("open", (STR, INT, INT), INT), "close": ("close", (INT,), INT),
    "read": ("read", (INT, PTR, SIZE), c.c_ssize_t),
    "write": ("write", (INT, PTR, SIZE), c.c_ssize_t),
    "pread": ("pread", (INT, PTR, SIZE, OFF), c.c_ssize_t),
    "pwrite": ("pwrite", (INT, PTR, SIZE, OFF), c.c_ssize_t),
    "lseek": ("lseek", (INT, OFF, INT), OFF),
    "stat": ("stat50", (STR, PTR), INT), "lstat": ("lstat50", (STR, PTR), INT),
    "fstat": ("fstat50", (INT, PTR), INT),
    "mkdir": ("mkdir", (STR, UINT), INT), "rmdir": ("rmdir", (STR,), INT),
    "unlink": ("unlink", (STR,), INT), "rename": ("rename", (STR, STR), INT),
    "link": ("link", (STR, STR), INT), "symlink": ("symlink", (STR, STR), INT),
    "readlink": ("readlink", (STR, PTR, SIZE), c.c_ssize_t),
    "mknod": ("mknod50", (STR, UINT, c.c_uint64), INT), "mkfifo": ("mkfifo", (STR, UINT), INT),
    "chmod": ("chmod", (STR, UINT), INT), "fchmod": ("fchmod", (INT, UINT), INT),
    "chown": ("chown", (STR, UINT, UINT), INT), "lchown": ("lchown", (STR, UINT, UINT), INT),
    "fchown": ("fchown", (INT, UINT, UINT), INT),
    "utimes": ("utimes50", (STR, PTR), INT),
    "utimensat": ("utimensat", (INT, STR, PTR, INT), INT),
    "futimens": ("futimens", (INT, PTR), INT),
    "truncate": ("truncate", (STR, OFF), INT), "ftruncate": ("ftruncate", (INT, OFF), INT),
    "fsync": ("fsync", (INT,), INT), "fsync_range": ("fsync_range", (INT, INT, OFF, OFF), INT),
    "getdents": ("getdents30", (INT, PTR, SIZE), INT),
    "statvfs1": ("statvfs1", (STR, PTR, INT), INT),
    "extattr_get_file": ("extattr_get_file", (STR, INT, STR, PTR, SIZE), c.c_ssize_t),
    "extattr_set_file": ("extattr_set_file", (STR, INT, STR, PTR, SIZE), INT),
    "extattr_list_file": ("extattr_list_file", (STR, INT, PTR, SIZE), c.c_ssize_t),
    "extattr_delete_file": ("extattr_delete_file", (STR, INT, STR), INT),
    "getxattr": ("getxattr", (STR, STR, PTR, SIZE), INT),
    "setxattr": ("setxattr", (STR, STR, PTR, SIZE, INT), INT),
    "listxattr": ("listxattr", (STR, PTR, SIZE), INT),
    "removexattr": ("removexattr", (STR, STR), INT),
    "fcntl": ("fcntl", (INT, INT, PTR), INT), "flock": ("flock", (INT, INT), INT),
    "chdir": ("chdir", (STR,), INT), "getcwd": ("__getcwd", (PTR, SIZE), INT),
    "unmount": ("unmount", (STR, INT), INT),
    "mount": ("mount50", (STR, STR, INT, PTR, SIZE), INT),
    "setuid": ("setuid", (UINT,), INT), "setgid": ("setgid", (UINT,), INT),
    "access": ("access", (STR, INT), INT),
    "fdiscard": ("fdiscard", (INT, OFF, OFF), INT),
    "posix_fallocate": ("posix_fallocate", (INT, OFF, OFF), INT),
    "poll": ("poll", (PTR, UINT, INT), INT),
}


def _path(p):
    return os.fsencode(p)


# The rump kernel's uvm_page_unbusy (sys/rump/librump/rumpkern/vm.c, its
# stand-in for NetBSD's uvm) asserts on pgs[0]->uobject before the loop that
# skips NULL pages: a read-ahead that found every page of its range busy
# with another reader (genfs_getpages' way out) crashed the kernel's process
# under load.  NetBSD's own uvm_page_unbusy skips NULL pages; so does this,
# loaded ahead of the libraries so that they call it.
UNBUSY_SHIM = r"""
#include <stddef.h>
struct vm_page;
static void (*rump_unbusy)(struct vm_page **, int);
void shim_unbusy_calls(void (*fn)(struct vm_page **, int)) { rump_unbusy = fn; }
void rumpns_uvm_page_unbusy(struct vm_page **pgs, int npgs)
{
	while (npgs > 0 && pgs[0] == NULL) {
		pgs++;
		npgs--;
	}
	if (npgs > 0)
		rump_unbusy(pgs, npgs);
}
"""


def unbusy_shim():
    """The shim built (once per content, in the temporary directory), or
    None without a C compiler."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    tag = hashlib.sha256(UNBUSY_SHIM.encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), "perfused-rump-unbusy-%d-%s.so" % (
        os.getuid(), tag))
    if not os.path.exists(path):
        work = path[:-3] + ".%d" % os.getpid()      # kernels booting at once
        with open(work + ".c", "w") as f:
            f.write(UNBUSY_SHIM)
        try:
            subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", work + ".so", work + ".c"],
                           check=True, capture_output=True)
            os.replace(work + ".so", path)
        finally:
            os.unlink(work + ".c")
    return path


class Kernel:
    """The booted rump kernel, in the child: system calls as Python calls."""

    def __init__(self, libdir):
        shim_path = unbusy_shim()
        shim = shim_path and c.CDLL(shim_path, mode=c.RTLD_GLOBAL)
        self.libs = [c.CDLL(os.path.join(libdir, n), mode=c.RTLD_GLOBAL, use_errno=True)
                     for n in LIBS]
        self.rump = self.libs[1]
        if shim:        # the rump kernel's own, found in librump itself
            shim.shim_unbusy_calls(c.cast(self.rump.rumpns_uvm_page_unbusy, c.c_void_p))
        else:
            print("rumpkernel: no C compiler: uvm_page_unbusy left as it is", file=sys.stderr)
        if self.rump.rump_init() != 0:
            raise SystemExit("rump_init failed")
        self.fns = {}
        for name, (symbol, args, res) in SYSCALLS.items():
            fn = getattr(self.rump, "rump___sysimpl_" + symbol)
            fn.argtypes, fn.restype = args, res
            self.fns[name] = fn

    def sys(self, name, *args):
        c.set_errno(0)
        rv = self.fns[name](*args)
        if rv == -1:
            err = c.get_errno()
            raise NetBSDError(err, "%s: %s" % (name, ERRNO_NAMES.get(err, err)))
        return rv

    # --- calls with structures, in and out ---------------------------------

    def open(self, path, flags, mode=0o644):
        return self.sys("open", _path(path), flags, mode)

    def read(self, fd, n):
        buf = c.create_string_buffer(max(n, 1))
        got = self.sys("read", fd, buf, n)
        return buf.raw[:got]

    def pread(self, fd, n, off):
        buf = c.create_string_buffer(max(n, 1))
        got = self.sys("pread", fd, buf, n, off)
        return buf.raw[:got]

    def write(self, fd, data):
        return self.sys("write", fd, bytes(data), len(data))

    def pwrite(self, fd, data, off):
        return self.sys("pwrite", fd, bytes(data), len(data), off)

    def _stat(self, name, arg):
        st = Stat()
        self.sys(name, arg, c.byref(st))
        return {f: (getattr(st, f).tv_sec, getattr(st, f).tv_nsec) if f.endswith("tim")
                else getattr(st, f) for f, _ in Stat._fields_ if f != "st_spare"}

    def stat(self, path):
        return self._stat("stat", _path(path))

    def lstat(self, path):
        return self._stat("lstat", _path(path))

    def fstat(self, fd):
        return self._stat("fstat", fd)

    def readlink(self, path):
        buf = c.create_string_buffer(1025)
        got = self.sys("readlink", _path(path), buf, 1024)
        return os.fsdecode(buf.raw[:got])

    def getdents(self, fd, size=4096):
        """One getdents(2): [(fileno, d_type, name)]."""
        buf = c.create_string_buffer(size)
        n = self.sys("getdents", fd, buf, size)
        raw, out, pos = buf.raw[:n], [], 0
        while pos < n:
            fileno, reclen, namlen, dtype = DIRENT.unpack_from(raw, pos)
            if reclen == 0:
                raise NetBSDError(ERRNO["EIO"], "dirent with d_reclen 0")
            out.append((fileno, dtype, os.fsdecode(raw[pos + 13:pos + 13 + namlen])))
            pos += reclen
        return out

    def listdir(self, path, size=4096):
        """Every entry of a directory, read with getdents buffers of size."""
        fd = self.open(path, O_RDONLY | O_DIRECTORY)
        try:
            out = []
            while True:
                got = self.getdents(fd, size)
                if not got:
                    return out
                out += got
        finally:
            self.sys("close", fd)

    def readfile(self, path, chunk=65536):
        fd = self.open(path, O_RDONLY)
        try:
            parts = []
            while True:
                part = self.read(fd, chunk)
                if not part:
                    return b"".join(parts)
                parts.append(part)
        finally:
            self.sys("close", fd)

    def writefile(self, path, data, flags=O_WRONLY | O_CREAT | O_TRUNC, mode=0o644,
                  chunk=65536):
        fd = self.open(path, flags, mode)
        try:
            for pos in range(0, len(data), chunk):
                self.write(fd, data[pos:pos + chunk])
        finally:
            self.sys("close", fd)

    def getcwd(self):
        buf = c.create_string_buffer(1024)
        self.sys("getcwd", buf, 1024)
        return os.fsdecode(buf.value)

    def utimes(self, path, times=None):
        """times: ((atime sec, usec), (mtime sec, usec)) or None for now."""
        if times is None:
            return self.sys("utimes", _path(path), None)
        tv = (Timeval * 2)(Timeval(*times[0]), Timeval(*times[1]))
        return self.sys("utimes", _path(path), tv)

    def utimensat(self, path, times, flag=0):
        """times: ((sec, nsec), (sec, nsec)) with UTIME_NOW/UTIME_OMIT as
        nsec, or None."""
        ts = None if times is None else (Timespec * 2)(Timespec(*times[0]), Timespec(*times[1]))
        return self.sys("utimensat", AT_FDCWD, _path(path), ts, flag)

    def statvfs(self, path):
        sv = Statvfs()
        self.sys("statvfs1", _path(path), c.byref(sv), 1)
        return {f: getattr(sv, f) for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree",
                                            "f_bavail", "f_files", "f_ffree", "f_namemax",
                                            "f_owner", "f_flag", "f_fstypename",
                                            "f_mntfromname", "f_mntonname")}

    def extattr_get(self, path, name, size=65536, ns=EXTATTR_NAMESPACE_USER):
        buf = c.create_string_buffer(max(size, 1))
        n = self.sys("extattr_get_file", _path(path), ns, name.encode(),
                     buf if size else None, size)
        return buf.raw[:n] if size else n

    def extattr_set(self, path, name, value, ns=EXTATTR_NAMESPACE_USER):
        return self.sys("extattr_set_file", _path(path), ns, name.encode(), value, len(value))

    def extattr_list(self, path, ns=EXTATTR_NAMESPACE_USER):
        """Names from extattr_list_file(2) (length-prefixed in NetBSD)."""
        n = self.sys("extattr_list_file", _path(path), ns, None, 0)
        buf = c.create_string_buffer(max(n, 1))
        n = self.sys("extattr_list_file", _path(path), ns, buf, n)
        raw, out, pos = buf.raw[:n], [], 0
        while pos < len(raw):
            out.append(raw[pos + 1:pos + 1 + raw[pos]].decode())
            pos += 1 + raw[pos]
        return sorted(out)

    def extattr_delete(self, path, name, ns=EXTATTR_NAMESPACE_USER):
        return self.sys("extattr_delete_file", _path(path), ns, name.encode())

    def getxattr(self, path, name, size=65536):
        buf = c.create_string_buffer(max(size, 1))
        got = self.sys("getxattr", _path(path), name.encode(), buf, size)
        return buf.raw[:got]

    def setxattr(self, path, name, value, flags=0):
        return self.sys("setxattr", _path(path), name.encode(), value, len(value), flags)

    def listxattr(self, path):
        buf = c.create_string_buffer(65536)
        n = self.sys("listxattr", _path(path), buf, 65536)
        return sorted(x.decode() for x in buf.raw[:n].split(b"\0") if x)

    def removexattr(self, path, name):
        return self.sys("removexattr", _path(path), name.encode())

    def lock(self, fd, cmd, ltype, start=0, length=0, whence=0):
        """fcntl(2) locks: returns (l_type, l_start, l_len, l_pid) afterwards."""
        fl = Flock(start, length, 0, ltype, whence)
        self.sys("fcntl", fd, cmd, c.byref(fl))
        return (fl.l_type, fl.l_start, fl.l_len, fl.l_pid)

    def poll(self, fd, events, timeout=0):
        pfd = PollFd(fd, events, 0)
        self.sys("poll", c.byref(pfd), 1, timeout)
        return pfd.revents

    def mount_puffs(self, target, flags, kargs, bridge):
        buf = bytearray(kargs)
        struct.pack_into("@i", buf, struct.calcsize("@I"), bridge.fd)    # pa_fd
        cbuf = (c.c_char * len(buf)).from_buffer(buf)
        self.sys("mount", b"puffs", _path(target), flags, cbuf, len(buf))
        bridge.start()

    def __getattr__(self, name):
        if name in SYSCALLS:
            def call(*args):
                return self.sys(name, *[_path(a) if isinstance(a, str) else a for a in args])
            return call
        raise AttributeError(name)


class Bridge:
    """One /dev/puffs descriptor <-> one host SOCK_SEQPACKET socket, with
    every frame's header recorded and the kernel's rules checked."""

    READ_SIZE = 4 * 1024 * 1024 + 4096

    def __init__(self, kernel, ident, comfd=False):
        self.kernel, self.ident = kernel, ident
        self.comfd = comfd     # the first record is libpuffs' PUFFS_COMFD mount request
        # Non-blocking: a read blocked in the kernel's getout holds a
        # reference on the mount, which unmount waits for forever (puffs_userdead
        # does not wake it); the reader polls instead.
        self.fd = kernel.open("/dev/puffs", O_RDWR | O_NONBLOCK)
        self.host, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.host, self.peer):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.lock = threading.Lock()
        self.pending = {}      # id -> (name, buflen, since) of kernel requests unanswered
        self.ours = {}         # id -> name of the file server's requests to the kernel
        self.violations = []   # rule breaks seen, as text
        self.errors = []       # PUFFSOP_ERROR reports from the kernel
        self.counts = {}       # op name -> requests seen
        self.closed = False
        self.mounted = False
        self.writing = None    # (since, id) while a frame is being written to the kernel
        # the kernel side is read only once mounted: before, putter says ENOENT
        threading.Thread(target=self._host_to_kernel, daemon=True).start()

    def start(self):
        self.mounted = True
        threading.Thread(target=self._kernel_to_host, daemon=True).start()

    def _kernel_to_host(self):
        buf = c.create_string_buffer(self.READ_SIZE)
        pfd = PollFd(self.fd, 1, 0)
        while not self.closed:
            try:
                if self.kernel.sys("poll", c.byref(pfd), 1, 200) == 0:
                    continue
                n = self.kernel.sys("read", self.fd, buf, self.READ_SIZE)
            except NetBSDError as e:
                if e.errno == ERRNO["EAGAIN"]:
                    continue
                break
            frame = buf.raw[:n]
            self._seen_from_kernel(frame)
            try:
                self.peer.send(frame)
            except OSError:
                break
        try:     # the file server sees the end of the device, as on NetBSD
            self.peer.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _host_to_kernel(self):
        while True:
            try:
                frame = self.peer.recv(self.READ_SIZE)
            except OSError:
                break
            if not frame:
                break
            if self.comfd and not self.mounted:
                self._comfd_mount(frame)
                continue
            self.writing = (time.monotonic(), self._seen_from_server(frame))
            try:
                self.kernel.sys("write", self.fd, frame, len(frame))
            except NetBSDError as e:
                with self.lock:
                    self.violations.append("kernel refused a %d-byte frame: %s" % (len(frame), e))
            self.writing = None
        # The file server's end closed (it exited, or was killed): NetBSD
        # closes a dead process's /dev/puffs, which fails whatever waits
        # and force-unmounts.
        self.close()

    def _comfd_mount(self, record):
        """size_t length + target, size_t length + mntfromname, int flags,
        size_t length + struct puffs_kargs: mount there, creating the
        directory path in the kernel's name space first."""
        size = struct.Struct("@N")
        n = size.unpack_from(record)[0]
        target = record[size.size:size.size + n].rstrip(b"\0")
        pos = size.size + n
        pos += size.size + size.unpack_from(record, pos)[0]
        flags = struct.unpack_from("@i", record, pos)[0]
        pos += struct.calcsize("@i")
        n = size.unpack_from(record, pos)[0]
        kargs = record[pos + size.size:pos + size.size + n]
        path = b""
        for part in target.split(b"/")[1:]:
            path += b"/" + part
            try:
                self.kernel.sys("mkdir", path, 0o755)
            except NetBSDError:
                pass
        try:
            self.kernel.mount_puffs(target, flags, kargs, self)
        except NetBSDError as e:
            with self.lock:
                self.violations.append("PUFFS_COMFD mount of %r failed: %s" % (target, e))
            self.peer.close()

    def _header(self, frame, sender):
        """The frame's struct puffs_req fields, or None (a rule broken)."""
        if len(frame) >= PUFFS_REQ_SIZE:
            return PUFFS_REQ.unpack_from(frame)
        with self.lock:
            self.violations.append("%s frame of %d bytes" % (sender, len(frame)))
        return None

    def _seen_from_kernel(self, frame):
        header = self._header(frame, "kernel")
        if header is None:
            return
        _, rid, _, opclass, optype, rv, _, _, _, buflen = header
        cls = opclass & OPCMASK
        with self.lock:
            if opclass & ISRESPONSE:
                self.ours.pop(rid, None)
                return
            name = PUFFS_OPNAMES.get((cls, optype if cls in (1, 2) else 0), "%d/%d" % (cls, optype))
            self.counts[name] = self.counts.get(name, 0) + 1
            if cls == OP_ERROR:
                text = frame[PUFFS_REQ_SIZE + 4:PUFFS_REQ_SIZE + 260].split(b"\0")[0]
                self.errors.append("PUFFS_ERR type %d errno %d: %s" % (
                    optype, struct.unpack_from("@i", frame, PUFFS_REQ_SIZE)[0],
                    text.decode(errors="replace")))
            elif not opclass & FAF:
                self.pending[rid] = (name, buflen, time.monotonic())

    def _seen_from_server(self, frame):
        """The frame's id, after checking it against the requests waiting."""
        header = self._header(frame, "file server")
        if header is None:
            return None
        self._check_from_server(frame, header)
        return header[1]

    def _check_from_server(self, frame, header):
        framelen, rid, _, opclass, optype, rv, _, _, _, _ = header
        with self.lock:
            if not opclass & ISRESPONSE:
                self.ours[rid] = PUFFS_OPNAMES.get((opclass & OPCMASK, 0), str(opclass))
                return
            got = self.pending.pop(rid, None)
            if got is None:
                self.violations.append("reply to id %#x, which is not waiting" % rid)
                return
            name, buflen, _ = got
            if framelen != len(frame):
                self.violations.append("%s reply says %d bytes, is %d" % (name, framelen, len(frame)))
            if len(frame) > buflen:
                self.violations.append("%s reply of %d bytes exceeds preq_buflen %d" % (
                    name, len(frame), buflen))
            if not 0 <= rv <= 96:
                self.violations.append("%s reply with rv %d" % (name, rv))

    def report(self):
        now = time.monotonic()
        writing = self.writing
        with self.lock:
            return dict(violations=list(self.violations), errors=list(self.errors),
                        pending=["%s (id %#x, %.1f s)" % (n, i, now - t)
                                 for i, (n, _, t) in sorted(self.pending.items())],
                        owed=sorted(self.ours.values()),   # our FLUSH/UNMOUNT unanswered
                        counts=dict(self.counts), closed=self.closed, mounted=self.mounted,
                        writing=writing and "frame of id %r, for %.1f s" % (
                            writing[1], now - writing[0]))

    def close(self):
        if not self.closed:
            self.closed = True
            try:
                self.kernel.sys("close", self.fd)
            except NetBSDError:
                pass
            if not self.mounted:
                self.peer.shutdown(socket.SHUT_RDWR)


class Process:
    """A rump process and the host thread that makes its system calls."""

    def __init__(self, kernel, reply, uid=None, gid=None):
        self.kernel, self.reply = kernel, reply
        self.calls = queue.Queue()
        ready = threading.Event()
        self.failure = None
        threading.Thread(target=self._run, args=(uid, gid, ready), daemon=True).start()
        ready.wait()
        if self.failure:
            raise self.failure

    def _run(self, uid, gid, ready):
        if uid is not None:
            try:
                if self.kernel.rump.rump_pub_lwproc_rfork(0x02) != 0:     # RUMP_RFCFDG
                    raise NetBSDError(ERRNO["EIO"], "rump_pub_lwproc_rfork failed")
                self.kernel.sys("setgid", gid if gid is not None else uid)
                self.kernel.sys("setuid", uid)
            except NetBSDError as e:
                self.failure = e
        ready.set()
        while True:
            item = self.calls.get()
            if item is None:
                if uid is not None:
                    self.kernel.rump.rump_pub_lwproc_releaselwp()
                return
            tag, method, args, kwargs = item
            try:
                self.reply(tag, True, getattr(self.kernel, method)(*args, **kwargs))
            except NetBSDError as e:
                self.reply(tag, False, (e.errno, e.strerror))
            except Exception as e:     # a harness bug: the caller sees it
                self.reply(tag, False, (-1, "%s: %s" % (type(e).__name__, e)))


def child(control_fd, libdir):
    """The child process: serve the control socket until it closes."""
    ctl = socket.socket(fileno=control_fd)
    kernel = Kernel(libdir)
    send_lock = threading.Lock()

    def reply(tag, ok, value, fds=()):
        data = pickle.dumps((tag, ok, value))
        with send_lock:
            socket.send_fds(ctl, [struct.pack("=I", len(data)) + data], list(fds))

    procs = {0: Process(kernel, reply)}
    bridges = {}
    reader = ctl.makefile("rb")
    reply(0, True, os.getpid())
    while True:
        head = reader.read(4)
        if len(head) < 4:
            break
        tag, proc, method, args, kwargs = pickle.loads(reader.read(struct.unpack("=I", head)[0]))
        try:
            if method == "new_device":
                bridge = Bridge(kernel, len(bridges) + 1, *args)
                bridges[bridge.ident] = bridge
                reply(tag, True, bridge.ident, [bridge.host.fileno()])
                bridge.host.close()
            elif method == "new_proc":
                ident = max(procs) + 1
                procs[ident] = Process(kernel, reply, *args)
                reply(tag, True, ident)
            elif method == "end_proc":
                procs.pop(args[0]).calls.put(None)
                reply(tag, True, None)
            elif method == "report":
                reply(tag, True, bridges[args[0]].report())
            elif method == "close_device":
                # in a thread: a close the kernel blocks (a deadlocked
                # unmount) must not stop this loop answering
                def close(tag=tag, idents=args or list(bridges)):
                    for ident in idents:
                        bridges[ident].close()
                    reply(tag, True, None)
                threading.Thread(target=close, daemon=True).start()
            elif method == "mount_puffs":
                target, flags, kargs, ident = args
                procs[proc].calls.put((tag, "mount_puffs", (target, flags, kargs,
                                                            bridges[ident]), {}))
            else:
                procs[proc].calls.put((tag, method, args, kwargs))
        except NetBSDError as e:
            reply(tag, False, (e.errno, e.strerror))
    os._exit(0)         # the kernel goes with the process: nothing to tidy


# ---------------------------------------------------------------------------
# The caller's side
# ---------------------------------------------------------------------------

class RumpKernel:
    """A NetBSD kernel in a child process (see the module docstring)."""

    def __init__(self, libdir=None, timeout=60.0, python=None):
        libdir = libdir or library_dir()
        if libdir is None:
            raise FileNotFoundError("rump kernel libraries not found ($RUMPLIB)")
        self.timeout = timeout
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.proc_handle = subprocess.Popen(
            [python or sys.executable, os.path.abspath(__file__), str(theirs.fileno()), libdir],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            start_new_session=True)
        theirs.close()
        self.sock = ours
        self.lock = threading.Lock()
        self.waiting = {}              # tag -> [Event, result]
        self.tag = 0
        self.devices = []
        self.dead = None
        self.fds = []                  # descriptors received, for new_device replies
        self.waiting[0] = [threading.Event(), None]    # the child's "booted"
        threading.Thread(target=self._receive, daemon=True).start()
        self.pid = self._call(0, "boot", (), wait_tag=0)

    def _receive(self):
        buf = b""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 16)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            self.fds += fds
            while len(buf) >= 4:
                n = struct.unpack_from("=I", buf)[0]
                if len(buf) < 4 + n:
                    break
                tag, ok, value = pickle.loads(buf[4:4 + n])
                buf = buf[4 + n:]
                with self.lock:
                    slot = self.waiting.get(tag)
                if slot is not None:
                    slot[1] = (ok, value)
                    slot[0].set()
        self.dead = "the rump kernel process ended"
        with self.lock:
            for slot in self.waiting.values():
                slot[0].set()

    def _call(self, proc, method, args, timeout=None, wait_tag=None, kwargs=None,
              diagnose=True):
        """diagnose: on a timeout, name the requests the kernel waits for and
        close the devices (not for the calls doing that: the control thread
        itself may be what is stuck)."""
        with self.lock:
            if wait_tag is None:
                self.tag += 1
                tag = self.tag
                slot = self.waiting[tag] = [threading.Event(), None]
                data = pickle.dumps((tag, proc, method, args, kwargs or {}))
                self.sock.sendall(struct.pack("=I", len(data)) + data)
            else:
                tag, slot = wait_tag, self.waiting[wait_tag]
        event = slot[0]
        if not event.wait(timeout or self.timeout):
            pending = "not asked"
            if diagnose:
                pending = self.pending_requests()
                self.close_devices()
            raise KernelHang("%s%r did not return in %g s; kernel requests unanswered: %s" % (
                method, args[:2], timeout or self.timeout, pending or "none"))
        with self.lock:
            del self.waiting[tag]
        if slot[1] is None:
            raise KernelHang("%s: %s" % (method, self.dead))
        ok, value = slot[1]
        if not ok:
            err, text = value
            if err == -1:
                raise RuntimeError(text)
            raise NetBSDError(err, text)
        return value

    def proc(self, uid=None, gid=None):
        """Rump process 1 (uid None), or a new process with that uid/gid."""
        if uid is None:
            return ProcessHandle(self, 0)
        return ProcessHandle(self, self._call(0, "new_proc", (uid, gid)))

    def new_device(self, comfd=False):
        """(host socket framed like /dev/puffs, device id).  comfd: the
        file server mounts by writing libpuffs' PUFFS_COMFD request (as
        `perfused -i` with PUFFS_COMFD does) instead of calling mounter()."""
        ident = self._call(0, "new_device", (comfd,))
        with self.lock:     # its descriptor came with the reply, and is the oldest unclaimed
            sock = socket.socket(fileno=self.fds.pop(0))
        self.devices.append(ident)
        return sock, ident

    def mounter(self, ident, proc=0):
        """A PuffsDevice `mount` callable performing mount(2) in the kernel."""
        def mount(target, flags, kargs):
            self._call(proc, "mount_puffs", (target, flags, bytes(kargs), ident))
        return mount

    def report(self, ident):
        return self._call(0, "report", (ident,), timeout=10, diagnose=False)

    def pending_requests(self):
        out = []
        for ident in self.devices:
            try:
                report = self._call(0, "report", (ident,), timeout=5, diagnose=False)
            except (KernelHang, NetBSDError):
                continue
            out += report["pending"]
            if report["writing"]:
                out.append("the kernel has not taken the %s" % report["writing"])
        return out

    def close_devices(self, *idents):
        """Close /dev/puffs descriptors: force-unmounts what they serve."""
        try:
            self._call(0, "close_device", idents, timeout=10, diagnose=False)
        except KernelHang:
            pass

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)     # wakes our receiver, ends the child
            self.sock.close()
        except OSError:
            pass
        try:
            self.proc_handle.wait(10)
        except subprocess.TimeoutExpired:
            self.proc_handle.kill()
            self.proc_handle.wait(10)


class ProcessHandle:
    """System calls of one rump process: p.open(...), p.stat(...)."""

    def __init__(self, kernel, ident):  # the handle
        self.kernel, self.ident = kernel, ident

    def __getattr__(self, method):
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args, timeout=None, **kwargs):
            return self.kernel._call(self.ident, method, args, timeout, kwargs=kwargs)
        call.__name__ = method
        return call

    def end(self):
        if self.ident:
            self.kernel._call(0, "end_proc", (self.ident,))


if __name__ == "__main__":
    child(int(sys.argv[1]), sys.argv[2])
