#!/usr/bin/env python3
"""libperfuse.py -- reach perfused from a FUSE file system.

Wire-compatible with NetBSD's C libperfuse: the mount request sent here is
byte for byte struct perfuse_mount_out followed by its strings, so a daemon
using this module can talk to NetBSD's own perfused, and C daemons linked
with NetBSD's libperfuse can talk to perfused.py.

Three ways in:

  import libperfuse                       # a Python file system
  with libperfuse.connect("/mnt/x", fstype="myfs") as chan:
      ... speak FUSE on chan (a socket), starting with FUSE_INIT ...

  python3 libperfuse.py [-o opts] [-t fstype] [-s source] MOUNTPOINT -- \\
      DAEMON ARGS...                      # ARGS may contain /dev/fd/%d

  fusermount / fusermount3 stand-in       # for libfuse2 daemons: see usage()

Module layout: constants and the mount request -> perfuse_open /
perfuse_mount (the C API) -> connect() (the Pythonic layer) -> the
fusermount stand-in -> the launcher command line.
"""

import ctypes
import errno
import hashlib
import logging
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys

__all__ = ["perfuse_open", "perfuse_mount", "mount_request", "connect",
           "PerfuseChannel", "main"]

LOG = logging.getLogger("libperfuse")
_PATH_FUSE = "/dev/fuse"
PERFUSE_MOUNT_MAGIC = b"noFuseRq"


class PerfuseMountOut(ctypes.Structure):
    """struct perfuse_mount_out (lib/libperfuse/perfuse_if.h) in the host's
    C layout (56 bytes on LP64 ports, 52 on i386), as NetBSD's C libperfuse
    sends it: unique -1, the magic, the lengths (strlen + 1, or 0 when
    absent) of the strings that follow.  perfused.py has the same
    definition; a test holds them equal."""
    _fields_ = [("pmo_len", ctypes.c_uint32), ("pmo_error", ctypes.c_int32),
                ("pmo_unique", ctypes.c_uint64), ("pmo_magic", ctypes.c_char * 9),
                ("pmo_source_len", ctypes.c_uint32), ("pmo_target_len", ctypes.c_uint32),
                ("pmo_filesystemtype_len", ctypes.c_uint32), ("pmo_mountflags", ctypes.c_uint32),
                ("pmo_data_len", ctypes.c_uint32), ("pmo_sock_len", ctypes.c_uint32)]

SOL_LOCAL, LOCAL_CREDS = 0, 4            # NetBSD sys/un.h
IS_NETBSD = sys.platform.startswith("netbsd")


def socket_path():
    """Where perfused listens: $PERFUSE_SOCKET (unset or empty: /dev/fuse),
    as perfused.socket_path()."""
    return os.environ.get("PERFUSE_SOCKET") or _PATH_FUSE


def bufsize():
    """Socket buffer size: PERFUSE_BUFSIZE (1 to 2^32 - 1, C notation), else
    16 FUSE packets of 132 KiB, as perfused.default_bufsize()."""
    value = os.environ.get("PERFUSE_BUFSIZE", "")
    try:
        size = int(value, 0) if value else 0
    except ValueError:
        size = -1
    if 0 < size <= 0xFFFFFFFF:
        return size
    if value:
        LOG.warning("ignoring PERFUSE_BUFSIZE=%r", value)
    return 16 * max(os.sysconf("SC_PAGESIZE") + 0x1000, 0x21000)


def mount_request(source, target, filesystemtype, mountflags, data, sock=None):
    """The bytes of one perfuse mount request."""
    fields = [source, target, filesystemtype, data, sock]
    raw = [None if f is None else (os.fsencode(f) + b"\0") for f in fields]
    lens = [0 if r is None else len(r) for r in raw]
    body = b"".join(r for r in raw if r is not None)
    head = PerfuseMountOut(ctypes.sizeof(PerfuseMountOut) + len(body), 0, 0xFFFFFFFFFFFFFFFF,
                           PERFUSE_MOUNT_MAGIC, lens[0], lens[1], lens[2],
                           mountflags & 0xFFFFFFFF, lens[3], lens[4])
    return bytes(head) + body


# ---------------------------------------------------------------------------
# The C API: perfuse_open(), perfuse_mount()
# ---------------------------------------------------------------------------

def _set_buffers(sock, size):
    """As large as asked or as the host allows (kern.sbmax): halve until
    setsockopt agrees; perfused reads back what was granted."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        want = size
        while want >= 65536:
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, want)
                break
            except OSError:
                want //= 2


def _perfused_command():
    """perfused.py next to this module (run with this Python), else an
    installed perfused: on PATH, under sys.prefix, or NetBSD's own."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "perfused.py")
    if os.path.exists(here):
        return [sys.executable, here]
    for found in (shutil.which("perfused"), os.path.join(sys.prefix, "sbin", "perfused"),
                  "/usr/sbin/perfused"):
        if found and os.access(found, os.X_OK):
            return [found]
    raise OSError(errno.ENOENT, "perfused not found next to libperfuse.py or on PATH")


def _caller_stderr():
    """perfused outlives the caller: it must not hold the caller's pipes
    open (a daemon's parent reading fusermount's output until EOF would
    wait forever).  A terminal or a file for stderr is kept for its log."""
    try:
        mode = os.fstat(2).st_mode
    except OSError:
        return subprocess.DEVNULL
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return subprocess.DEVNULL
    return None


def _start_perfused(fd):
    """Run `perfused -i fd` detached: a shell starts it in the background
    and exits, so no zombie is left to the caller (which may exec a daemon
    next) and no fork() happens in a possibly threaded Python.  A
    PUFFS_COMFD descriptor in the environment (libpuffs' convention) is
    handed down with it."""
    command = _perfused_command() + ["-i", str(fd)]
    keep = [fd]
    comfd = os.environ.get("PUFFS_COMFD")
    if comfd and comfd.isdigit():
        keep.append(int(comfd))
    shell = subprocess.run(["/bin/sh", "-c", '"$@" &', "sh"] + command, pass_fds=keep,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=_caller_stderr(), start_new_session=True)
    if shell.returncode != 0:
        raise OSError(errno.ECHILD, "cannot start perfused (%s)" % " ".join(command))


def perfuse_open(path, flags, mode=0):
    """open(2) for FUSE daemons: /dev/fuse becomes a channel to perfused.

    Connects to the perfused socket ($PERFUSE_SOCKET or /dev/fuse).  When no
    perfused listens there, a socketpair is made and perfused is started in
    -i mode on one end; the other is returned.  Other paths: os.open().
    """
    if path != _PATH_FUSE:
        return os.open(path, flags, mode)
    size = bufsize()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    _set_buffers(sock, size)
    try:
        sock.connect(socket_path())
        return sock.detach()
    except OSError as e:
        sock.close()
        if e.errno not in (errno.ENOENT, errno.ECONNREFUSED):
            raise
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (ours, theirs):
        _set_buffers(s, size)
    if IS_NETBSD:
        # credentials come with the first message (must be set before it)
        theirs.setsockopt(SOL_LOCAL, LOCAL_CREDS, 1)
    try:
        _start_perfused(theirs.fileno())
    finally:
        theirs.close()
    return ours.detach()


def _fd_from_options(data):
    for opt in (data or "").split(","):
        if opt.startswith("fd="):
            try:
                return int(opt[3:])
            except ValueError:
                break
    raise OSError(errno.EINVAL, "perfuse_mount: no fd=N in mount options %r" % (data,))


def perfuse_mount(source, target, filesystemtype, mountflags, data):
    """mount(2) for FUSE daemons: send the mount request to perfused on the
    channel named by fd=N in data.  Returns 0; raises OSError.  There is no
    reply: the next thing on the channel is perfused's FUSE_INIT."""
    fd = _fd_from_options(data)
    if source is None:
        source = _PATH_FUSE
    if filesystemtype is None:
        filesystemtype = "fuse"
    request = mount_request(source, target, filesystemtype, mountflags, data)
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as e:
        raise OSError(e.errno, "perfuse_mount: fd %d is not a socket: %s" % (
            fd, e.strerror)) from e
    try:
        if sock.type != socket.SOCK_SEQPACKET:
            raise OSError(errno.ENOTSOCK, "perfuse_mount: fd %d is not a SEQPACKET socket" % fd)
        sock.getpeername()
        sock.sendall(request)
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET):
            raise OSError(e.errno, "perfuse_mount: perfused is not there (%s)" % e.strerror) from e
        raise
    finally:
        sock.close()
    return 0


# ---------------------------------------------------------------------------
# The Pythonic layer
# ---------------------------------------------------------------------------

class PerfuseChannel(socket.socket):
    """A socket connected to perfused, mounted and ready for FUSE_INIT
    (closed on leaving a with-block, as every socket)."""


def _check_mountpoint(target):
    """Catch the usual mistakes before perfused refuses silently."""
    try:
        st = os.stat(target)
    except OSError as e:
        raise OSError(e.errno, "mount point %s: %s" % (target, e.strerror)) from e
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, "mount point %s is not a directory" % target)
    uid = os.geteuid()
    if uid != 0 and st.st_uid != uid:
        raise OSError(errno.EPERM, "mount point %s is not owned by uid %d" % (target, uid))


def connect(mountpoint, fstype="fuse", source=_PATH_FUSE, options="", mountflags=0):
    """Mount through perfused and return the channel (a PerfuseChannel,
    usable as a context manager).  The caller then speaks FUSE on it."""
    _check_mountpoint(mountpoint)
    fd = perfuse_open(_PATH_FUSE, os.O_RDWR)
    try:
        data = ",".join(["fd=%d" % fd] + ([options] if options else []))
        perfuse_mount(source, mountpoint, fstype, mountflags, data)
    except BaseException:
        os.close(fd)
        raise
    return PerfuseChannel(fileno=fd)


# ---------------------------------------------------------------------------
# The fusermount stand-in (libfuse2 daemons, go-fuse, bazil.org/fuse)
# ---------------------------------------------------------------------------

def _options_to_mount(opts):
    """fusermount -o options -> (source, fstype, flags, remaining options)."""
    source, subtype, flags, rest = _PATH_FUSE, None, 0, []
    for opt in ",".join(opts).split(","):
        if not opt:
            continue
        if opt.startswith("fsname="):
            source = opt[7:]
        elif opt.startswith("subtype="):
            subtype = opt[8:]
        elif opt == "ro":
            flags |= 0x1                      # MS_RDONLY / MNT_RDONLY
        else:
            rest.append(opt)
    return source, "fuse." + subtype if subtype else "fuse", flags, ",".join(rest)


def _send_fd(commfd, fd):
    sock = socket.socket(fileno=os.dup(commfd))
    try:
        sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("=i", fd))])
    finally:
        sock.close()


def fusermount(argv):
    """What libfuse runs as fusermount/fusermount3: mount through perfused
    and hand the channel back over $_FUSE_COMMFD (SCM_RIGHTS)."""
    opts, unmount, mountpoint = [], False, None
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "-o" and args:
            opts.append(args.pop(0))
        elif a.startswith("-o") and len(a) > 2:
            opts.append(a[2:])
        elif a == "-u":
            unmount = True
        elif a in ("-q", "-z", "--auto-unmount", "-V", "--version"):
            if a in ("-V", "--version"):
                print("fusermount version: 2.9.9 (perfused stand-in)")
                return 0
        elif a == "--":
            if args:
                mountpoint = args.pop(0)
        elif not a.startswith("-"):
            mountpoint = a
        else:
            print("fusermount: unknown option %s" % a, file=sys.stderr)
            return 1
    if mountpoint is None:
        print("fusermount: missing mountpoint", file=sys.stderr)
        return 1
    if unmount:
        # perfused unmounts when the daemon's channel closes; nothing to do
        return 0
    commfd = os.environ.get("_FUSE_COMMFD")
    if not commfd or not commfd.isdigit():
        print("fusermount: old style mounting not supported ($_FUSE_COMMFD unset)",
              file=sys.stderr)
        return 1
    source, fstype, flags, rest = _options_to_mount(opts)
    try:
        chan = connect(os.path.abspath(mountpoint), fstype, source, rest, flags)
    except OSError as e:
        print("fusermount: %s" % e, file=sys.stderr)
        return 1
    try:
        _set_buffers(chan, bufsize())
        _send_fd(int(commfd), chan.fileno())
    finally:
        chan.close()
    return 0


def standin_dir():
    """A directory with fusermount and fusermount3 that run this module.
    The scripts carry the settings in their text: go-fuse runs fusermount
    with an empty environment."""
    keep = []
    for var in ("PERFUSE_SOCKET", "PERFUSE_BUFSIZE", "PUFFS_COMFD"):
        if os.environ.get(var):
            keep.append("%s='%s'; export %s" % (var, os.environ[var].replace("'", ""), var))
    body = "#!/bin/sh\n%s\nexec '%s' '%s' --fusermount \"$@\"\n" % (
        "\n".join(keep), sys.executable, os.path.abspath(__file__))
    # one directory per set of settings: concurrent launchers never clash
    base = os.path.join(os.environ.get("TMPDIR", "/tmp"), "perfuse-%d" % os.getuid(),
                        hashlib.sha1(body.encode()).hexdigest()[:12])
    os.makedirs(base, mode=0o700, exist_ok=True)
    for name in ("fusermount", "fusermount3"):
        path = os.path.join(base, name)
        tmp = path + ".%d" % os.getpid()
        with open(tmp, "w") as f:
            f.write(body)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    return base


def shadow_fusermount(standin):
    """libfuse2 runs fusermount from its install directory before trying
    PATH.  Where a real one is installed (Linux), bind-mount the stand-in
    over it in a private mount namespace of this process (root only), so the
    daemon cannot reach the host's FUSE by mistake."""
    real = set()
    for d in ("/bin", "/usr/bin", "/usr/local/bin", "/sbin", "/usr/sbin"):
        for name in ("fusermount", "fusermount3"):
            path = os.path.join(d, name)
            if os.path.exists(path):
                real.add(os.path.realpath(path))
    if not real:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newns, ms_rec, ms_private, ms_bind = 0x20000, 0x4000, 0x40000, 0x1000
    if (getattr(libc, "unshare", None) is None or libc.unshare(clone_newns) != 0
            or libc.mount(b"none", b"/", None, ms_rec | ms_private, None) != 0):
        raise OSError(ctypes.get_errno(), "cannot hide the host's fusermount (%s): "
                      "run as root" % ", ".join(sorted(real)))
    for path in sorted(real):
        target = os.path.join(standin, os.path.basename(path))
        if not os.path.exists(target):
            target = os.path.join(standin, "fusermount")
        if libc.mount(target.encode(), path.encode(), None, ms_bind, None) != 0:
            raise OSError(ctypes.get_errno(), "bind mount over %s failed" % path)


# ---------------------------------------------------------------------------
# The launcher
# ---------------------------------------------------------------------------

USAGE = ("usage: libperfuse.py [-o options] [-t fstype] [-s source] mountpoint -- "
         "daemon [args...]\n"
         "       (args may contain /dev/fd/%d, replaced by the channel; without it\n"
         "        the daemon reaches perfused through the fusermount stand-in)")


def main(argv=None):
    import getopt
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--fusermount"] or os.path.basename(sys.argv[0]).startswith("fusermount"):
        return fusermount(argv[1:] if argv[:1] == ["--fusermount"] else argv)
    try:
        opts, rest = getopt.getopt(argv, "ho:t:s:")
    except getopt.GetoptError as e:
        print("libperfuse: %s\n%s" % (e, USAGE), file=sys.stderr)
        return 64
    options, fstype, source = [], "fuse", _PATH_FUSE
    for opt, val in opts:
        if opt == "-h":
            print(USAGE)
            return 0
        if opt == "-o":
            options.append(val)
        elif opt == "-t":
            fstype = val
        elif opt == "-s":
            source = val
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if len(rest) < 2 or rest[1] == "--" and len(rest) < 3:
        print(USAGE, file=sys.stderr)
        return 64
    mountpoint, daemon = rest[0], [a for a in rest[1:]]
    if daemon[0] == "--":
        daemon = daemon[1:]
    if not any("/dev/fd/%d" in a for a in daemon):
        # libfuse2 and friends: they mount through fusermount
        standin = standin_dir()
        try:
            shadow_fusermount(standin)
        except OSError as e:
            print("libperfuse: %s" % e, file=sys.stderr)
            return 71
        os.environ["PATH"] = standin + os.pathsep + os.environ.get("PATH", "")
        return _exec(daemon)
    flags = 0x1 if "ro" in ",".join(options).split(",") else 0
    try:
        chan = connect(os.path.abspath(mountpoint), fstype, source, ",".join(options), flags)
    except OSError as e:
        print("libperfuse: %s" % e, file=sys.stderr)
        return 71
    _set_buffers(chan, bufsize())      # large replies must fit one record
    fd = chan.detach()
    os.set_inheritable(fd, True)
    return _exec([a.replace("/dev/fd/%d", "/dev/fd/%d" % fd) for a in daemon])


def _exec(argv):
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        print("libperfuse: %s: %s" % (argv[0], e.strerror), file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
