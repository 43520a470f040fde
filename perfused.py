#!/usr/bin/env python3
# perfused.py -- PUFFS Enabled Relay to FUSE, in one standard-library module.
#
# NetBSD's kernel speaks PUFFS on /dev/puffs; FUSE file system daemons speak
# the FUSE kernel protocol.  perfused listens on the /dev/fuse socket, performs
# the PUFFS mount for each daemon that connects, and relays every request.
#
# Definitions come first, then the pieces a request passes through from the
# bottom up, then what puts them together:
#
#   1. Number spaces      NetBSD numbers (kernel side) <-> host numbers (daemon)
#   2. PUFFS wire formats ctypes structures in the host C ABI
#   3. FUSE wire formats  FuseStruct layouts and records, opcodes, flags
#   4. Channels           PuffsDevice (/dev/puffs), FuseChannel (the socket)
#   5. Session            what FUSE_INIT and the mount settled; missing ops
#   6. Node table         cookies <-> node ids, lookups, parents, handles
#   7. Op translators     one generator per PUFFS op, table driven (OPS)
#   8. Relay              the loop, unique -> suspended translator, replies
#   9. Mount handshake    perfuse mount request, credentials, serve_connection
#  10. Daemon and CLI     perfused(8): options, listener, signals, trace
#
# One request's path: PuffsDevice.read_frame -> Relay.on_kernel_frame ->
# its translator in OPS -> Relay.send_fuse -> FuseChannel.send; the reply:
# FuseChannel.receive -> Relay.on_fuse_reply -> the translator again ->
# Relay.finish -> PuffsDevice.write_frame.  Translators are generators:
# they yield FuseRequest objects and receive the reply payload back (or a
# FuseError thrown in), so a PUFFS op that needs several FUSE exchanges
# reads top to bottom and many ops are in flight.

import collections
import contextlib
import ctypes
import errno
import logging
import logging.handlers
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
import types

__all__ = ["PuffsDevice", "FuseChannel", "serve_connection", "main"]

LOG = logging.getLogger("perfused")
IS_NETBSD = sys.platform.startswith("netbsd")

# ---------------------------------------------------------------------------
# 1. Number spaces
#
# The PUFFS side always speaks NetBSD's numbers; the FUSE side speaks the
# host's (os, errno, fcntl).  Translation goes by name, so on NetBSD every
# table below is the identity.
# ---------------------------------------------------------------------------

NETBSD_ERRNO = dict(
    EPERM=1, ENOENT=2, ESRCH=3, EINTR=4, EIO=5, ENXIO=6, E2BIG=7, ENOEXEC=8,
    EBADF=9, ECHILD=10, EDEADLK=11, ENOMEM=12, EACCES=13, EFAULT=14,
    ENOTBLK=15, EBUSY=16, EEXIST=17, EXDEV=18, ENODEV=19, ENOTDIR=20,
    EISDIR=21, EINVAL=22, ENFILE=23, EMFILE=24, ENOTTY=25, ETXTBSY=26,
    EFBIG=27, ENOSPC=28, ESPIPE=29, EROFS=30, EMLINK=31, EPIPE=32, EDOM=33,
    ERANGE=34, EAGAIN=35, EINPROGRESS=36, EALREADY=37, ENOTSOCK=38,
    EDESTADDRREQ=39, EMSGSIZE=40, EPROTOTYPE=41, ENOPROTOOPT=42,
    EPROTONOSUPPORT=43, ESOCKTNOSUPPORT=44, EOPNOTSUPP=45, EPFNOSUPPORT=46,
    EAFNOSUPPORT=47, EADDRINUSE=48, EADDRNOTAVAIL=49, ENETDOWN=50,
    ENETUNREACH=51, ENETRESET=52, ECONNABORTED=53, ECONNRESET=54, ENOBUFS=55,
    EISCONN=56, ENOTCONN=57, ESHUTDOWN=58, ETOOMANYREFS=59, ETIMEDOUT=60,
    ECONNREFUSED=61, ELOOP=62, ENAMETOOLONG=63, EHOSTDOWN=64, EHOSTUNREACH=65,
    ENOTEMPTY=66, EPROCLIM=67, EUSERS=68, EDQUOT=69, ESTALE=70, EREMOTE=71,
    EBADRPC=72, ERPCMISMATCH=73, EPROGUNAVAIL=74, EPROGMISMATCH=75,
    EPROCUNAVAIL=76, ENOLCK=77, ENOSYS=78, EFTYPE=79, EAUTH=80, ENEEDAUTH=81,
    EIDRM=82, ENOMSG=83, EOVERFLOW=84, EILSEQ=85, ENOTSUP=86, ECANCELED=87,
    EBADMSG=88, ENODATA=89, ENOSR=90, ENOSTR=91, ETIME=92, ENOATTR=93,
    EMULTIHOP=94, ENOLINK=95, EPROTO=96,
)
NETBSD_ELAST = 96
E = type("NetBSDErrno", (), NETBSD_ERRNO)   # E.ENOENT == 2, always NetBSD's

# Host errno -> NetBSD errno.  The first NetBSD name wins where the host has
# aliases (Linux EOPNOTSUPP == ENOTSUP == 95 becomes EOPNOTSUPP).
HOST_TO_NETBSD_ERRNO = {}
for _name, _num in NETBSD_ERRNO.items():
    if hasattr(errno, _name):
        HOST_TO_NETBSD_ERRNO.setdefault(getattr(errno, _name), _num)
for _alias, _name in (("EWOULDBLOCK", "EAGAIN"), ("EDEADLOCK", "EDEADLK")):
    if hasattr(errno, _alias):
        HOST_TO_NETBSD_ERRNO.setdefault(getattr(errno, _alias), NETBSD_ERRNO[_name])


def netbsd_errno(host_errno):
    """A host errno as the NetBSD kernel must see it (EIO when unknown)."""
    return HOST_TO_NETBSD_ERRNO.get(host_errno, E.EIO)


# NetBSD open flags as they arrive in PUFFS OPEN (FFLAGS: FREAD/FWRITE).
FREAD, FWRITE = 0x1, 0x2
NETBSD_OPEN_FLAGS = dict(
    O_NONBLOCK=0x4, O_APPEND=0x8, O_ASYNC=0x40, O_SYNC=0x80, O_NOFOLLOW=0x100,
    O_CREAT=0x200, O_TRUNC=0x400, O_EXCL=0x800, O_NOCTTY=0x8000,
    O_DSYNC=0x10000, O_RSYNC=0x20000, O_DIRECT=0x80000, O_DIRECTORY=0x200000,
)
# What reaches the daemon's OPEN: creation, truncation and append are done
# by the kernel itself (CREATE, SETATTR size, IO_APPEND offsets), and a shared
# per-node handle must not carry them.
OPEN_PASSED_FLAGS = ("O_NONBLOCK", "O_SYNC", "O_DSYNC", "O_RSYNC", "O_DIRECT",
                     "O_NOFOLLOW")


def host_open_flags(puffs_mode):
    """PUFFS OPEN mode (FREAD/FWRITE + NetBSD O_*) -> host os.O_* flags."""
    acc = {FREAD: os.O_RDONLY, FWRITE: os.O_WRONLY}.get(
        puffs_mode & (FREAD | FWRITE), os.O_RDWR)
    for name in OPEN_PASSED_FLAGS:
        if puffs_mode & NETBSD_OPEN_FLAGS[name] and hasattr(os, name):
            acc |= getattr(os, name)
    return acc


# Mount flags arrive from the daemon side in host numbers (Linux MS_*).
NETBSD_MNT = dict(MNT_RDONLY=0x1, MNT_SYNCHRONOUS=0x2, MNT_NOEXEC=0x4,
                  MNT_NOSUID=0x8, MNT_NODEV=0x10, MNT_NOATIME=0x04000000)
LINUX_MS_TO_MNT = {0x1: "MNT_RDONLY", 0x2: "MNT_NOSUID", 0x4: "MNT_NODEV",
                   0x8: "MNT_NOEXEC", 0x10: "MNT_SYNCHRONOUS", 0x400: "MNT_NOATIME"}


def netbsd_mount_flags(host_flags):
    if IS_NETBSD:
        return host_flags
    out = 0
    for bit, name in LINUX_MS_TO_MNT.items():
        if host_flags & bit:
            out |= NETBSD_MNT[name]
    return out


# Locks: NetBSD F_RDLCK 1, F_UNLCK 2, F_WRLCK 3; ADVLOCK ops F_GETLK 7,
# F_SETLK 8, F_SETLKW 9, F_UNLCK 2; ADVLOCK flags F_WAIT, F_FLOCK (F_POSIX
# otherwise).
NB_F_RDLCK, NB_F_UNLCK, NB_F_WRLCK = 1, 2, 3
NB_F_GETLK = 7                      # F_SETLK 8 and F_SETLKW 9 need no name here
NB_F_WAIT, NB_F_FLOCK = 0x10, 0x20
import fcntl as _fcntl  # noqa: E402  (host lock numbers)
LOCK_TYPE_TO_HOST = {NB_F_RDLCK: _fcntl.F_RDLCK, NB_F_UNLCK: _fcntl.F_UNLCK,
                     NB_F_WRLCK: _fcntl.F_WRLCK}
LOCK_TYPE_TO_NETBSD = {v: k for k, v in LOCK_TYPE_TO_HOST.items()}
SEEK_SET, SEEK_END = 0, 2
OFFSET_MAX = 0x7FFFFFFFFFFFFFFF
# The largest file size the kernel is given: UVM rounds sizes up to whole
# pages, so one within a page of 2^63 overflows and panics it; a MiB spares
# every port's page size.
NB_MAX_FILE_SIZE = (1 << 63) - (1 << 20)


# dev_t: NetBSD makedev() puts major in bits 8-19 and minor in 0-7 and
# 20-31.  A Linux daemon reports the kernel's 32-bit new_encode_dev(), which
# happens to be the same split for majors below 4096; decode by field anyway.
def netbsd_makedev(major, minor):
    return ((major << 8) & 0x000FFF00) | ((minor << 12) & 0xFFF00000) | (minor & 0xFF)


def netbsd_major_minor(dev):
    return (dev & 0x000FFF00) >> 8, ((dev & 0xFFF00000) >> 12) | (dev & 0xFF)


def netbsd_rdev(fuse_rdev):
    if IS_NETBSD:
        return fuse_rdev
    major = (fuse_rdev & 0xFFF00) >> 8
    minor = (fuse_rdev & 0xFF) | ((fuse_rdev >> 12) & 0xFFF00)
    return netbsd_makedev(major, minor)


def fuse_rdev(nb_rdev):
    if IS_NETBSD:
        return nb_rdev
    major, minor = netbsd_major_minor(nb_rdev)
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


# vtype (enum vtype) and the dirent types.
VNON, VREG, VDIR, VBLK, VCHR, VLNK, VSOCK, VFIFO = range(8)
IFMT_TO_VTYPE = {stat.S_IFREG: VREG, stat.S_IFDIR: VDIR, stat.S_IFBLK: VBLK,
                 stat.S_IFCHR: VCHR, stat.S_IFLNK: VLNK, stat.S_IFSOCK: VSOCK,
                 stat.S_IFIFO: VFIFO}
VTYPE_TO_IFMT = {v: k for k, v in IFMT_TO_VTYPE.items()}
# DT_* values are shared by NetBSD and Linux (DT_FIFO 1 ... DT_WHT 14):
# dirent types cross unchanged.

# Extended attribute namespaces.
EXTATTR_NAMESPACE_USER, EXTATTR_NAMESPACE_SYSTEM = 1, 2
SYSTEM_XATTR_PREFIXES = (b"system.", b"trusted.", b"security.")

# _PC_* names of pathconf(2) on NetBSD.
PATHCONF_NAMES = dict(_PC_LINK_MAX=1, _PC_MAX_CANON=2, _PC_MAX_INPUT=3,
                      _PC_NAME_MAX=4, _PC_PATH_MAX=5, _PC_PIPE_BUF=6,
                      _PC_CHOWN_RESTRICTED=7, _PC_NO_TRUNC=8, _PC_VDISABLE=9,
                      _PC_SYNC_IO=10, _PC_FILESIZEBITS=11, _PC_SYMLINK_MAX=12,
                      _PC_2_SYMLINKS=13)

# ---------------------------------------------------------------------------
# 2. PUFFS wire formats (sys/fs/puffs/puffs_msgif.h, PUFFSVERSION 30)
#
# Built from C types so every NetBSD port gets its native layout; the tests
# pin the amd64 sizes and offsets.
# ---------------------------------------------------------------------------

PUFFSVERSION = 30
c = ctypes
c_ptr = c.c_uint64 if c.sizeof(c.c_void_p) == 8 else c.c_uint32   # cookies
c_off = c.c_int64            # off_t, voff_t
c_dev = c.c_uint64           # dev_t
c_time = c.c_int64           # time_t (64-bit on every NetBSD port)

PUFFSOP_VFS, PUFFSOP_VN, PUFFSOP_ERROR = 1, 2, 4
PUFFSOP_FLUSH, PUFFSOP_UNMOUNT = 5, 7
PUFFSOP_OPCMASK, PUFFSOPFLAG_FAF, PUFFSOPFLAG_ISRESPONSE = 0x7, 0x10, 0x20

PUFFS_KFLAG_NOCACHE_NAME, PUFFS_KFLAG_WTCACHE = 0x1, 0x8
PUFFS_KFLAG_CACHE_FS_TTL, PUFFS_KFLAG_NOFLUSH_META = 0x80, 0x200
PUFFS_KFLAG_MASK = 0x3BF
# No PUFFS_KFLAG_CACHE_DOTDOT: with it every cached vnode holds its parent,
# and this kernel's single-pass vflush then fails unmount with EBUSY.
# Write-through: FUSE daemons expect each write(2) to reach them (perfused
# offers no FUSE_WRITEBACK_CACHE); with write-back caching the kernel sends
# the new size while the data is still cached, and a daemon that dies
# then leaves zeros nobody wrote.
DEFAULT_KFLAGS = PUFFS_KFLAG_WTCACHE | PUFFS_KFLAG_CACHE_FS_TTL | PUFFS_KFLAG_NOFLUSH_META
PAGE_SIZE = 4096

PUFFS_SETBACK_NOREF_N1, PUFFS_SETBACK_NOREF_N2 = 0x4, 0x8
PUFFS_EXTATTR_LIST_LENPREFIX = 0x1
PUFFS_INVAL_NAMECACHE_DIR, PUFFS_INVAL_NAMECACHE_ALL = 1, 2
PUFFS_INVAL_PAGECACHE_NODE_RANGE = 3
PUFFS_FLUSH_PAGECACHE_NODE_RANGE = 4
PUFFS_VN_MAX, PUFFS_VN_SPARE = 48, 30   # the vnopmask has one byte per op
PUFFS_MSG_MAXSIZE = 2 * 65536
PUFFS_HASH_BUCKETS = 256              # the kernel's cookie hash (pa_nhashbuckets)
MAX_REPLY_BUFFER = 64 << 20           # sanity bound on a kernel's preq_buflen
LARGE_REPLY = 256 << 10               # reply buffers from this size are reused
SPARE_REPLY_BUFFERS = 4               # ... this many at most
OUR_REQUEST_IDS = 1 << 63             # ids of our requests to the kernel: top bit set
PUFFCRED_TYPE_UUC = 1
VA_UTIMES_NULL, VA_EXCLUSIVE = 0x1, 0x2
FSYNC_DATAONLY = 0x2
NAMEI_LOOKUP, ISLASTCN = 0, 0x8000
VNOVAL32, VNOVAL64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF
VREAD, VWRITE, VEXEC = 4, 2, 1


class Timespec(c.Structure):
    _fields_ = [("tv_sec", c_time), ("tv_nsec", c.c_long)]


class Vattr(c.Structure):
    _fields_ = [("va_type", c.c_int), ("va_mode", c.c_uint32),
                ("va_nlink", c.c_uint32), ("va_uid", c.c_uint32),
                ("va_gid", c.c_uint32), ("va_fsid", c_dev),
                ("va_fileid", c.c_uint64), ("va_size", c.c_uint64),
                ("va_blocksize", c.c_long), ("va_atime", Timespec),
                ("va_mtime", Timespec), ("va_ctime", Timespec),
                ("va_birthtime", Timespec), ("va_gen", c.c_ulong),
                ("va_flags", c.c_ulong), ("va_rdev", c_dev),
                ("va_bytes", c.c_uint64), ("va_filerev", c.c_uint64),
                ("va_vaflags", c.c_uint), ("va_spare", c.c_long)]


class Uucred(c.Structure):
    _fields_ = [("cr_unused", c.c_ushort), ("cr_uid", c.c_uint32),
                ("cr_gid", c.c_uint32), ("cr_ngroups", c.c_short),
                ("cr_groups", c.c_uint32 * 16)]


class PuffsKcred(c.Structure):
    _fields_ = [("pkcr_uuc", Uucred), ("pkcr_type", c.c_uint8),
                ("pkcr_internal", c.c_uint8)]


class PuffsKcn(c.Structure):
    _fields_ = [("pkcn_nameiop", c.c_uint32), ("pkcn_flags", c.c_uint32),
                ("pkcn_name", c.c_char * 1024), ("pkcn_namelen", c.c_size_t),
                ("pkcn_consume", c.c_size_t)]


class PuffsStatvfs(c.Structure):
    _fields_ = [("f_flag", c.c_ulong), ("f_bsize", c.c_ulong),
                ("f_frsize", c.c_ulong), ("f_iosize", c.c_ulong),
                ("f_blocks", c.c_uint64), ("f_bfree", c.c_uint64),
                ("f_bavail", c.c_uint64), ("f_bresvd", c.c_uint64),
                ("f_files", c.c_uint64), ("f_ffree", c.c_uint64),
                ("f_favail", c.c_uint64), ("f_fresvd", c.c_uint64),
                ("f_syncreads", c.c_uint64), ("f_syncwrites", c.c_uint64),
                ("f_asyncreads", c.c_uint64), ("f_asyncwrites", c.c_uint64),
                ("f_fsidx", c.c_int32 * 2), ("f_fsid", c.c_ulong),
                ("f_namemax", c.c_ulong), ("f_owner", c.c_uint32),
                ("f_spare", c.c_uint32 * 4), ("f_fstypename", c.c_char * 32),
                ("f_mntonname", c.c_char * 1024),
                ("f_mntfromname", c.c_char * 1024)]


class PuffsKargs(c.Structure):
    _fields_ = [("pa_vers", c.c_uint), ("pa_fd", c.c_int),
                ("pa_flags", c.c_uint32), ("pa_maxmsglen", c.c_size_t),
                ("pa_nhashbuckets", c.c_int), ("pa_fhsize", c.c_size_t),
                ("pa_fhflags", c.c_int),
                ("pa_vnopmask", c.c_uint8 * (PUFFS_VN_MAX + PUFFS_VN_SPARE)),
                ("pa_typename", c.c_char * 32),
                ("pa_mntfromname", c.c_char * 1024),
                ("pa_root_cookie", c_ptr), ("pa_root_vtype", c.c_int),
                ("pa_root_vsize", c_off), ("pa_root_rdev", c_dev),
                ("pa_svfsb", PuffsStatvfs), ("pa_time32", c.c_uint32),
                ("pa_spare", c.c_uint32 * 127)]


class PuffsReq(c.Structure):
    _fields_ = [("preq_framelen", c.c_uint64), ("preq_id", c.c_uint64),
                ("preq_cookie", c_ptr), ("preq_opclass", c.c_uint16),
                ("preq_optype", c.c_uint16), ("preq_rv", c.c_int),
                ("preq_setbacks", c.c_uint32), ("preq_pid", c.c_int32),
                ("preq_lid", c.c_int32), ("preq_buflen", c.c_size_t)]


class Flock(c.Structure):     # NetBSD struct flock
    _fields_ = [("l_start", c_off), ("l_len", c_off), ("l_pid", c.c_int32),
                ("l_type", c.c_short), ("l_whence", c.c_short)]


def _msg(name, *fields):
    """A PUFFS message: struct puffs_req followed by the op's fields."""
    return type(name, (c.Structure,), {"_fields_": [("pr", PuffsReq)] + list(fields)})


CN = [("pvnr_cn", PuffsKcn), ("pvnr_cn_cred", PuffsKcred)]
CRED = [("pvnr_cred", PuffsKcred)]
TTLS = [("pvnr_va_ttl", Timespec), ("pvnr_cn_ttl", Timespec)]
NEWNODE = [("pvnr_va", Vattr), ("pvnr_newnode", c_ptr)]
EXTNAME = [("pvnr_attrnamespace", c.c_int), ("pvnr_attrname", c.c_char * 255)]

MsgLookup = _msg("MsgLookup", *CN, ("pvnr_newnode", c_ptr), ("pvnr_vtype", c.c_int),
                 ("pvnr_size", c_off), ("pvnr_rdev", c_dev), ("pvnr_va", Vattr), *TTLS)
MsgCreate = _msg("MsgCreate", *CN, *NEWNODE, *TTLS)          # also MKDIR, MKNOD
MsgSymlink = _msg("MsgSymlink", *CN, *NEWNODE, ("pvnr_link", c.c_char * 1024), *TTLS)
MsgOpen = _msg("MsgOpen", *CRED, ("pvnr_mode", c.c_int), ("pvnr_oflags", c.c_int))
MsgClose = _msg("MsgClose", *CRED, ("pvnr_fflag", c.c_int))
MsgAccess = _msg("MsgAccess", *CRED, ("pvnr_mode", c.c_int))
MsgAttr = _msg("MsgAttr", *CRED, ("pvnr_va", Vattr), ("pvnr_va_ttl", Timespec))
MsgRw = _msg("MsgRw", *CRED, ("pvnr_offset", c_off), ("pvnr_resid", c.c_size_t),
             ("pvnr_ioflag", c.c_int), ("pvnr_data", c.c_uint8 * 0))
MsgPoll = _msg("MsgPoll", ("pvnr_events", c.c_int))
MsgFsync = _msg("MsgFsync", *CRED, ("pvnr_offlo", c_off), ("pvnr_offhi", c_off),
                ("pvnr_flags", c.c_int))
MsgSeek = _msg("MsgSeek", *CRED, ("pvnr_oldoff", c_off), ("pvnr_newoff", c_off))
MsgRemove = _msg("MsgRemove", *CN, ("pvnr_cookie_targ", c_ptr))   # RMDIR, LINK
MsgRename = _msg("MsgRename", ("pvnr_cn_src", PuffsKcn), ("pvnr_cn_src_cred", PuffsKcred),
                 ("pvnr_cn_targ", PuffsKcn), ("pvnr_cn_targ_cred", PuffsKcred),
                 ("pvnr_cookie_src", c_ptr), ("pvnr_cookie_targ", c_ptr),
                 ("pvnr_cookie_targdir", c_ptr))
MsgReaddir = _msg("MsgReaddir", *CRED, ("pvnr_offset", c_off), ("pvnr_resid", c.c_size_t),
                  ("pvnr_ncookies", c.c_size_t), ("pvnr_eofflag", c.c_int),
                  ("pvnr_dentoff", c.c_size_t), ("pvnr_data", c.c_uint64 * 0))
MsgReadlink = _msg("MsgReadlink", *CRED, ("pvnr_linklen", c.c_size_t),
                   ("pvnr_link", c.c_char * 1024))
MsgReclaim = _msg("MsgReclaim", ("pvnr_nlookup", c.c_int))
MsgInactive = _msg("MsgInactive")
MsgPathconf = _msg("MsgPathconf", ("pvnr_name", c.c_int), ("pvnr_retval", c.c_long))
MsgAdvlock = _msg("MsgAdvlock", ("pvnr_fl", Flock), ("pvnr_id", c_ptr),
                  ("pvnr_op", c.c_int), ("pvnr_flags", c.c_int))
MsgMmap = _msg("MsgMmap", ("pvnr_prot", c.c_int), *CRED)
MsgAbortop = _msg("MsgAbortop", *CN)
MsgGetextattr = _msg("MsgGetextattr", *EXTNAME, *CRED, ("pvnr_datasize", c.c_size_t),
                     ("pvnr_resid", c.c_size_t), ("pvnr_data", c.c_uint64 * 0))
MsgSetextattr = _msg("MsgSetextattr", *EXTNAME, *CRED, ("pvnr_resid", c.c_size_t),
                     ("pvnr_data", c.c_uint64 * 0))
MsgListextattr = _msg("MsgListextattr", ("pvnr_attrnamespace", c.c_int), *CRED,
                      ("pvnr_datasize", c.c_size_t), ("pvnr_resid", c.c_size_t),
                      ("pvnr_flag", c.c_int), ("pvnr_data", c.c_uint64 * 0))
MsgDeleteextattr = _msg("MsgDeleteextattr", *EXTNAME, *CRED)
MsgFallocate = _msg("MsgFallocate", ("pvnr_off", c_off), ("pvnr_len", c_off))
MsgVfsUnmount = _msg("MsgVfsUnmount", ("pvfsr_flags", c.c_int))
MsgVfsStatvfs = _msg("MsgVfsStatvfs", ("pvfsr_sb", PuffsStatvfs))
MsgVfsSync = _msg("MsgVfsSync", ("pvfsr_cred", PuffsKcred), ("pvfsr_waitfor", c.c_int))
MsgFlush = _msg("MsgFlush", ("pf_cookie", c_ptr), ("pf_op", c.c_int),
                ("pf_start", c_off), ("pf_end", c_off))
MsgError = _msg("MsgError", ("perr_error", c.c_int), ("perr_str", c.c_char * 256))

# NetBSD struct dirent: d_fileno u64, d_reclen u16, d_namlen u16, d_type u8,
# name + NUL, the record rounded up to 8 bytes.
NB_DIRENT = struct.Struct("=QHHB")
NB_MAXNAMLEN = 511
NB_MAXPATHLEN = 1024
NB_NO_FILENO = 0xFFFFFFFF      # for an entry the daemon gives no inode: 0 would hide it
NB_POLL_FILE_READY = 0x47      # POLLIN|POLLPRI|POLLOUT|POLLRDNORM: what a file always is
# NetBSD local sockets (sys/un.h, sys/socket.h)
SOL_LOCAL, LOCAL_PEEREID, LOCAL_CREDS, SCM_CREDS = 0, 3, 4, 0x10
SOCKCRED = struct.Struct("=iIIII")      # struct sockcred: pid, uid, euid, gid, egid


def nb_dirent_reclen(namelen):
    return (NB_DIRENT.size + namelen + 1 + 7) & ~7


# PUFFS_VN_* and PUFFS_VFS_* operation numbers.
PUFFS_VFS = dict(UNMOUNT=2, STATVFS=5, SYNC=6)
PUFFS_VN = dict(
    LOOKUP=0, CREATE=1, MKNOD=2, OPEN=3, CLOSE=4, ACCESS=5, GETATTR=6,
    SETATTR=7, READ=8, WRITE=9, IOCTL=10, FCNTL=11, POLL=12, KQFILTER=13,
    REVOKE=14, MMAP=15, FSYNC=16, SEEK=17, REMOVE=18, LINK=19, RENAME=20,
    MKDIR=21, RMDIR=22, SYMLINK=23, READDIR=24, READLINK=25, ABORTOP=26,
    INACTIVE=27, RECLAIM=28, PATHCONF=35, ADVLOCK=36, GETEXTATTR=41,
    LISTEXTATTR=42, DELETEEXTATTR=44, SETEXTATTR=45, FALLOCATE=47,
    FDISCARD=48, PRINT=33,
)

# ---------------------------------------------------------------------------
# 3. FUSE wire formats (linux/fuse.h, in the host's byte order)
# ---------------------------------------------------------------------------

FUSE_KERNEL_VERSION, FUSE_OFFERED_MINOR, FUSE_OLDEST_MINOR = 7, 31, 12
FUSE_ROOT_ID = 1

FUSE_OPCODES = dict(
    LOOKUP=1, FORGET=2, GETATTR=3, SETATTR=4, READLINK=5, SYMLINK=6, MKNOD=8,
    MKDIR=9, UNLINK=10, RMDIR=11, RENAME=12, LINK=13, OPEN=14, READ=15,
    WRITE=16, STATFS=17, RELEASE=18, FSYNC=20, SETXATTR=21, GETXATTR=22,
    LISTXATTR=23, REMOVEXATTR=24, FLUSH=25, INIT=26, OPENDIR=27, READDIR=28,
    RELEASEDIR=29, FSYNCDIR=30, GETLK=31, SETLK=32, SETLKW=33, ACCESS=34,
    CREATE=35, INTERRUPT=36, BMAP=37, DESTROY=38, IOCTL=39, POLL=40,
    NOTIFY_REPLY=41, BATCH_FORGET=42, FALLOCATE=43, READDIRPLUS=44,
)
F = type("FuseOpcode", (), FUSE_OPCODES)
FUSE_OPNAMES = {v: k for k, v in FUSE_OPCODES.items()}

# INIT flags
FUSE_ASYNC_READ, FUSE_POSIX_LOCKS, FUSE_ATOMIC_O_TRUNC = 1 << 0, 1 << 1, 1 << 3
FUSE_BIG_WRITES, FUSE_DONT_MASK, FUSE_FLOCK_LOCKS = 1 << 5, 1 << 6, 1 << 10
FUSE_DO_READDIRPLUS, FUSE_MAX_PAGES = 1 << 13, 1 << 22
FUSE_OFFERED_FLAGS = (FUSE_ASYNC_READ | FUSE_POSIX_LOCKS | FUSE_ATOMIC_O_TRUNC
                      | FUSE_BIG_WRITES | FUSE_DONT_MASK | FUSE_FLOCK_LOCKS
                      | FUSE_DO_READDIRPLUS | FUSE_MAX_PAGES)

FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_FH = 16, 32, 64
FATTR_ATIME_NOW, FATTR_MTIME_NOW = 128, 256
FUSE_GETATTR_FH, FUSE_LK_FLOCK, FUSE_FSYNC_FDATASYNC = 1, 1, 1
FOPEN_KEEP_CACHE = 2
FUSE_DEFAULT_MAX_PAGES = 32             # without FUSE_MAX_PAGES: 128 KiB requests
MAX_ERRNO = 4095                        # a FUSE error is -1 .. -4095
FUSE_NOTIFY_INVAL_INODE, FUSE_NOTIFY_INVAL_ENTRY, FUSE_NOTIFY_DELETE = 2, 3, 6

# FUSE is the host's own byte order and sizes ("=": native order, standard
# sizes, padding spelled out as in linux/fuse.h).
FUSE_ORDER = "="


class FuseStruct:
    """One linux/fuse.h structure: "name:code" fields (codes of the struct
    module; "_:4x" is padding) and optionally a nested structure as its
    last member.  unpack_from gives a record naming the fields."""

    __slots__ = ("struct", "size", "pack", "record", "tail", "_split")

    def __init__(self, name, fields, tail=None):
        names, codes = [], []
        for field in fields.split():
            fname, _, code = field.partition(":")
            codes.append(code)
            if not code.endswith("x"):
                names.append(fname)
        if tail is not None:
            codes.append(tail.struct.format[1:])
            names.append(tail.record.__name__.lower())
        self.struct = struct.Struct(FUSE_ORDER + "".join(codes))
        self.size, self.pack = self.struct.size, self.struct.pack
        self.record = collections.namedtuple(name, names)
        self.tail, self._split = tail, len(names) - 1

    def unpack_from(self, buffer, offset=0):
        values = self.struct.unpack_from(buffer, offset)
        if self.tail is None:
            return self.record._make(values)
        return self.record(*values[:self._split],
                           self.tail.record._make(values[self._split:]))


FS = FuseStruct
IN_HEADER = FS("InHeader", "len:I opcode:I unique:Q nodeid:Q uid:I gid:I pid:I _:4x")
OUT_HEADER = FS("OutHeader", "len:I error:i unique:Q")
INIT_IN = FS("InitIn", "major:I minor:I max_readahead:I flags:I flags2:I _:44x")
INIT_OUT = FS("InitOut", "major:I minor:I max_readahead:I flags:I max_background:H "
                         "congestion_threshold:H max_write:I time_gran:I max_pages:H "
                         "map_alignment:H flags2:I _:28x")
INIT_OUT_OLD = 24                       # its size for minors below 23
ATTR = FS("Attr", "ino:Q size:Q blocks:Q atime:Q mtime:Q ctime:Q atimensec:I "
                  "mtimensec:I ctimensec:I mode:I nlink:I uid:I gid:I rdev:I "
                  "blksize:I flags:I")
ENTRY_OUT = FS("EntryOut", "nodeid:Q generation:Q entry_valid:Q attr_valid:Q "
                           "entry_valid_nsec:I attr_valid_nsec:I", ATTR)
ATTR_OUT = FS("AttrOut", "attr_valid:Q attr_valid_nsec:I dummy:I", ATTR)
GETATTR_IN = FS("GetattrIn", "getattr_flags:I dummy:I fh:Q")
SETATTR_IN = FS("SetattrIn", "valid:I padding:I fh:Q size:Q lock_owner:Q atime:Q mtime:Q "
                             "ctime:Q atimensec:I mtimensec:I ctimensec:I mode:I "
                             "unused4:I uid:I gid:I unused5:I")
OPEN_IN = FS("OpenIn", "flags:I open_flags:I")
OPEN_OUT = FS("OpenOut", "fh:Q open_flags:I padding:I")
CREATE_IN = FS("CreateIn", "flags:I mode:I umask:I open_flags:I")
MKNOD_IN = FS("MknodIn", "mode:I rdev:I umask:I padding:I")
MKDIR_IN = FS("MkdirIn", "mode:I umask:I")
RELEASE_IN = FS("ReleaseIn", "fh:Q flags:I release_flags:I lock_owner:Q")
FLUSH_IN = FS("FlushIn", "fh:Q unused:I padding:I lock_owner:Q")
READ_IN = FS("ReadIn", "fh:Q offset:Q size:I read_flags:I lock_owner:Q flags:I padding:I")
WRITE_IN = FS("WriteIn", "fh:Q offset:Q size:I write_flags:I lock_owner:Q flags:I padding:I")
WRITE_OUT = FS("WriteOut", "size:I padding:I")
STATFS_OUT = FS("Kstatfs", "blocks:Q bfree:Q bavail:Q files:Q ffree:Q bsize:I namelen:I "
                           "frsize:I padding:I _:24x")
FSYNC_IN = FS("FsyncIn", "fh:Q fsync_flags:I padding:I")
LK_IN = FS("LkIn", "fh:Q owner:Q start:Q end:Q type:I pid:I lk_flags:I padding:I")
LK_OUT = FS("LkOut", "start:Q end:Q type:I pid:I")
ACCESS_IN = FS("AccessIn", "mask:I padding:I")
XATTR_SIZE = FS("XattrSize", "size:I flags:I")     # getxattr_in/out, setxattr_in
POLL_IN = FS("PollIn", "fh:Q kh:Q flags:I events:I")
POLL_OUT = FS("PollOut", "revents:I padding:I")
FALLOCATE_IN = FS("FallocateIn", "fh:Q offset:Q length:Q mode:I padding:I")
FORGET_IN = FS("ForgetIn", "nlookup:Q")
BATCH_FORGET_IN = FS("BatchForgetIn", "count:I dummy:I")
FORGET_ONE = FS("ForgetOne", "nodeid:Q nlookup:Q")
LINK_IN = FS("LinkIn", "oldnodeid:Q")
RENAME_IN = FS("RenameIn", "newdir:Q")
DIRENT = FS("Dirent", "ino:Q off:Q namelen:I type:I")
NOTIFY_INVAL_INODE = FS("NotifyInvalInode", "ino:Q off:q len:q")
NOTIFY_INVAL_ENTRY = FS("NotifyInvalEntry", "parent:Q namelen:I padding:I")   # DELETE too


class FuseError(Exception):
    """A FUSE reply carrying an error; errno is the host's number."""

    def __init__(self, host_errno, why=""):
        super().__init__(host_errno, why or strerror(host_errno))
        self.errno = host_errno


def strerror(number):
    """os.strerror that takes any number a daemon may send."""
    try:
        return os.strerror(number)
    except (ValueError, OverflowError):
        return "error %d" % number


class PuffsError(Exception):
    """Fail the current PUFFS op with a NetBSD errno, without asking FUSE."""

    def __init__(self, nb_errno, why=""):
        super().__init__(nb_errno, why)
        self.errno = nb_errno


class FuseRequest:
    """One FUSE request a translator wants answered; the relay packs it."""

    __slots__ = ("opcode", "nodeid", "parts", "uid", "gid", "pid", "min_reply")

    def __init__(self, opcode, nodeid, parts=(), cred=(0, 0, 0), min_reply=0):
        self.opcode, self.nodeid, self.parts = opcode, nodeid, parts
        self.uid, self.gid, self.pid = cred
        self.min_reply = min_reply          # shorter non-error replies are EPROTO

    def pack(self, unique):
        """The record as a list of buffers (sent with one sendmsg, so a
        WRITE's data is not copied into a joined record)."""
        length = IN_HEADER.size + sum(len(p) for p in self.parts)
        return [IN_HEADER.pack(length, self.opcode, unique, self.nodeid,
                               self.uid, self.gid, self.pid)] + list(self.parts)


class Gather:
    """Several FUSE requests in flight at once for one translator (the
    chunks of a large READ or WRITE): the yield returns, in order, each
    reply's payload (valid until the translator's next yield) or the
    FuseError it failed with."""

    __slots__ = ("requests", "results", "left")

    def __init__(self, requests):
        self.requests = requests
        self.results = [None] * len(requests)
        self.left = len(requests)


def timespec_of(sec, nsec):
    """A daemon's time as the kernel's: what a 64-bit time_t and a
    normalized tv_nsec hold."""
    return Timespec(min(sec, 0x7FFFFFFFFFFFFFFF), min(nsec, 999999999))


# The kernel keeps name and attribute TTLs as 32-bit tick counts: a longer
# timeout wraps and expires at once.  A day is plenty.
MAX_TTL = 86400


def ttl_of(sec, nsec):
    """A FUSE timeout as the kernel's TTL.  The kernel ignores a zero TTL
    (keeps the previous one): "do not cache" becomes one nanosecond."""
    if sec >= MAX_TTL:
        return Timespec(MAX_TTL, 0)
    return Timespec(sec, min(nsec, 999999999) or (0 if sec else 1))


def node_ttl(node, sec, nsec):
    """Attributes and names of a file with several links are not cached:
    daemons that report each link as a node of its own (libfuse's high
    level: bindfs, sshfs) would leave the other names' size stale."""
    if node.nlinks > 1 and stat.S_ISREG(node.mode):
        return Timespec(0, 1)
    return ttl_of(sec, nsec)


class Idle:
    """Yielded to wait until `counter` of `owner` is 0, a count kept by
    `with relay.counting(owner, counter)`: FSYNC waits out the node's WRITEs
    in flight (it must not overtake the data it syncs: a multithreaded
    daemon may answer it first and die before the WRITE lands, as Linux's
    fuse_sync_writes), a READDIR the one in flight on its listing's handle."""

    __slots__ = ("owner", "counter")

    def __init__(self, owner, counter):
        self.owner, self.counter = owner, counter


class KernelFlush:
    """A PUFFSOP_FLUSH a translator yields to wait for: the yield returns
    the kernel's answer (an errno, 0 on success)."""

    __slots__ = ("op", "start", "end")

    def __init__(self, op, start=0, end=0):
        self.op, self.start, self.end = op, start, end     # end 0: to the end of file


# ---------------------------------------------------------------------------
# 4. Channels
# ---------------------------------------------------------------------------

# errors meaning the mount is gone: ENXIO/ENOENT from /dev/puffs, the others
# from a socket standing in for it
DEVICE_GONE = (errno.ENXIO, errno.ENOENT, errno.EBADF, errno.EPIPE, errno.ECONNRESET)


class PuffsDevice:
    """The /dev/puffs side: one frame per read, one whole frame per write.

    `fd` is an open PUFFS device (or anything with the same framing, such as
    a SOCK_SEQPACKET socket); `mount(target, flags, kargs)` performs the
    kernel mount and defaults to libc's __mount50 on NetBSD, `unmount(target,
    flags)` unmount(2), there by default too (None where a stand-in cannot).
    """

    # NetBSD frames are at most PUFFS_MSG_MAXSIZE (128 KiB); a stand-in may
    # send larger ones, up to this.
    READ_SIZE = 4 * 1024 * 1024 + 4096

    def __init__(self, fd=None, mount=None, unmount=None):
        if fd is None:
            fd = os.open("/dev/puffs", os.O_RDWR)
        self.fd = fd
        self._mount = mount or netbsd_mount
        self.unmount = unmount if mount is not None else netbsd_unmount
        self.target = None          # where the mount is
        self._outq = []
        self._buf = None

    def mount(self, target, flags, kargs):
        self._mount(target, flags, kargs)
        self.target = target

    def fileno(self):
        return self.fd

    def read_frame(self):
        """One kernel frame, or None when nothing is queued.  Raises EOFError
        when the mount is gone (ENXIO/ENOENT, or EOF on a stand-in)."""
        if self._buf is None:
            self._buf = bytearray(self.READ_SIZE)
        n = self._io(os.readv, [self._buf])
        if n is None:
            return None
        if not n:
            raise EOFError("device closed")
        return bytes(memoryview(self._buf)[:n])

    def _io(self, call, arg):
        """call(fd, arg); None when it would block, EOFError when the mount
        is gone."""
        try:
            return call(self.fd, arg)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in DEVICE_GONE:
                raise EOFError(e.strerror) from e
            raise

    def write_frame(self, frame):
        """Queue a frame; returns True when everything queued is written."""
        self._outq.append(frame)
        return self.flush()

    def flush(self):
        while self._outq:
            if self._io(os.write, self._outq[0]) is None:
                return False
            self._outq.pop(0)
        return True

    def drop_pending(self, frame):
        if self._outq and self._outq[0] is frame:
            self._outq.pop(0)

    @property
    def pending_output(self):
        return bool(self._outq)

    def close(self):
        try:
            os.close(self.fd)
        except OSError:
            pass


def comfd_mount(fd):
    """libpuffs' PUFFS_COMFD convention: instead of mount(2), the mount
    arguments go down an inherited descriptor, which then serves as the PUFFS
    device (rump kernels and test harnesses sit at its other end).  Written
    as one record: size_t length + target, size_t length + mntfromname,
    int flags, size_t length + struct puffs_kargs."""
    def mount(target, flags, kargs):
        fromname = PuffsKargs.from_buffer_copy(kargs).pa_mntfromname + b"\0"
        target = os.fsencode(target) + b"\0"
        size = struct.Struct("@N")
        record = b"".join((size.pack(len(target)), target, size.pack(len(fromname)),
                           fromname, struct.pack("=i", flags), size.pack(len(kargs)),
                           bytes(kargs)))
        os.write(fd, record)
    return mount


def netbsd_mount(target, flags, kargs):
    """mount(2) of type puffs through libc's __mount50 (NetBSD only)."""
    libc = c.CDLL(None, use_errno=True)
    fn = libc.__mount50
    fn.argtypes = [c.c_char_p, c.c_char_p, c.c_int, c.c_char_p, c.c_size_t]
    buf = c.create_string_buffer(bytes(kargs), len(kargs))
    if fn(b"puffs", os.fsencode(target), flags, buf, len(kargs)) != 0:
        err = c.get_errno()
        raise OSError(err, "mount puffs on %s: %s" % (target, os.strerror(err)))


def netbsd_unmount(target, flags):
    """unmount(2) (NetBSD only)."""
    libc = c.CDLL(None, use_errno=True)
    if libc.unmount(os.fsencode(target), flags) != 0:
        err = c.get_errno()
        raise OSError(err, "unmount %s: %s" % (target, os.strerror(err)))


SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
MAX_SPLIT_REPLY = 64 << 20      # a reply split over records: bound what is reassembled


class FuseChannel:
    """The daemon side: an AF_UNIX SOCK_SEQPACKET socket, one message per
    record, replies reassembled by out_header.len, non-blocking with a queue."""

    def __init__(self, sock, bufsize=None):
        self.sock = sock
        self.sndbuf = self.rcvbuf = 0
        self.set_buffers(bufsize or default_bufsize())
        self.unique = 0                 # the last request id given out
        self._outq = []                 # (unique, record) not yet sent
        self._partial = None            # (unique, expected length, bytearray)
        self.size_receive(PAGE_SIZE)    # the handshake's replies are small

    def new_unique(self):
        self.unique += 1
        return self.unique

    def size_receive(self, largest):
        """Receive records of up to `largest` bytes (what the session asks
        for); a larger one fails its own request."""
        self._buf = bytearray(largest + PAGE_SIZE)
        self._view = memoryview(self._buf)

    def set_buffers(self, size):
        """As large as asked, or as the host allows (NetBSD's kern.sbmax is
        often below the default): halve until setsockopt agrees, then read
        back what was granted."""
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            want = size
            while True:
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, opt, want)
                    break
                except OSError as e:
                    if want <= 65536:
                        LOG.warning("setsockopt(%d, %d): %s", opt, want, e.strerror)
                        break
                    want //= 2
        self.sndbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def fileno(self):
        return self.sock.fileno()

    def send(self, unique, record):
        """Queue one record (a list of buffers) of request `unique`.  Returns
        False when output is blocked; raises EOFError when the daemon is gone
        and MessageTooLong, naming its own request, for a queued record that
        can never fit (the rest stays queued)."""
        self._outq.append((unique, record))
        return self.flush()

    def flush(self):
        while self._outq:
            try:
                self.sock.sendmsg(self._outq[0][1], (), SEND_FLAGS)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    return False
                if e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    raise EOFError("daemon gone") from e
                if e.errno == errno.EMSGSIZE:
                    raise MessageTooLong(*self._outq.pop(0)) from e
                raise
            self._outq.pop(0)
        return True

    @property
    def pending_output(self):
        return bool(self._outq)

    @property
    def queued(self):
        return len(self._outq)

    @property
    def reassembling(self):
        """A reply split over several records is partly received."""
        return self._partial is not None

    def receive(self):
        """One whole reply as (unique, error, payload memoryview) or None if
        nothing is waiting.  The payload is only valid until the next call.
        Raises EOFError at daemon exit, ProtocolError for a malformed record."""
        try:
            n, _, flags, _ = self.sock.recvmsg_into([self._buf])
        except (BlockingIOError, InterruptedError):
            return None
        except ConnectionResetError as e:
            raise EOFError("daemon gone") from e
        if n == 0:
            raise EOFError("daemon closed the channel")
        if flags & getattr(socket, "MSG_TRUNC", 0x10):
            self._partial = None
            unique = OUT_HEADER.unpack_from(self._buf).unique if n >= OUT_HEADER.size else None
            raise ProtocolError(unique, "record larger than %d bytes" % len(self._buf))
        view = self._view[:n]
        if self._partial is not None:
            unique, want, acc = self._partial
            acc += view
            if len(acc) > want:
                self._partial = None
                raise ProtocolError(unique, "split reply overran its length (interleaved pieces?)")
            if len(acc) < want:
                return None
            self._partial = None
            header = OUT_HEADER.unpack_from(acc)
            return header.unique, header.error, memoryview(acc)[OUT_HEADER.size:]
        if n < OUT_HEADER.size:
            raise ProtocolError(None, "record of %d bytes is shorter than a header" % n)
        length, err, unique = OUT_HEADER.struct.unpack_from(view)
        if length < OUT_HEADER.size or length > MAX_SPLIT_REPLY:
            raise ProtocolError(unique, "reply length %d is impossible" % length)
        if length > n:
            self._partial = (unique, length, bytearray(view))
            return None
        if length < n:
            raise ProtocolError(unique, "reply says %d bytes, record has %d" % (length, n))
        return unique, err, view[OUT_HEADER.size:]

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class ProtocolError(Exception):
    def __init__(self, unique, why):
        super().__init__(why)
        self.unique = unique


class MessageTooLong(Exception):
    def __init__(self, unique, record):
        super().__init__("record of %d bytes does not fit the channel" % sum(map(len, record)))
        self.unique = unique


def default_bufsize():
    """Socket buffer size: PERFUSE_BUFSIZE (1 to 2^32 - 1, C notation), else
    16 FUSE packets of 132 KiB.  libperfuse.bufsize() is the same."""
    default = 16 * max(os.sysconf("SC_PAGESIZE") + 0x1000, 0x21000)
    value = os.environ.get("PERFUSE_BUFSIZE")
    if value:
        try:
            size = int(value, 0)
            if 0 < size <= 0xFFFFFFFF:
                return size
        except ValueError:
            pass
        LOG.warning("ignoring PERFUSE_BUFSIZE=%r", value)
    return default


def socket_path():
    """Where perfused listens: $PERFUSE_SOCKET (unset or empty: /dev/fuse).
    libperfuse.socket_path() is the same."""
    return os.environ.get("PERFUSE_SOCKET") or "/dev/fuse"


# ---------------------------------------------------------------------------
# 5. Session: what the mount and FUSE_INIT settled
# ---------------------------------------------------------------------------

DEFAULT_MAX_READ = 128 * 1024   # READ size offered without max_read=: what the kernel sends
XATTR_LIST_MAX = 65536          # the largest LISTXATTR reply Linux takes


class Session:
    """One connection's parameters: the mount's (flags, owner,
    PERFUSE_OPTIONS), what FUSE_INIT negotiated (minor, flags, I/O sizes),
    and what the daemon turned out to lack, keyed by FUSE opcode.
    negotiate_init makes it; translators read it; what is learnt later (a
    missing op, the name length, a listing's size ratio) comes in through
    its methods."""

    def __init__(self, minor, init_flags, max_read, max_write, mount_flags=0, owner_uid=0,
                 perfuse_options="", options=None):
        self.minor, self.init_flags = minor, init_flags
        self.max_read, self.max_write = max_read, max_write
        self.mount_flags, self.owner_uid = mount_flags, owner_uid
        options = options or {}           # mount_options(): who is served, who checks
        # Who is served (Linux's rules): the mount's owner, root too with
        # allow_root, everyone with allow_other.
        self.allow_other = bool(options.get("allow_other"))
        self.allow_root = bool(options.get("allow_root"))
        self.daemon_timeout = options.get("daemon_timeout", 0)   # seconds; 0: wait forever
        self._refused_uids = set()
        popts = parse_perfuse_options(perfuse_options)
        # Mode bits checked by perfused (default_permissions), or decisions
        # left to the daemon, as Linux does; PERFUSE_OPTIONS access decides
        # when it is given.
        self.local_permissions = not popts.get("access", not options.get("default_permissions"))
        self.use_create = popts.get("creat", True)
        self.poll = popts.get("poll", False)
        self.advlock = popts.get("advlock", True) and bool(init_flags & FUSE_POSIX_LOCKS)
        self.namemax = None             # the daemon's NAME_MAX, once STATFS said it
        self.readdir_ratio = 1.5        # FUSE bytes per NetBSD dirent byte, as last seen
        self._lacking = set()

    def lacks(self, opcode):
        return opcode in self._lacking

    def refuses(self, msg, cred_field):
        """A request is refused (its credentials in msg's cred_field): not
        the owner's, nor root's with allow_root, and no allow_other.  The
        kernel's own requests (no user credentials) always pass."""
        if self.allow_other:
            return False
        kcred = getattr(msg, cred_field)
        if kcred.pkcr_type != PUFFCRED_TYPE_UUC:
            return False
        uid = kcred.pkcr_uuc.cr_uid
        if uid == self.owner_uid or uid == 0 and self.allow_root:
            return False
        if uid not in self._refused_uids:
            self._refused_uids.add(uid)
            LOG.warning("refusing uid %d on uid %d's mount (mount option %s lets it in)", uid,
                        self.owner_uid, "allow_root" if uid == 0 else "allow_other")
        return True

    @property
    def kernel_may_cache(self):
        """NetBSD checks no permission on the names and attributes it
        caches for a PUFFS mount: where some users are refused, it must
        cache none, so that every lookup and stat reaches perfused."""
        return self.allow_other

    def mark_lacking(self, opcode):
        if opcode not in self._lacking:
            LOG.info("daemon lacks %s: not asking again", FUSE_OPNAMES.get(opcode, opcode))
            self._lacking.add(opcode)

    def saw_statfs(self, statfs):
        self.namemax = statfs.namelen or self.namemax

    def saw_listing(self, fuse_bytes, dirent_bytes):
        self.readdir_ratio = fuse_bytes / dirent_bytes

    @property
    def largest_reply(self):
        """The largest reply record this session asks for."""
        return max(self.max_read, XATTR_LIST_MAX, PUFFS_MSG_MAXSIZE) + OUT_HEADER.size


# What unless_lacking returns for an operation the daemon does not implement.
LACKING = object()


def unless_lacking(relay, freq):
    """`yield from` it to ask freq of the daemon unless it lacks the
    operation: the reply payload, or LACKING when ENOSYS said so, now or
    earlier in the session (as Linux, perfused never asks again).  Every
    fallback for a missing operation goes through here."""
    session = relay.session
    if session.lacks(freq.opcode):
        return LACKING
    try:
        return (yield freq)
    except FuseError as e:
        if e.errno != errno.ENOSYS:
            raise
        session.mark_lacking(freq.opcode)
        return LACKING


def fuse_exchange(channel, freq, timeout=30.0):
    """A blocking request/reply before the relay loop runs (INIT, root attr)."""
    unique = channel.new_unique()
    channel.sock.settimeout(timeout)
    try:
        channel.sock.sendmsg(freq.pack(unique))
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise FuseError(errno.ETIMEDOUT, "no answer to %s" % FUSE_OPNAMES[freq.opcode])
            got = channel.receive()
            if got is None:
                continue
            r_unique, err, payload = got
            if r_unique == 0:
                continue
            if r_unique != unique:
                raise FuseError(errno.EPROTO, "unexpected unique %d" % r_unique)
            if err:
                raise FuseError(-err if -MAX_ERRNO <= err < 0 else errno.EPROTO)
            return bytes(payload)
    except socket.timeout:
        raise FuseError(errno.ETIMEDOUT, "no answer to %s" % FUSE_OPNAMES[freq.opcode])
    except (BrokenPipeError, ConnectionResetError) as e:
        raise EOFError("daemon gone") from e
    finally:
        channel.sock.settimeout(None)


def negotiate_init(channel, max_read=DEFAULT_MAX_READ, **mount):
    """FUSE_INIT with the daemon: the Session it settles (`mount`: the
    Session's mount-side keywords)."""
    body = INIT_IN.pack(FUSE_KERNEL_VERSION, FUSE_OFFERED_MINOR, max_read, FUSE_OFFERED_FLAGS, 0)
    payload = fuse_exchange(channel, FuseRequest(F.INIT, 0, (body,)))
    if len(payload) < INIT_OUT_OLD:
        raise FuseError(errno.EPROTO, "INIT reply of %d bytes" % len(payload))
    init = INIT_OUT.unpack_from(payload[:INIT_OUT.size].ljust(INIT_OUT.size, b"\0"))
    if init.major != FUSE_KERNEL_VERSION or init.minor < FUSE_OLDEST_MINOR:
        raise FuseError(errno.EPROTO, "daemon speaks FUSE %d.%d" % (init.major, init.minor))
    pages = init.max_pages if init.minor >= 23 and init.flags & FUSE_MAX_PAGES else 0
    pages = pages or FUSE_DEFAULT_MAX_PAGES
    # A READ reply must fit the daemon's socket buffer, which we cannot see;
    # libperfuse sizes both ends alike, so ours is the best guess.
    read = max(PAGE_SIZE, min(pages * PAGE_SIZE, max_read, channel.rcvbuf - PAGE_SIZE))
    # A WRITE record is header + write_in + data: keep it within our buffer.
    write = max(PAGE_SIZE, min(init.max_write or PAGE_SIZE, pages * PAGE_SIZE,
                               channel.sndbuf - PAGE_SIZE))
    LOG.info("daemon speaks FUSE %d.%d, flags %#x, max_read %d, max_write %d",
             init.major, init.minor, init.flags, read, write)
    session = Session(min(init.minor, FUSE_OFFERED_MINOR), init.flags & FUSE_OFFERED_FLAGS,
                      read, write, **mount)
    channel.size_receive(session.largest_reply)
    return session


# ---------------------------------------------------------------------------
# 6. Node table
# ---------------------------------------------------------------------------

# Node.flags
SHARED_FH = 0x1      # rfh and wfh are one O_RDWR open
RELEASE_DUE = 0x2    # release the handles once the requests using them end
FORGET_DUE = 0x4     # the kernel let go: FORGET once requests and subdirectories end
STALE = 0x8          # the daemon reused the node id for another file: answer ESTALE
PAGES_READ = 0x10    # READ or WRITE reached the daemon since the last OPEN
DROP_PAGES = 0x20    # the last OPEN reply lacked FOPEN_KEEP_CACHE
LISTED = 0x40        # a listing took the directory handle open(2) opened
NAMES_REFUSED = 0x80  # a listing had a name NetBSD cannot take: logged once


class Node:
    """What perfused keeps per FUSE node the kernel or the daemon holds
    (a few hundred bytes: a mount may hold a hundred thousand of them)."""

    __slots__ = ("nodeid", "cookie", "fuse_nlookup", "puffs_nlookup", "mode",
                 "uid", "gid", "size", "nlinks", "rfh", "wfh", "busy", "flags",
                 "parent", "name", "subdirs", "names", "ino", "gen", "writing", "listings")

    def __init__(self, nodeid, cookie):
        self.nodeid, self.cookie = nodeid, cookie
        self.fuse_nlookup = 0           # lookups the daemon counted for this node
        self.puffs_nlookup = 0          # lookups the kernel counts for the cookie
        self.mode = self.uid = self.gid = self.size = self.nlinks = 0
        self.rfh = self.wfh = None      # FUSE handles open for reading, writing
        self.busy = 0                   # requests on the node's handles in flight
        self.flags = 0
        self.parent = None              # directories: the Node of "..", as last seen
        self.name = None                # directories: their name in parent
        self.subdirs = 0                # directory nodes known whose parent this is
        self.names = None               # {name: Node} of those subdirectories, or None
        self.ino = 0                    # st_ino as the daemon reports it
        self.gen = 0                    # the daemon's generation for the node id
        self.writing = 0                # WRITE requests in flight (FSYNC waits for them)
        self.listings = None            # directories: {pid: Listing} of listings under way

    @property
    def is_dir(self):
        return stat.S_ISDIR(self.mode)


class NodeTable:
    """PUFFS cookies <-> FUSE node ids, and the life-cycle rules of both.

    Cookies come from a counter (never 0, never reused), so a reclaimed vnode
    is never confused with a new one.  The table owns:
      - lookup counts: the daemon's (+1 per entry reply) and the kernel's
        (+1 per entry given to it, -n at RECLAIM); FORGET carries exactly the
        daemon's count once the kernel lets go;
      - parents of directories, to answer LOOKUP ".." without the daemon
        (Linux never sends it and daemons do not answer it reliably); a
        directory stays known while a subdirectory node is;
      - incarnations: a node id the daemon hands out again for another file
        while the kernel still holds the old cookie gets a fresh cookie; the
        old node answers ESTALE until RECLAIM;
      - handles and the order of their requests: no RELEASE while a FLUSH or
        I/O on the handle is unanswered, no FORGET while a FLUSH or RELEASE
        of the node is unanswered (daemons crash otherwise).
    `send_release(node, fh)` sends a RELEASE, counted in node.busy until
    answered; FORGETs gather in `forgets` for the relay to send.
    """

    ROOT_COOKIE = 1

    def __init__(self, send_release=None, keep_unheld=2048):
        self.by_cookie = {}
        self.by_nodeid = {}             # node id -> its current incarnation
        self.forgets = []               # (node id, count) to send
        self.send_release = send_release
        self.recent = collections.OrderedDict()   # cookie -> Node the kernel let go, oldest first
        self.keep_unheld = keep_unheld
        self._next_cookie = self.ROOT_COOKIE + 1
        self._high_water = 0
        self.root = self._add(FUSE_ROOT_ID, self.ROOT_COOKIE)

    def _add(self, nodeid, cookie):
        node = Node(nodeid, cookie)
        self.by_cookie[cookie] = node
        self.by_nodeid[nodeid] = node
        return node

    def get(self, cookie):
        return self.by_cookie.get(cookie)

    def of(self, cookie):
        """The node of a cookie the kernel names in a request's body."""
        node = self.by_cookie.get(cookie)
        if node is None:
            raise PuffsError(E.ENOENT, "unknown cookie %#x" % cookie)
        return node

    def give_back(self, nodeid):
        """An entry reply that is refused: the daemon's lookup is forgotten."""
        self.forgets.append((nodeid, 1))

    def take_forgets(self):
        forgets, self.forgets = self.forgets, []
        return forgets

    def current(self, nodeid):
        """The node a daemon's node id names now (notifications)."""
        return self.by_nodeid.get(nodeid)

    # --- lookup counts ---------------------------------------------------

    def account_entry(self, entry, parent, fresh=False, name=None):
        """The daemon counted one more lookup of entry.nodeid under parent.
        `fresh`: the reply made a new file (CREATE, MKDIR...), so a node the
        kernel still holds under that id is another, older file."""
        node = self.by_nodeid.get(entry.nodeid)
        mode = entry.attr.mode
        if node is not None and node is not self.root and node.puffs_nlookup > 0 and (
                fresh or stat.S_IFMT(mode) != stat.S_IFMT(node.mode)
                or entry.generation != node.gen):
            node.flags |= STALE
            node = None
        if node is None:
            node = self._add(entry.nodeid, self._next_cookie)
            self._next_cookie += 1
        else:
            self.recent.pop(node.cookie, None)
            node.flags &= ~FORGET_DUE
        node.fuse_nlookup += 1
        node.gen = entry.generation
        remember_attr(node, entry.attr)
        if node.is_dir and parent is not None and node is not parent \
                and node is not self.root:
            self.set_parent(node, parent, name)
        return node

    def set_parent(self, node, parent, name):
        """node is directory `name` in parent (LOOKUP, MKDIR, RENAME)."""
        old, node.parent = node.parent, parent
        if old is parent:
            self._unname(parent, node)
        else:
            parent.subdirs += 1
        if parent.names is None:
            parent.names = {}
        parent.names[name] = node
        if old is not None and old is not parent:
            self._subdir_gone(old, node)
        node.name = name

    @staticmethod
    def _unname(parent, node):
        if parent.names.get(node.name) is node:
            del parent.names[node.name]

    def _subdir_gone(self, parent, node):
        parent.subdirs -= 1
        self._unname(parent, node)
        if parent.subdirs == 0:
            parent.names = None
            if parent.flags & FORGET_DUE:
                self._forget(parent)

    def dirent_ino(self, directory, name, ino):
        """The inode number a listing of directory gives name: a known
        subdirectory's own st_ino.  Daemons without inode numbers in
        listings (libfuse's high level) would otherwise leave getcwd(3),
        which searches the parent for the child's st_ino, failing."""
        sub = directory.names.get(name) if directory.names else None
        return sub.ino if sub is not None else ino

    def is_within(self, node, ancestor):
        """node is ancestor or below it, as far as recorded parents tell."""
        while node is not None:
            if node is ancestor:
                return True
            node = node.parent
        return False

    def kernel_took(self, node):
        node.puffs_nlookup += 1
        self.recent.pop(node.cookie, None)

    def reclaimed(self, node, nlookup):
        """RECLAIM: the kernel dropped nlookup references to the cookie."""
        node.puffs_nlookup -= nlookup
        if node.puffs_nlookup <= 0 and node is not self.root:
            self.let_go(node)

    def let_go(self, node):
        """Nobody in the kernel holds the node: close it, and keep it among
        the most recently let go; the oldest beyond `keep_unheld` is
        FORGOTten, once nothing is in flight on it and no subdirectory needs
        it.  Kept, the daemon's node id stays valid: the next LOOKUP of the
        name gives the same node (libfuse's high level numbers inodes by
        node id, so st_ino stays the same, as on Linux, whose inode cache
        outlives the kernel's references)."""
        node.puffs_nlookup = 0
        self.release_handles(node)
        self.recent[node.cookie] = node
        while len(self.recent) > self.keep_unheld:
            _, oldest = self.recent.popitem(last=False)
            oldest.flags |= FORGET_DUE
            self._forget(oldest)

    def unheld(self, node):
        """For entries the daemon counted but the kernel never saw
        (READDIRPLUS, LINK)."""
        if node is not None and node.puffs_nlookup <= 0 and node is not self.root:
            self.let_go(node)

    def _forget(self, node):
        if node.busy or node.subdirs or not node.flags & FORGET_DUE:
            return
        if self.by_cookie.get(node.cookie) is node:
            del self.by_cookie[node.cookie]
        if self.by_nodeid.get(node.nodeid) is node:
            del self.by_nodeid[node.nodeid]
        if node.fuse_nlookup > 0:
            self.forgets.append((node.nodeid, node.fuse_nlookup))
        node.fuse_nlookup = 0
        node.flags &= ~FORGET_DUE
        if node.parent is not None:
            parent, node.parent = node.parent, None
            self._subdir_gone(parent, node)
        self._shrink()

    def _shrink(self):
        # dicts never shrink by themselves: rebuild them once most of a big
        # table is gone, so memory comes back after the kernel reclaims
        size = len(self.by_cookie)
        if size > self._high_water:
            self._high_water = size
        elif self._high_water > 64 and size < self._high_water // 8:
            self.by_cookie = dict(self.by_cookie)
            self.by_nodeid = dict(self.by_nodeid)
            self._high_water = size

    # --- handles -----------------------------------------------------------

    def adopt_handle(self, node, fh, mode):
        """Record a fresh handle in the empty slots its mode covers; one that
        fills no slot (a racing open got there first) is released."""
        took = False
        if mode & FREAD and node.rfh is None:
            node.rfh, took = fh, True
        if mode & FWRITE and node.wfh is None:
            node.flags = node.flags | SHARED_FH if took else node.flags & ~SHARED_FH
            node.wfh, took = fh, True
        if not took:
            self.send_release(node, fh)

    def release_handles(self, node):
        if node.busy:
            node.flags |= RELEASE_DUE
            return
        handles = [node.rfh, None if node.flags & SHARED_FH else node.wfh]
        handles += [lst.fh for lst in (node.listings or {}).values() if lst.owned]
        node.rfh = node.wfh = node.listings = None
        node.flags &= ~(SHARED_FH | RELEASE_DUE | LISTED)
        for fh in handles:
            if fh is not None:
                self.send_release(node, fh)

    def listing(self, node, pid, offset):
        """The Listing a process's READDIR at offset goes on with (one with
        no handle: it ended there), or None if it needs a handle of its own.
        A listing starting again (offset 0) gets a fresh one: daemons such
        as sshfs cannot rewind a directory handle, nor start one elsewhere
        than at 0.  The first listing borrows the handle open(2) opened."""
        listings = node.listings = node.listings or {}
        lst = listings.get(pid)
        if lst is not None and not lst.reading and (
                offset == 0 or lst.fh is None and offset != lst.end):
            self._drop_listing(node, pid)
            lst = None
        if lst is None and offset == 0 and node.rfh is not None and not node.flags & LISTED:
            node.flags |= LISTED
            lst = listings[pid] = Listing(node.rfh, False)
        return lst

    def adopt_listing(self, node, pid, fh):
        """Record a process's new listing handle; beyond LISTINGS_PER_DIR
        the oldest ended listings go, then the oldest idle ones (abandoned:
        `ls | head`)."""
        listings = node.listings = node.listings or {}
        idle = [k for k, lst in listings.items() if not lst.reading]
        idle.sort(key=lambda k: listings[k].fh is not None)     # stable: oldest first
        for key in idle:
            if len(listings) < LISTINGS_PER_DIR:
                break
            self._drop_listing(node, key)
        lst = listings[pid] = Listing(fh, True)
        return lst

    def listing_ended(self, node, lst, offset):
        """The directory ended at offset: the handle goes, the offset stays
        (getdents(2) asks once more before it returns 0)."""
        if lst.owned and lst.fh is not None:
            self.send_release(node, lst.fh)
        lst.fh, lst.end = None, offset

    def _drop_listing(self, node, pid):
        lst = node.listings.pop(pid)
        if lst.owned and lst.fh is not None:
            self.send_release(node, lst.fh)

    def busy(self, node):
        node.busy += 1

    def idle(self, node):
        """A request on the node's handles ended: what waited for it goes."""
        node.busy -= 1
        if node.busy == 0:
            if node.flags & RELEASE_DUE:
                self.release_handles(node)
            self._forget(node)

    def in_use(self, node):
        """`with nodes.in_use(node):` around requests using the node's
        handles."""
        return Scope(self.busy, self.idle, node)

    def __len__(self):
        return len(self.by_cookie)


# Listings a directory keeps track of, most of them ended (no handle)
LISTINGS_PER_DIR = 64


class Listing:
    """One process's listing of a directory, on a FUSE handle of its own as
    each open(2) has on Linux: two processes listing at once moved one
    daemon cursor (passthrough_ll lost and repeated entries).  `reading`:
    its READDIRs in flight, one at a time.  owned: not the handle open(2)
    opened, which the node keeps.  end: where it ended, fh then None."""

    __slots__ = ("fh", "owned", "reading", "end")

    def __init__(self, fh, owned):
        self.fh, self.owned, self.reading, self.end = fh, owned, 0, None


class Scope:
    """A `with` block around requests: enter(arg) before, leave(arg) after
    (a node in use, a WRITE in flight)."""

    __slots__ = ("enter", "leave", "arg")

    def __init__(self, enter, leave, arg):
        self.enter, self.leave, self.arg = enter, leave, arg

    def __enter__(self):
        self.enter(self.arg)

    def __exit__(self, *exc):
        self.leave(self.arg)


# ---------------------------------------------------------------------------
# 7. Op translators
#
# Each translator takes (relay, req).  One that needs the daemon is a
# generator: `yield FuseRequest` returns the reply payload (a memoryview
# valid until the next yield) or throws FuseError.  Returning an int sets the
# reply frame length; returning None keeps the request's length.  The OPS table at the end maps PUFFS
# (opclass, optype) to name, message layout and translator.
# ---------------------------------------------------------------------------

class PuffsRequest:
    """A kernel request being served: its frame, reply buffer and views."""

    __slots__ = ("reply", "frame", "msg", "hdr", "op", "node", "faf", "started")

    def __init__(self, reply, op, node, frame=b""):
        self.reply = reply
        self.frame = frame
        self.op = op
        self.msg = op.layout.from_buffer(reply)
        self.hdr = self.msg.pr
        self.node = node
        self.faf = bool(self.hdr.preq_opclass & PUFFSOPFLAG_FAF)
        self.started = 0.0

    def cred(self, kcred=None):
        """(uid, gid, pid) for the FUSE header from a puffs_kcred."""
        pid = self.hdr.preq_pid
        if kcred is None or kcred.pkcr_type != PUFFCRED_TYPE_UUC:
            return (0, 0, pid)
        return (kcred.pkcr_uuc.cr_uid, kcred.pkcr_uuc.cr_gid, pid)


def kcn_name(kcn, relay=None):
    name = bytes(kcn.pkcn_name)[:kcn.pkcn_namelen]
    if not name or b"/" in name or b"\0" in name:
        raise PuffsError(E.EINVAL, "bad component name")
    if relay is not None and relay.debug.filename:
        LOG.debug("  name %r", name)
    return name


def fill_vattr(va, attr):
    """A FUSE Attr record -> NetBSD struct vattr."""
    mode = attr.mode
    va.va_type = IFMT_TO_VTYPE.get(stat.S_IFMT(mode), VNON)
    va.va_mode = mode & 0o7777
    va.va_nlink = attr.nlink
    va.va_uid, va.va_gid = attr.uid, attr.gid
    va.va_fsid = 0
    va.va_fileid = attr.ino
    va.va_size = min(attr.size, NB_MAX_FILE_SIZE)
    va.va_blocksize = attr.blksize or 512
    va.va_atime = timespec_of(attr.atime, attr.atimensec)
    va.va_mtime = timespec_of(attr.mtime, attr.mtimensec)
    va.va_ctime = timespec_of(attr.ctime, attr.ctimensec)
    va.va_birthtime = Timespec(0, 0)
    va.va_gen = 0           # FUSE generations matter to NFS export only, which PUFFS lacks
    va.va_flags = 0
    va.va_rdev = netbsd_rdev(attr.rdev) if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0
    va.va_bytes = min(attr.blocks * 512, VNOVAL64 - 1)
    va.va_filerev = VNOVAL64
    va.va_vaflags = 0


_SHARED_INTS = {}


def _shared(value):
    """One int object for the few modes/owners a tree has: most nodes hold
    the same ones, and an int is 28 bytes."""
    if len(_SHARED_INTS) > 4096:
        _SHARED_INTS.clear()
    return _SHARED_INTS.setdefault(value, value)


def remember_attr(node, attr):
    node.ino, node.size = attr.ino, min(attr.size, NB_MAX_FILE_SIZE)
    node.mode, node.uid, node.gid = _shared(attr.mode), _shared(attr.uid), _shared(attr.gid)
    node.nlinks = _shared(attr.nlink)


def translate_error(exc):
    if isinstance(exc, PuffsError):
        return exc.errno
    return netbsd_errno(exc.errno)


# --- name space ops --------------------------------------------------------

def check_access(node, kcred, want):
    """Local permission check on cached attributes (mount option
    default_permissions): root may do anything but execute a file with no
    x bit; others by owner, group, then other bits."""
    if kcred is None or kcred.pkcr_type != PUFFCRED_TYPE_UUC:
        return
    if want & 0o700:                  # current NetBSD VREAD/VWRITE/VEXEC 0400..
        want >>= 6
    uc = kcred.pkcr_uuc
    mode = node.mode
    if uc.cr_uid == 0:
        if want & VEXEC and not node.is_dir and not mode & 0o111 and mode:
            raise PuffsError(E.EACCES)
        return
    if uc.cr_uid == node.uid:
        bits = (mode >> 6) & 7
    elif uc.cr_gid == node.gid or node.gid in uc.cr_groups[:max(0, uc.cr_ngroups)]:
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    if want & ~bits & 7:
        raise PuffsError(E.EACCES)


def entry_reply_to_kernel(relay, req, entry, fresh=False):
    """Account a new-node reply and fill the kernel's newnode/vattr/ttls."""
    if entry.nodeid == 0:
        raise PuffsError(E.ENOENT)          # a negative (cacheable) entry
    if stat.S_IFMT(entry.attr.mode) not in IFMT_TO_VTYPE:
        # a node of no known type is "bad node type" to the kernel
        relay.nodes.give_back(entry.nodeid)
        LOG.error("daemon gave node %#x the mode %#o", entry.nodeid, entry.attr.mode)
        raise PuffsError(E.EIO)
    known = relay.nodes.current(entry.nodeid)
    if known is not None and known.is_dir and relay.nodes.is_within(req.node, known):
        # The directory itself, the root or another ancestor as a name in
        # it: a loop, which deadlocks the kernel (Linux refuses such an
        # alias with EIO).  Give the daemon its count back, fail the op.
        relay.nodes.give_back(entry.nodeid)
        LOG.error("daemon answered a name in %#x with its ancestor %#x", req.node.nodeid,
                  entry.nodeid)
        raise PuffsError(E.EIO)
    msg = req.msg
    name = bytes(msg.pvnr_cn.pkcn_name)[:msg.pvnr_cn.pkcn_namelen]
    node = relay.nodes.account_entry(entry, req.node, fresh, name)
    msg.pvnr_newnode = node.cookie
    fill_vattr(msg.pvnr_va, entry.attr)
    msg.pvnr_va_ttl = node_ttl(node, entry.attr_valid, entry.attr_valid_nsec)
    msg.pvnr_cn_ttl = node_ttl(node, entry.entry_valid, entry.entry_valid_nsec)
    relay.nodes.kernel_took(node)
    return node


def op_lookup(relay, req):
    msg = req.msg
    name = kcn_name(msg.pvnr_cn, relay)
    if relay.session.local_permissions:
        check_access(req.node, msg.pvnr_cn_cred, VEXEC)
        if (msg.pvnr_cn.pkcn_nameiop != NAMEI_LOOKUP
                and msg.pvnr_cn.pkcn_flags & ISLASTCN):
            check_access(req.node, msg.pvnr_cn_cred, VWRITE)
    if name == b"..":
        yield from lookup_parent(relay, req)
        return None
    payload = yield FuseRequest(F.LOOKUP, req.node.nodeid, (name, b"\0"),
                                req.cred(msg.pvnr_cn_cred), ENTRY_OUT.size)
    entry_reply_to_kernel(relay, req, ENTRY_OUT.unpack_from(payload))
    msg.pvnr_vtype = msg.pvnr_va.va_type
    msg.pvnr_size = msg.pvnr_va.va_size
    msg.pvnr_rdev = msg.pvnr_va.va_rdev
    return None


def lookup_parent(relay, req):
    """LOOKUP "..", answered from the parent the node table recorded: the
    kernel sends it (no CACHE_DOTDOT, so that unmount can recycle vnodes),
    FUSE daemons are never asked it."""
    parent = req.node.parent
    if parent is None:
        LOG.error("LOOKUP .. of node %#x, whose parent is unknown", req.node.nodeid)
        raise PuffsError(E.EIO)
    msg = req.msg
    fields = yield from _getattr(relay, req, parent, req.cred(msg.pvnr_cn_cred))
    _attr_reply(req, parent, fields)
    msg.pvnr_cn_ttl = msg.pvnr_va_ttl
    msg.pvnr_newnode = parent.cookie
    msg.pvnr_vtype, msg.pvnr_size, msg.pvnr_rdev = VDIR, parent.size, 0
    relay.nodes.kernel_took(parent)


def _make_node(relay, req, opcode, parts):
    """MKNOD, MKDIR, SYMLINK: a new node given to the kernel."""
    payload = yield FuseRequest(opcode, req.node.nodeid, parts,
                                req.cred(req.msg.pvnr_cn_cred), ENTRY_OUT.size)
    entry_reply_to_kernel(relay, req, ENTRY_OUT.unpack_from(payload), fresh=True)


def op_create(relay, req):
    msg = req.msg
    name = kcn_name(msg.pvnr_cn, relay)
    mode = (msg.pvnr_va.va_mode & 0o7777) | stat.S_IFREG
    flags = os.O_CREAT | os.O_RDWR
    if msg.pvnr_va.va_vaflags & VA_EXCLUSIVE:
        flags |= os.O_EXCL
    payload = LACKING
    if relay.session.use_create:
        payload = yield from unless_lacking(relay, FuseRequest(
            F.CREATE, req.node.nodeid, (CREATE_IN.pack(flags, mode, 0, 0), name, b"\0"),
            req.cred(msg.pvnr_cn_cred), ENTRY_OUT.size + OPEN_OUT.size))
    if payload is LACKING:      # the kernel opens it afterwards: MKNOD will do
        yield from _make_node(relay, req, F.MKNOD, (MKNOD_IN.pack(mode, 0, 0, 0), name, b"\0"))
        return None
    node = entry_reply_to_kernel(relay, req, ENTRY_OUT.unpack_from(payload), fresh=True)
    handle = OPEN_OUT.unpack_from(payload, ENTRY_OUT.size)
    relay.nodes.adopt_handle(node, handle.fh, FREAD | FWRITE)
    opened(node, handle.open_flags)
    return None


def op_mknod(relay, req):
    msg = req.msg
    va = msg.pvnr_va
    mode = (va.va_mode & 0o7777) | VTYPE_TO_IFMT.get(va.va_type, stat.S_IFREG)
    rdev = fuse_rdev(va.va_rdev) if va.va_type in (VCHR, VBLK) and va.va_rdev != VNOVAL64 else 0
    yield from _make_node(relay, req, F.MKNOD, (MKNOD_IN.pack(mode, rdev & 0xFFFFFFFF, 0, 0),
                                                kcn_name(msg.pvnr_cn, relay), b"\0"))


def op_mkdir(relay, req):
    msg = req.msg
    yield from _make_node(relay, req, F.MKDIR, (MKDIR_IN.pack(msg.pvnr_va.va_mode & 0o7777, 0),
                                                kcn_name(msg.pvnr_cn, relay), b"\0"))


def op_symlink(relay, req):
    msg = req.msg
    target = bytes(msg.pvnr_link)           # c_char array stops at the NUL
    yield from _make_node(relay, req, F.SYMLINK,
                          (kcn_name(msg.pvnr_cn, relay), b"\0", target, b"\0"))


def op_link(relay, req):
    msg = req.msg
    target = relay.nodes.of(msg.pvnr_cookie_targ)
    payload = yield FuseRequest(F.LINK, req.node.nodeid,
                                (LINK_IN.pack(target.nodeid), kcn_name(msg.pvnr_cn, relay), b"\0"),
                                req.cred(msg.pvnr_cn_cred), ENTRY_OUT.size)
    entry = ENTRY_OUT.unpack_from(payload)
    if entry.nodeid:
        # the daemon counts it: so do we; the kernel keeps its own vnode
        relay.nodes.unheld(relay.nodes.account_entry(entry, None))
    # The file's other names are cached with one link: let the kernel look
    # them up again, so that their attributes are not cached any more (see
    # node_ttl), as Linux invalidates the attributes after LINK.
    target.nlinks = max(target.nlinks, 2)
    yield KernelFlush(PUFFS_INVAL_NAMECACHE_ALL)


def _remove(opcode):
    def op_remove(relay, req):
        msg = req.msg
        yield FuseRequest(opcode, req.node.nodeid, (kcn_name(msg.pvnr_cn, relay), b"\0"),
                          req.cred(msg.pvnr_cn_cred))
        # The name is gone: let the kernel recycle the vnode at its next
        # inactive, so the node is reclaimed and FORGOTten promptly.
        req.hdr.preq_setbacks = PUFFS_SETBACK_NOREF_N2
    op_remove.__name__ = "op_" + FUSE_OPNAMES[opcode].lower()
    return op_remove


def op_rename(relay, req):
    msg = req.msg
    newdir = relay.nodes.of(msg.pvnr_cookie_targdir)
    moved = relay.nodes.get(msg.pvnr_cookie_src)
    if moved is not None and moved.is_dir and relay.nodes.is_within(newdir, moved):
        # A directory into itself: Linux refuses it before asking the daemon
        # (libfuse's high level deadlocks on it), so do we.
        raise PuffsError(E.EINVAL)
    replaced = relay.nodes.get(msg.pvnr_cookie_targ) if msg.pvnr_cookie_targ else None
    if replaced is not None and replaced.is_dir and relay.nodes.is_within(req.node, replaced):
        raise PuffsError(E.ENOTEMPTY)   # over its own ancestor: not empty, as Linux says
    yield FuseRequest(F.RENAME, req.node.nodeid,
                      (RENAME_IN.pack(newdir.nodeid), kcn_name(msg.pvnr_cn_src, relay), b"\0",
                       kcn_name(msg.pvnr_cn_targ, relay), b"\0"),
                      req.cred(msg.pvnr_cn_targ_cred))
    if moved is not None and moved.is_dir:
        relay.nodes.set_parent(moved, newdir, kcn_name(msg.pvnr_cn_targ))


# --- attributes ---------------------------------------------------------------

def _getattr(relay, req, node, cred):
    fh = node.rfh if node.rfh is not None else node.wfh
    named = fh is not None and not node.is_dir
    body = GETATTR_IN.pack(FUSE_GETATTR_FH if named else 0, 0, fh if named else 0)
    # a handle it names is not released meanwhile
    with relay.nodes.in_use(node) if named else contextlib.nullcontext():
        payload = yield FuseRequest(F.GETATTR, node.nodeid, (body,), cred, ATTR_OUT.size)
    return ATTR_OUT.unpack_from(payload)


def _attr_reply(req, node, reply):
    """An AttrOut record into the kernel's vattr and TTL."""
    attr = reply.attr
    if stat.S_IFMT(attr.mode) != stat.S_IFMT(node.mode) and node.mode:
        # a vnode's type never changes: the kernel cannot take another
        raise FuseError(errno.EIO, "attributes of node %#x give it another type (%#o)"
                        % (node.nodeid, attr.mode))
    remember_attr(node, attr)
    fill_vattr(req.msg.pvnr_va, attr)
    req.msg.pvnr_va_ttl = node_ttl(node, reply.attr_valid, reply.attr_valid_nsec)


def op_getattr(relay, req):
    reply = yield from _getattr(relay, req, req.node, req.cred(req.msg.pvnr_cred))
    _attr_reply(req, req.node, reply)


def op_setattr(relay, req):
    node, va = req.node, req.msg.pvnr_va
    valid, size, atime, mtime, atimens, mtimens = 0, 0, 0, 0, 0, 0
    mode, uid, gid = 0, 0, 0
    if va.va_mode != VNOVAL32:
        valid |= FATTR_MODE
        # with the file type, as Linux sends it (cryfs asserts on a bare mode)
        mode = va.va_mode & 0o7777 | stat.S_IFMT(node.mode)
    if va.va_uid != VNOVAL32:
        valid, uid = valid | FATTR_UID, va.va_uid
    if va.va_gid != VNOVAL32:
        valid, gid = valid | FATTR_GID, va.va_gid
    if va.va_size != VNOVAL64:
        valid, size = valid | FATTR_SIZE, va.va_size
    atime_set, mtime_set = va.va_atime.tv_sec != -1, va.va_mtime.tv_sec != -1
    if atime_set or mtime_set:
        # Daemons (libfuse2's high level, sshfs) mishandle a SETATTR with one
        # time alone: send both, the omitted one as it is now.
        if not (atime_set and mtime_set):
            now = (yield from _getattr(relay, req, node, req.cred(req.msg.pvnr_cred))).attr
        atime, atimens = (va.va_atime.tv_sec, va.va_atime.tv_nsec) if atime_set \
            else (now.atime, now.atimensec)
        mtime, mtimens = (va.va_mtime.tv_sec, va.va_mtime.tv_nsec) if mtime_set \
            else (now.mtime, now.mtimensec)
        valid |= FATTR_ATIME | FATTR_MTIME
        if va.va_vaflags & VA_UTIMES_NULL:
            # utimes(NULL): the daemon's clock, with the kernel's as the values
            valid |= FATTR_ATIME_NOW | FATTR_MTIME_NOW
    cred = req.cred(req.msg.pvnr_cred)
    if not valid:
        if req.faf:
            return None
        # Nothing to change (NOFLUSH_META flushes), but the kernel takes the
        # reply's vattr as the truth: answer with fresh attributes.
        reply = yield from _getattr(relay, req, node, cred)
        _attr_reply(req, node, reply)
        return None
    if valid & FATTR_SIZE and size < node.size and not node.is_dir and not req.faf:
        # truncate(2) leaves the old bytes in the cached last page (with no
        # writer open the kernel does not zero it): write back, then drop,
        # the pages from the new end on, or they come back when it grows.
        for op in (PUFFS_FLUSH_PAGECACHE_NODE_RANGE, PUFFS_INVAL_PAGECACHE_NODE_RANGE):
            yield KernelFlush(op, size & ~(PAGE_SIZE - 1))
    fh = node.wfh
    if fh is not None and not node.is_dir:
        valid |= FATTR_FH
    body = SETATTR_IN.pack(valid, 0, fh or 0, size, 0, atime, mtime, 0,
                           atimens, mtimens, 0, mode, 0, uid, gid, 0)
    with relay.nodes.in_use(node):
        payload = yield FuseRequest(F.SETATTR, node.nodeid, (body,), cred, ATTR_OUT.size)
    reply = ATTR_OUT.unpack_from(payload)
    if not req.faf:
        _attr_reply(req, node, reply)
    else:
        remember_attr(node, reply.attr)


def op_access(relay, req):
    node, mode = req.node, req.msg.pvnr_mode
    if relay.session.local_permissions:
        check_access(node, req.msg.pvnr_cred, mode)
        return None
    bits = mode >> 6 if mode & 0o700 else mode
    mask = ((os.R_OK if bits & VREAD else 0) | (os.W_OK if bits & VWRITE else 0)
            | (os.X_OK if bits & VEXEC else 0))
    # A daemon without ACCESS decides at each operation instead (Linux
    # then allows access(2) too).
    yield from unless_lacking(relay, FuseRequest(
        F.ACCESS, node.nodeid, (ACCESS_IN.pack(mask, 0),), req.cred(req.msg.pvnr_cred)))
    return None


# --- open files ----------------------------------------------------------------

def _open(relay, node, mode, cred):
    """Open a FUSE handle for mode (FREAD/FWRITE bits) and record it;
    returns the daemon's open_flags."""
    fh, open_flags = yield from open_handle(relay, node, mode, cred)
    relay.nodes.adopt_handle(node, fh, mode)
    return open_flags


def open_handle(relay, node, mode, cred):
    """OPEN or OPENDIR: (fh, open_flags)."""
    opcode = F.OPENDIR if node.is_dir else F.OPEN
    flags = host_open_flags(mode) if not node.is_dir else os.O_RDONLY
    payload = yield from unless_lacking(relay, FuseRequest(
        opcode, node.nodeid, (OPEN_IN.pack(flags, 0),), cred, OPEN_OUT.size))
    if payload is LACKING:          # a stateless daemon: fh 0, as Linux does
        return 0, 0
    handle = OPEN_OUT.unpack_from(payload)
    if relay.debug.fh:
        LOG.debug("  fh %#x for node %#x mode %#x", handle.fh, node.nodeid, mode)
    return handle.fh, handle.open_flags


def opened(node, open_flags):
    """Remember whether the daemon lets the kernel keep cached pages."""
    if open_flags & FOPEN_KEEP_CACHE:
        node.flags &= ~DROP_PAGES
    else:
        node.flags |= DROP_PAGES


def op_open(relay, req):
    node = req.node
    mode = req.msg.pvnr_mode
    if not node.is_dir and node.flags & DROP_PAGES and node.flags & PAGES_READ:
        # As Linux does unless the last open said FOPEN_KEEP_CACHE: pages
        # cached from before may be stale (a hard link the daemon reports
        # as another node, another client).  Nothing reached the daemon since
        # the last open: nothing new is cached.
        node.flags &= ~PAGES_READ
        for op in (PUFFS_FLUSH_PAGECACHE_NODE_RANGE, PUFFS_INVAL_PAGECACHE_NODE_RANGE):
            yield KernelFlush(op)
    want = mode & (FREAD | FWRITE) or FREAD
    have = (FREAD if node.rfh is not None else 0) | (FWRITE if node.wfh is not None else 0)
    missing = want & ~have
    if missing:
        open_flags = yield from _open(relay, node, missing | (mode & ~(FREAD | FWRITE)),
                                      req.cred(req.msg.pvnr_cred))
        # FOPEN_DIRECT_IO is not passed on as PUFFS_OPEN_IO_DIRECT: with it
        # the kernel trips an assertion when a written file is opened again
        # (puffs_vnop_open flushes without pn_sizemtx).  Without
        # FOPEN_KEEP_CACHE, which direct I/O daemons never give, the pages
        # are dropped at every open all the same.
        opened(node, open_flags)


def handle_for(relay, req, node, mode):
    """A handle usable for mode, opened on demand: page-cache I/O arrives
    after close, and reads (read-modify-write of a page) on files opened
    only for writing.  A write-only handle serves reads only as a last
    resort."""
    fh = node.rfh if mode == FREAD else node.wfh
    if fh is not None:
        return fh
    try:
        yield from _open(relay, node, mode, (0, 0, req.hdr.preq_pid))
    except FuseError:
        if mode != FREAD or node.wfh is None:
            raise
        return node.wfh
    return node.rfh if mode == FREAD else node.wfh


def op_close(relay, req):
    """CLOSE is fire-and-forget: FLUSH the handle so the daemon sees the
    close(2) (write-back errors, POSIX lock release); RELEASE waits for
    INACTIVE, when the kernel drops its last reference."""
    node = req.node
    fh = node.wfh if req.msg.pvnr_fflag & FWRITE else node.rfh
    if fh is None or node.is_dir or relay.session.lacks(F.FLUSH):
        return
    relay.send_detached(FuseRequest(F.FLUSH, node.nodeid,
                                    (FLUSH_IN.pack(fh, 0, 0, req.hdr.preq_pid),),
                                    req.cred(req.msg.pvnr_cred)), node)


def op_inactive(relay, req):
    """The kernel's last reference went: close the node's handles, and have
    the kernel recycle the vnode now.  Left cached, a vnode under
    CACHE_FS_TTL gets an expiry queued for the kernel's sop thread, which
    then deadlocks against an unmount in progress (puffsop_expire ->
    vcache_get -> vfs_busy while dounmount waits for that thread to exit):
    unmount(2) would hang.  Never the root: recycled, it panics the kernel
    (puffs_vnop_reclaim asserts pmp_root)."""
    relay.nodes.release_handles(req.node)
    if req.node is not relay.nodes.root:
        req.hdr.preq_setbacks |= PUFFS_SETBACK_NOREF_N1


def op_reclaim(relay, req):
    relay.nodes.reclaimed(req.node, req.msg.pvnr_nlookup)


def op_read(relay, req):
    msg, node = req.msg, req.node
    if node.is_dir:
        raise PuffsError(E.EISDIR)
    offset, resid = msg.pvnr_offset, msg.pvnr_resid
    # The kernel sizes the message sizeof(struct puffs_vnmsg_rw) + resid:
    # pvnr_data starts inside the struct's tail padding, where there is some.
    data_off = MsgRw.pvnr_data.offset
    if c.sizeof(MsgRw) + resid > len(req.reply):
        raise PuffsError(E.EINVAL, "READ resid beyond its buffer")
    max_read = relay.session.max_read
    # At or past the known end of file: 0 bytes without asking (some
    # daemons say EIO there).  Otherwise ask for what the known size
    # covers, at least one chunk (the file may have grown), in chunks the
    # daemon takes, all in flight at once.
    want = min(resid, max(node.size - offset, max_read)) if offset < node.size else 0
    done = 0
    with relay.nodes.in_use(node):
        if want:
            node.flags |= PAGES_READ
            fh = yield from handle_for(relay, req, node, FREAD)
            cred = req.cred(msg.pvnr_cred)
            chunks = [(offset + pos, min(max_read, want - pos))
                      for pos in range(0, want, max_read)]
            results = yield Gather([FuseRequest(F.READ, node.nodeid,
                                                (READ_IN.pack(fh, off, size, 0, 0, 0, 0),), cred)
                                    for off, size in chunks])
            for (off, size), got in zip(chunks, results):
                if isinstance(got, FuseError):
                    if done:
                        break            # a short read up to the failure
                    raise got
                n = len(got)
                if n > size:
                    raise FuseError(errno.EPROTO, "READ returned more than asked")
                req.reply[data_off + done:data_off + done + n] = got
                done += n
                if n < size:
                    break
    msg.pvnr_resid = resid - done
    return c.sizeof(MsgRw) + done


def op_write(relay, req):
    msg, node = req.msg, req.node
    offset, resid = msg.pvnr_offset, msg.pvnr_resid
    data = memoryview(req.frame)[MsgRw.pvnr_data.offset:]
    if resid > len(data):
        raise PuffsError(E.EINVAL, "WRITE resid beyond its frame")
    done = 0
    with relay.nodes.in_use(node), relay.counting(node, "writing"):
        if resid:
            node.flags |= PAGES_READ
            fh = yield from handle_for(relay, req, node, FWRITE)
            cred, max_write = req.cred(msg.pvnr_cred), relay.session.max_write
            chunks = [(pos, min(max_write, resid - pos)) for pos in range(0, resid, max_write)]
            results = yield Gather([FuseRequest(
                F.WRITE, node.nodeid, (WRITE_IN.pack(fh, offset + pos, size, 0, 0, 0, 0),
                                       data[pos:pos + size]), cred, WRITE_OUT.size)
                for pos, size in chunks])
            for (pos, size), got in zip(chunks, results):
                if isinstance(got, FuseError):
                    raise got
                n = WRITE_OUT.unpack_from(got).size
                done += min(n, size)
                node.size = max(node.size, offset + done)
                if n != size:
                    raise FuseError(errno.EIO, "WRITE answered %d of %d bytes" % (n, size))
    msg.pvnr_resid = 0
    return c.sizeof(MsgRw)


def op_fsync(relay, req):
    node = req.node
    opcode = F.FSYNCDIR if node.is_dir else F.FSYNC
    fh = node.wfh if node.wfh is not None else node.rfh
    if fh is None:
        return
    flags = FUSE_FSYNC_FDATASYNC if req.msg.pvnr_flags & FSYNC_DATAONLY else 0
    if relay.debug.sync:
        LOG.debug("  fsync node %#x flags %#x", node.nodeid, req.msg.pvnr_flags)
    with relay.nodes.in_use(node):
        yield Idle(node, "writing")
        # a daemon without FSYNC has nothing to sync: success, as on Linux
        yield from unless_lacking(relay, FuseRequest(
            opcode, node.nodeid, (FSYNC_IN.pack(fh, flags, 0),), req.cred(req.msg.pvnr_cred)))


def op_seek(relay, req):
    if req.msg.pvnr_newoff < 0:
        raise PuffsError(E.EINVAL)


def op_nothing(relay, req):
    """Ops whose kernel-side semantics need nothing from the daemon."""


# --- directories ----------------------------------------------------------------

NB_DIRENT_PAD = [bytes(n) for n in range(8 + 1)]


def op_readdir(relay, req):
    """Stream a directory: the kernel's offset is the FUSE offset of the next
    entry, so nothing is buffered between calls; the daemon is asked for
    about as many bytes as fit the kernel's buffer once converted."""
    msg, node = req.msg, req.node
    resid = msg.pvnr_resid
    base = MsgReaddir.pvnr_data.offset + msg.pvnr_dentoff
    if base + resid > len(req.reply):
        raise PuffsError(E.EINVAL, "READDIR resid beyond its buffer")
    pid, offset = req.hdr.preq_pid, msg.pvnr_offset
    out = []                     # converted NetBSD dirents
    # In use while listing: no RELEASEDIR of a handle a READDIR is in
    # flight on (passthrough_ll frees the directory under it and crashes).
    with relay.nodes.in_use(node):
        lst = relay.nodes.listing(node, pid, offset)
        while lst is not None and lst.reading:      # another thread of the process
            yield Idle(lst, "reading")
            lst = relay.nodes.listing(node, pid, offset)
        if lst is None:
            fh, _ = yield from open_handle(relay, node, FREAD, req.cred(msg.pvnr_cred))
            lst = relay.nodes.adopt_listing(node, pid, fh)
        if lst.fh is None:
            produced, eof = 0, True
        else:
            with relay.counting(lst, "reading"):
                resid, offset, produced, eof = yield from fetch_listing(relay, req, lst.fh,
                                                                        resid, out)
                if eof:         # before a READDIR waiting goes on with the handle
                    relay.nodes.listing_ended(node, lst, offset)
    if relay.debug.readdir:
        LOG.debug("  readdir node %#x offset %d -> %d, %d entries, %d bytes%s", node.nodeid,
                  msg.pvnr_offset, offset, len(out), produced, ", eof" if eof else "")
    req.reply[base:base + produced] = b"".join(out)
    msg.pvnr_offset = offset if offset < (1 << 63) else offset - (1 << 64)
    msg.pvnr_resid = resid
    msg.pvnr_eofflag = 1 if eof else 0
    return base + produced


def fetch_listing(relay, req, fh, resid, out):
    """READDIR(PLUS) requests from the kernel's offset on until resid bytes
    of NetBSD dirents are in `out` or the directory ends: (resid left, the
    offset to go on from, bytes made, end of directory)."""
    session, node, msg = relay.session, req.node, req.msg
    offset, produced, eof = msg.pvnr_offset, 0, False
    plus = session.lacks(F.READDIR)
    while resid >= nb_dirent_reclen(1) and not eof:
        size = min(session.max_read, max(4096, int(resid * session.readdir_ratio) + 1024))
        payload = yield from unless_lacking(relay, FuseRequest(
            F.READDIRPLUS if plus else F.READDIR, node.nodeid,
            (READ_IN.pack(fh, offset & VNOVAL64, size, 0, 0, 0, 0),), req.cred(msg.pvnr_cred)))
        if payload is LACKING:
            if plus or not session.init_flags & FUSE_DO_READDIRPLUS:
                raise FuseError(errno.ENOSYS)
            plus = True         # a daemon that only lists with READDIRPLUS
            continue
        if not payload:
            eof = True
            break
        resid, offset, made, full = convert_listing(relay, node, bytes(payload), plus, resid,
                                                    offset, out)
        produced += made
        if full:
            break
    return resid, offset, produced, eof


def convert_listing(relay, node, data, plus, resid, offset, out):
    """One READDIR(PLUS) reply into NetBSD dirents appended to `out`, as
    many as `resid` bytes take.  Returns (resid, offset, bytes made, full)
    with offset the FUSE offset of the next entry not converted."""
    pos, full, whole, used, made = 0, False, 0, 0, 0
    lead = ENTRY_OUT.size if plus else 0
    end = len(data)
    unpack_dirent, pack_dirent = DIRENT.struct.unpack_from, NB_DIRENT.pack   # tuples: fast
    while pos + lead + DIRENT.size <= end:
        ino, next_off, namelen, dtype = unpack_dirent(data, pos + lead)
        start = pos + lead + DIRENT.size
        if start + namelen > end:
            # libfuse2 cuts its directory buffer anywhere: like Linux, stop
            # at a partial entry and resume from the last whole one
            break
        name = data[start:start + namelen]
        if plus:
            entry = ENTRY_OUT.unpack_from(data, pos)
            if entry.nodeid and name not in (b".", b".."):
                relay.nodes.unheld(relay.nodes.account_entry(entry, node, name=name))
        pos = start + ((namelen + 7) & ~7)
        whole += 1
        if full:
            continue
        if not namelen or namelen > NB_MAXNAMLEN or b"/" in name or b"\0" in name:
            if not node.flags & NAMES_REFUSED:      # once per directory, not per entry
                node.flags |= NAMES_REFUSED
                LOG.warning("readdir of node %#x: refusing names such as %r", node.nodeid,
                            name[:NB_MAXNAMLEN + 1])
            offset = next_off
            continue
        reclen = nb_dirent_reclen(namelen)
        if reclen > resid:
            full = True
            continue
        if node.names:
            ino = relay.nodes.dirent_ino(node, name, ino)
        out.append(pack_dirent(ino or NB_NO_FILENO, reclen, namelen, dtype & 0xFF) + name
                   + NB_DIRENT_PAD[reclen - NB_DIRENT.size - namelen])
        resid -= reclen
        made += reclen
        used = pos
        offset = next_off
    if not whole:
        raise FuseError(errno.EPROTO, "READDIR reply of %d bytes holds no whole entry" % end)
    if made:
        relay.session.saw_listing(used, made)
    return resid, offset, made, full


def op_readlink(relay, req):
    msg = req.msg
    payload = yield FuseRequest(F.READLINK, req.node.nodeid, (), req.cred(msg.pvnr_cred))
    link = bytes(payload).rstrip(b"\0")
    if len(link) > min(msg.pvnr_linklen, NB_MAXPATHLEN):
        raise PuffsError(E.ENAMETOOLONG)
    msg.pvnr_link = link
    msg.pvnr_linklen = len(link)


# --- file system ------------------------------------------------------------

def op_statvfs(relay, req):
    fill_statvfs(req.msg.pvfsr_sb, (yield from _statfs(relay)), relay.session)


def _statfs(relay):
    payload = yield FuseRequest(F.STATFS, FUSE_ROOT_ID, (), (0, 0, 0), STATFS_OUT.size)
    statfs = STATFS_OUT.unpack_from(payload)
    relay.session.saw_statfs(statfs)
    return statfs


def fill_statvfs(sb, st, session):
    """A FUSE Kstatfs record -> NetBSD struct statvfs."""
    sb.f_flag = session.mount_flags
    sb.f_bsize = st.bsize or 512
    sb.f_frsize = st.frsize or st.bsize or 512
    sb.f_iosize = sb.f_bsize
    sb.f_blocks, sb.f_bfree, sb.f_bavail = st.blocks, st.bfree, st.bavail
    sb.f_bresvd = max(0, st.bfree - st.bavail)
    sb.f_files, sb.f_ffree, sb.f_favail, sb.f_fresvd = st.files, st.ffree, st.ffree, 0
    sb.f_namemax = st.namelen or NB_MAXNAMLEN
    sb.f_owner = session.owner_uid


def op_sync(relay, req):
    """VFS_SYNC (periodic from the syncer): files are synced by per-vnode
    FSYNC, so there is nothing more to ask the daemon."""
    if relay.debug.sync:
        LOG.debug("  sync, waitfor %d", req.msg.pvfsr_waitfor)


def op_unmount(relay, req):
    relay.unmount_begins()
    if not relay.daemon_gone:
        try:
            yield FuseRequest(F.DESTROY, FUSE_ROOT_ID, ())
        except FuseError as e:
            LOG.info("DESTROY: %s", os.strerror(e.errno))


PATHCONF_VALUES = {
    PATHCONF_NAMES["_PC_LINK_MAX"]: 32767, PATHCONF_NAMES["_PC_PATH_MAX"]: 1024,
    PATHCONF_NAMES["_PC_PIPE_BUF"]: 512, PATHCONF_NAMES["_PC_CHOWN_RESTRICTED"]: 1,
    PATHCONF_NAMES["_PC_NO_TRUNC"]: 1, PATHCONF_NAMES["_PC_FILESIZEBITS"]: 64,
    PATHCONF_NAMES["_PC_SYMLINK_MAX"]: 1024, PATHCONF_NAMES["_PC_2_SYMLINKS"]: 1,
    PATHCONF_NAMES["_PC_MAX_CANON"]: 255, PATHCONF_NAMES["_PC_MAX_INPUT"]: 255,
    PATHCONF_NAMES["_PC_VDISABLE"]: 0xFF,
}


def op_pathconf(relay, req):
    name = req.msg.pvnr_name
    if name == PATHCONF_NAMES["_PC_NAME_MAX"]:
        if relay.session.namemax is None:
            try:
                yield from _statfs(relay)
            except FuseError:
                pass
        req.msg.pvnr_retval = relay.session.namemax or NB_MAXNAMLEN
    elif name in PATHCONF_VALUES:
        req.msg.pvnr_retval = PATHCONF_VALUES[name]
    else:
        raise PuffsError(E.EINVAL)


# --- locks -----------------------------------------------------------------

def op_advlock(relay, req):
    msg, node = req.msg, req.node
    fl, op, flags = msg.pvnr_fl, msg.pvnr_op, msg.pvnr_flags
    fh = node.rfh if node.rfh is not None else node.wfh
    if fh is None:
        # The handles went at INACTIVE while the kernel still locks through
        # a cached vnode: nothing is locked without a handle, so an unlock
        # is done; a lock opens one, as page-cache I/O does.
        if op == NB_F_UNLCK or fl.l_type == NB_F_UNLCK:
            return
        fh = yield from handle_for(relay, req, node, FREAD)
    if op == NB_F_UNLCK:
        ltype = NB_F_UNLCK
    elif fl.l_type in LOCK_TYPE_TO_HOST:
        ltype = fl.l_type
    else:
        raise PuffsError(E.EINVAL)
    start = fl.l_start + (node.size if fl.l_whence == SEEK_END else 0)
    if fl.l_len == 0:
        end = OFFSET_MAX
    elif fl.l_len > 0:
        end = start + fl.l_len - 1
    else:
        start, end = start + fl.l_len, start - 1
    if start < 0 or end < start:
        raise PuffsError(E.EINVAL)
    lk_flags = 0
    if flags & NB_F_FLOCK:
        owner = msg.pvnr_id
        if relay.session.init_flags & FUSE_FLOCK_LOCKS:
            lk_flags = FUSE_LK_FLOCK
    else:
        owner = req.hdr.preq_pid   # POSIX locks belong to the process
    if op == NB_F_GETLK:
        opcode = F.GETLK
    else:
        opcode = F.SETLKW if flags & NB_F_WAIT and ltype != NB_F_UNLCK else F.SETLK
    body = LK_IN.pack(fh, owner, start, end, LOCK_TYPE_TO_HOST[ltype],
                      fl.l_pid & 0xFFFFFFFF, lk_flags, 0)
    try:
        with relay.nodes.in_use(node):
            payload = yield FuseRequest(opcode, node.nodeid, (body,), req.cred(),
                                        LK_OUT.size if opcode == F.GETLK else 0)
    except FuseError as e:
        # Not remembered as lacking: flock(2) and fcntl(2) locks share the
        # opcodes, and a daemon may implement one kind only.
        raise PuffsError(E.EOPNOTSUPP) if e.errno == errno.ENOSYS else e
    if opcode == F.GETLK:
        lock = LK_OUT.unpack_from(payload)
        fl.l_type = LOCK_TYPE_TO_NETBSD.get(lock.type, NB_F_UNLCK)
        if fl.l_type != NB_F_UNLCK:
            # off_t and pid_t are signed: what the daemon says beyond them is clamped
            start = min(lock.start, OFFSET_MAX)
            fl.l_start, fl.l_whence, fl.l_pid = start, SEEK_SET, min(lock.pid, 0x7FFFFFFF)
            fl.l_len = 0 if lock.end >= OFFSET_MAX else max(lock.end - start + 1, 0)


# --- extended attributes ----------------------------------------------------------

def xattr_name(ns, name):
    """NetBSD (namespace, name) -> the daemon's prefixed name."""
    if ns == EXTATTR_NAMESPACE_USER:
        return name if name.startswith(b"user.") else b"user." + name
    if ns == EXTATTR_NAMESPACE_SYSTEM:
        return name if name.startswith(SYSTEM_XATTR_PREFIXES) else b"system." + name
    raise PuffsError(E.EINVAL, "unknown extattr namespace %d" % ns)


def _xattr_op(relay, req, opcode, parts, min_reply=0):
    try:
        payload = yield from unless_lacking(relay, FuseRequest(
            opcode, req.node.nodeid, parts, req.cred(req.msg.pvnr_cred), min_reply))
    except FuseError as e:
        if e.errno == getattr(errno, "ENODATA", None) and not linux_xattr_call(req):
            # extattr_*(2) callers expect ENOATTR; the Linux-style
            # getxattr(2) path (full "user." names) probes for ENODATA
            raise PuffsError(E.ENOATTR)
        raise
    if payload is LACKING:
        raise PuffsError(E.EOPNOTSUPP)
    return payload


def linux_xattr_call(req):
    """The kernel passes the full prefixed name on the getxattr(2) path and
    the bare name with a namespace on the extattr_*(2) path."""
    name = bytes(getattr(req.msg, "pvnr_attrname", b""))
    return name.startswith(b"user.") or name.startswith(SYSTEM_XATTR_PREFIXES)


def _check_system_ns(req):
    ns = req.msg.pvnr_attrnamespace
    kcred = req.msg.pvnr_cred
    if (ns == EXTATTR_NAMESPACE_SYSTEM and kcred.pkcr_type == PUFFCRED_TYPE_UUC
            and kcred.pkcr_uuc.cr_uid != 0):
        raise PuffsError(E.EPERM)


def op_getextattr(relay, req):
    msg = req.msg
    _check_system_ns(req)
    name = xattr_name(msg.pvnr_attrnamespace, bytes(msg.pvnr_attrname))
    resid = msg.pvnr_resid
    base = MsgGetextattr.pvnr_data.offset
    if base + resid > len(req.reply):
        raise PuffsError(E.EINVAL)
    payload = yield from _xattr_op(relay, req, F.GETXATTR,
                                   (XATTR_SIZE.pack(resid, 0), name, b"\0"))
    if resid == 0:
        msg.pvnr_datasize = XATTR_SIZE.unpack_from(payload).size
        return None
    n = len(payload)
    req.reply[base:base + n] = payload
    msg.pvnr_datasize = n
    msg.pvnr_resid = resid - n
    return base + n


def op_setextattr(relay, req):
    msg = req.msg
    _check_system_ns(req)
    name = xattr_name(msg.pvnr_attrnamespace, bytes(msg.pvnr_attrname))
    base = MsgSetextattr.pvnr_data.offset
    value = bytes(req.frame[base:base + msg.pvnr_resid])
    if len(value) != msg.pvnr_resid:
        raise PuffsError(E.EINVAL, "SETEXTATTR resid beyond its frame")
    yield from _xattr_op(relay, req, F.SETXATTR,
                         (XATTR_SIZE.pack(len(value), 0), name, b"\0", value))
    msg.pvnr_resid = 0
    return c.sizeof(MsgSetextattr)


def op_listextattr(relay, req):
    msg = req.msg
    ns = msg.pvnr_attrnamespace
    sized = yield from _xattr_op(relay, req, F.LISTXATTR, (XATTR_SIZE.pack(0, 0),),
                                 XATTR_SIZE.size)
    size = XATTR_SIZE.unpack_from(sized).size
    raw = b""
    if size:
        raw = bytes((yield from _xattr_op(relay, req, F.LISTXATTR,
                                          (XATTR_SIZE.pack(size, 0),))))
    out = bytearray()
    for full in raw.split(b"\0"):
        if not full:
            continue
        system = full.startswith(SYSTEM_XATTR_PREFIXES)
        if system != (ns == EXTATTR_NAMESPACE_SYSTEM):
            continue
        if msg.pvnr_flag & PUFFS_EXTATTR_LIST_LENPREFIX:
            # extattr_list_file(2): bare names, length-prefixed
            for prefix in (b"user.", b"system."):
                if full.startswith(prefix):
                    full = full[len(prefix):]
                    break
            out += bytes((min(len(full), 255),)) + full[:255]
        else:
            out += full + b"\0"       # listxattr(2): full Linux-style names
    base = MsgListextattr.pvnr_data.offset
    msg.pvnr_datasize = len(out)
    n = min(len(out), msg.pvnr_resid, max(0, len(req.reply) - base))
    req.reply[base:base + n] = out[:n]
    msg.pvnr_resid -= n
    return base + n


def op_deleteextattr(relay, req):
    msg = req.msg
    _check_system_ns(req)
    name = xattr_name(msg.pvnr_attrnamespace, bytes(msg.pvnr_attrname))
    yield from _xattr_op(relay, req, F.REMOVEXATTR, (name, b"\0"))


# --- space ---------------------------------------------------------------------------

def op_fallocate(relay, req):
    node = req.node
    if relay.session.lacks(F.FALLOCATE):
        raise PuffsError(E.EOPNOTSUPP)
    fh = yield from handle_for(relay, req, node, FWRITE)
    with relay.nodes.in_use(node):
        reply = yield from unless_lacking(relay, FuseRequest(F.FALLOCATE, node.nodeid, (
            FALLOCATE_IN.pack(fh, req.msg.pvnr_off, req.msg.pvnr_len, 0, 0),), req.cred()))
    if reply is LACKING:
        raise PuffsError(E.EOPNOTSUPP)
    node.size = max(node.size, req.msg.pvnr_off + req.msg.pvnr_len)


def op_poll(relay, req):
    node = req.node
    fh = node.rfh if node.rfh is not None else node.wfh
    events = req.msg.pvnr_events
    ready = events & NB_POLL_FILE_READY
    if fh is None:
        req.msg.pvnr_events = ready
        return
    with relay.nodes.in_use(node):
        payload = yield from unless_lacking(relay, FuseRequest(
            F.POLL, node.nodeid, (POLL_IN.pack(fh, 0, 0, events),), req.cred(), POLL_OUT.size))
    req.msg.pvnr_events = ready if payload is LACKING else POLL_OUT.unpack_from(payload).revents


class Op:
    """One row of the PUFFS op table."""

    __slots__ = ("name", "layout", "run", "needs_node", "data_in", "cred_field")

    def __init__(self, name, layout, run, needs_node=True):
        self.name, self.layout, self.run, self.needs_node = name, layout, run, needs_node
        self.data_in = name in ("WRITE", "SETEXTATTR")
        # the caller's credentials, which the access policy checks
        self.cred_field = next((f for f, t in layout._fields_ if t is PuffsKcred), None)


VN, VFS = PUFFSOP_VN, PUFFSOP_VFS
OPS = {(VN, PUFFS_VN[name]): Op(name, layout, run) for name, layout, run in (
    ("LOOKUP", MsgLookup, op_lookup),
    ("CREATE", MsgCreate, op_create),
    ("MKNOD", MsgCreate, op_mknod),
    ("MKDIR", MsgCreate, op_mkdir),
    ("SYMLINK", MsgSymlink, op_symlink),
    ("LINK", MsgRemove, op_link),
    ("REMOVE", MsgRemove, _remove(F.UNLINK)),
    ("RMDIR", MsgRemove, _remove(F.RMDIR)),
    ("RENAME", MsgRename, op_rename),
    ("OPEN", MsgOpen, op_open),
    ("CLOSE", MsgClose, op_close),
    ("ACCESS", MsgAccess, op_access),
    ("GETATTR", MsgAttr, op_getattr),
    ("SETATTR", MsgAttr, op_setattr),
    ("READ", MsgRw, op_read),
    ("WRITE", MsgRw, op_write),
    ("POLL", MsgPoll, op_poll),
    ("FSYNC", MsgFsync, op_fsync),
    ("SEEK", MsgSeek, op_seek),
    ("MMAP", MsgMmap, op_nothing),
    ("ABORTOP", MsgAbortop, op_nothing),
    ("READDIR", MsgReaddir, op_readdir),
    ("READLINK", MsgReadlink, op_readlink),
    ("INACTIVE", MsgInactive, op_inactive),
    ("RECLAIM", MsgReclaim, op_reclaim),
    ("PATHCONF", MsgPathconf, op_pathconf),
    ("ADVLOCK", MsgAdvlock, op_advlock),
    ("GETEXTATTR", MsgGetextattr, op_getextattr),
    ("SETEXTATTR", MsgSetextattr, op_setextattr),
    ("LISTEXTATTR", MsgListextattr, op_listextattr),
    ("DELETEEXTATTR", MsgDeleteextattr, op_deleteextattr),
    # fdiscard(2) arrives as FALLOCATE too (puffs_vnop_fdiscard sends the
    # FALLOCATE op number): no FDISCARD reaches a file server.
    ("FALLOCATE", MsgFallocate, op_fallocate),
)}
OPS.update({(VFS, PUFFS_VFS[name]): Op("VFS_" + name, layout, run, False)
            for name, layout, run in (
    ("UNMOUNT", MsgVfsUnmount, op_unmount),
    ("STATVFS", MsgVfsStatvfs, op_statvfs),
    ("SYNC", MsgVfsSync, op_sync),
)})
# Ops the kernel sends only when asked through the vnopmask.  POLL is left
# out by default: the NetBSD kernel reads a poll reply's events only when rv
# is non-zero (see README), while genfs_poll's "always ready" is right for
# files; PERFUSE_OPTIONS=enable_poll turns it on.
DEFAULT_VNOPS = {name for (cls, _), op in OPS.items() if cls == VN
                 for name in [op.name]} - {"LOOKUP", "POLL"}
# ---------------------------------------------------------------------------
# 8. Relay
# ---------------------------------------------------------------------------

# Seconds between the daemon's death and the request to unmount: the
# kernel's threads first take the daemon's last replies.  A forced unmount
# deadlocks with a lookup that got its reply and is about to make the vnode
# (it holds the directory's lock and waits in vfs_busy for mnt_unmounting,
# which dounmount holds while vflush waits for that directory's lock).
UNMOUNT_GRACE = 0.2
# Seconds the kernel gets to unmount after the request, before perfused
# closes the device (which fails whatever still waits, then force-unmounts):
# NetBSD's own unmount can wait on a process blocked in the file system.
UNMOUNT_PATIENCE = 5
# Seconds after which perfused unmounts by path itself if the kernel has not
# begun: its own attempt (PUFFSOP_UNMOUNT) is made once and fails with EBUSY
# when any process is inside the file system at that instant.
UNMOUNT_BY_PATH_AFTER = 0.5
NB_MNT_FORCE = 0x80000      # unmount(2): even if files are open
FRAMES_PER_WAKEUP = 64      # kernel frames, then FUSE replies, served in turn
REPLIES_PER_WAKEUP = 256
FORGETS_PER_BATCH = 4096


class InFlight:
    """A FUSE request awaiting its reply: the translator to resume, or a
    detached request whose reply is only logged, or one member of a Gather."""

    __slots__ = ("gen", "req", "fuse", "gather", "index", "node", "sent")

    def __init__(self, gen, req, fuse, gather=None, index=0, node=None):
        self.gen, self.req, self.fuse = gen, req, fuse
        self.gather, self.index, self.node = gather, index, node
        self.sent = 0.0         # when it went to the daemon (daemon_timeout)


class AbortSwitch:
    """How an administrator's request to abort a mount (SIGTERM to the
    serving process, perfused -a) reaches the relay loop: pull() is safe in
    a signal handler or another thread; the loop watches fileno()."""

    def __init__(self):
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self.why = None

    def fileno(self):
        return self._r

    def pull(self, why):
        self.why = self.why or why
        try:
            os.write(self._w, b"!")
        except BlockingIOError:
            pass

    def close(self):
        os.close(self._r)
        os.close(self._w)


class Relay:
    """Moves requests between one PuffsDevice and one FuseChannel for one
    Session, the NodeTable keeping what the two sides share.

    Methods for the loop:
        run()                  the selectors loop, until the kernel side ends
        shutdown()             answer whatever is still waiting
    The kernel side (one PuffsRequest per frame):
        on_kernel_frame(f)     decode, find the node, start the translator
        finish(req, rv, len)   the one reply to a request; FAF ones get none
        send_flush(...)        a PUFFSOP_FLUSH of ours to the kernel
    The FUSE side (one InFlight per unique):
        send_fuse(freq, i)     pack, number and queue a FUSE request
        send_detached(...)     one whose reply is only logged (FLUSH, RELEASE)
        on_fuse_reply(...)     resume the translator waiting for the unique
        fail(unique, errno)    the one way a request in flight fails
        daemon_died(why)       fail everything, ask the kernel to unmount
        unmount_out_of_patience()  after it: ask the kernel, then umount -f
    Translators call send_detached, unmount_begins, counting (what an Idle
    yield waits out) and read `session`, `nodes`, `debug`, `daemon_gone`;
    nothing else writes the Relay's state.
    """

    def __init__(self, device, channel, session, options=None):
        options = options or {}
        self.device, self.channel, self.session = device, channel, session
        self.nodes = NodeTable(self.send_release, options.get("keep_unheld", 2048))
        self.debug = options.get("debug") or Debug()
        self.trace = options.get("trace")
        self.inflight = {}              # unique -> InFlight
        self.kernel_waiting = {}        # our FLUSH's id -> InFlight of the translator waiting
        self.idle_waiters = {}          # (owner, counter) -> InFlights waiting for 0 (Idle)
        self.flush_id = OUR_REQUEST_IDS
        self.daemon_gone = self.kernel_gone = self.unmounting = False
        self.unmount_due = 0.0          # when to ask the kernel to unmount (daemon gone)
        self.unmount_requested = 0.0    # when we asked it
        self.unmounter = None           # the thread unmounting by path, once started
        self.abort_switch = options.get("abort")
        self.aborted = None             # why the mount was aborted, if it was
        self._spare = []                # large reply buffers to reuse

    # --- the FUSE side ---------------------------------------------------

    def send_fuse(self, freq, inflight):
        """Queue freq; its reply goes to `inflight` (None: no reply comes)."""
        if self.daemon_gone:
            raise FuseError(errno.ENXIO, "daemon gone")
        unique = self.channel.new_unique()
        record = freq.pack(unique)
        if inflight is not None:
            inflight.fuse = freq
            inflight.sent = time.monotonic()
            self.inflight[unique] = inflight
        if self.debug.fuse:
            why = "no reply" if inflight is None else (
                inflight.req.op.name if inflight.req else "detached")
            LOG.debug("> fuse %s unique %d nodeid %#x len %d (for %s)",
                      FUSE_OPNAMES.get(freq.opcode, freq.opcode), unique, freq.nodeid,
                      sum(map(len, record)), why)
        try:
            self.channel.send(unique, record)
        except MessageTooLong as e:
            LOG.error("request %d: %s", e.unique, e)
            if e.unique == unique:      # this one: its caller gets the error
                self.inflight.pop(unique, None)
                raise FuseError(errno.EMSGSIZE)
            # An earlier one fails; the records behind it go from the loop,
            # so that no translator is resumed while it is sending.
            self.fail(e.unique, errno.EMSGSIZE)
        except EOFError:
            self.inflight.pop(unique, None)
            self.daemon_died("send failed")
            raise FuseError(errno.ENXIO, "daemon gone")
        if self.channel.pending_output and self.debug.requeue:
            LOG.debug("  daemon socket full: %d records queued", self.channel.queued)
        return unique

    def send_detached(self, freq, node):
        """A request whose reply only needs logging (FLUSH at close,
        RELEASE); in flight on the node until answered."""
        self.nodes.busy(node)
        try:
            self.send_fuse(freq, InFlight(None, None, None, node=node))
        except FuseError as e:
            LOG.warning("%s not sent: %s", FUSE_OPNAMES[freq.opcode], strerror(e.errno))
            self.nodes.idle(node)

    def send_release(self, node, fh):
        """The node table's RELEASE: counted as in flight on the node."""
        opcode = F.RELEASEDIR if node.is_dir else F.RELEASE
        if self.session.lacks(opcode) or self.session.lacks(F.OPENDIR if node.is_dir else F.OPEN):
            return      # nothing was opened, or the daemon keeps no open state
        if self.debug.fh:
            LOG.debug("  release fh %#x of node %#x", fh, node.nodeid)
        self.send_detached(FuseRequest(opcode, node.nodeid, (RELEASE_IN.pack(fh, 0, 0, 0),)),
                           node)

    def flush_forgets(self):
        forgets = self.nodes.take_forgets()
        if not forgets or self.daemon_gone or self.unmounting:
            return
        if self.debug.reclaim:
            LOG.debug("forget %s", ", ".join("%#x:%d" % f for f in forgets))
        try:
            if len(forgets) == 1 or self.session.minor < 16:
                for nodeid, count in forgets:
                    self.send_fuse(FuseRequest(F.FORGET, nodeid, (FORGET_IN.pack(count),)), None)
            else:
                for i in range(0, len(forgets), FORGETS_PER_BATCH):
                    batch = forgets[i:i + FORGETS_PER_BATCH]
                    parts = [BATCH_FORGET_IN.pack(len(batch), 0)]
                    parts += [FORGET_ONE.pack(n, k) for n, k in batch]
                    self.send_fuse(FuseRequest(F.BATCH_FORGET, 0, tuple(parts)), None)
        except FuseError:
            pass

    def on_fuse_reply(self, unique, err, payload):
        if self.debug.dump:
            LOG.debug("fuse reply %d error %d:\n%s", unique, err, hexdump(payload))
        if unique == 0:
            self.on_notification(err, payload)
            return
        inflight = self.inflight.pop(unique, None)
        if inflight is None:
            LOG.warning("reply for unknown unique %d dropped", unique)
            return
        opname = FUSE_OPNAMES.get(inflight.fuse.opcode)
        if self.debug.fuse:
            LOG.debug("< fuse %s unique %d error %d len %d", opname, unique, err, len(payload))
        if inflight.gen is None:                # detached
            self.nodes.idle(inflight.node)
            if err == -errno.ENOSYS:
                self.session.mark_lacking(inflight.fuse.opcode)
            elif err:
                LOG.warning("%s of node %#x failed: %s", opname, inflight.fuse.nodeid,
                            strerror(-err))
            return
        if err > 0 or err < -MAX_ERRNO:
            LOG.error("%s: malformed error %d in reply", opname, err)
            self.deliver(inflight, exc=FuseError(errno.EPROTO))
        elif err < 0:
            self.deliver(inflight, exc=FuseError(-err))
        elif len(payload) < inflight.fuse.min_reply:
            LOG.error("%s: reply of %d bytes, %d expected", opname, len(payload),
                      inflight.fuse.min_reply)
            self.deliver(inflight, exc=FuseError(errno.EPROTO))
        else:
            self.deliver(inflight, value=payload)

    def on_notification(self, code, payload):
        """Daemon-initiated cache invalidation becomes a PUFFSOP_FLUSH."""
        try:
            if code == FUSE_NOTIFY_INVAL_INODE:
                inval = NOTIFY_INVAL_INODE.unpack_from(payload)
                node = self.nodes.current(inval.ino)
                if node is not None and inval.off >= 0:
                    end = inval.off + inval.len if inval.len > 0 else 0
                    self.send_flush(node.cookie, PUFFS_INVAL_PAGECACHE_NODE_RANGE, inval.off, end)
            elif code in (FUSE_NOTIFY_INVAL_ENTRY, FUSE_NOTIFY_DELETE):
                node = self.nodes.current(NOTIFY_INVAL_ENTRY.unpack_from(payload).parent)
                if node is not None:
                    self.send_flush(node.cookie, PUFFS_INVAL_NAMECACHE_DIR, 0, 0)
            else:
                LOG.info("notification %d ignored", code)
        except struct.error:
            LOG.warning("malformed notification %d ignored", code)

    def fail(self, unique, host_errno):
        """Request `unique` fails with host_errno: its translator gets the
        error, a detached one no longer keeps its node busy."""
        inflight = self.inflight.pop(unique, None)
        if inflight is None:
            return
        if inflight.gen is not None:
            self.deliver(inflight, exc=FuseError(host_errno))
        else:
            self.nodes.idle(inflight.node)

    def fail_inflight(self, host_errno):
        """Answer everything waiting for the daemon with an error."""
        for unique in sorted(self.inflight):
            self.fail(unique, host_errno)

    def daemon_died(self, why):
        if self.daemon_gone:
            return
        LOG.warning("file system daemon gone (%s): unmounting", why)
        self.daemon_gone = True
        self.fail_inflight(errno.ENXIO)
        # Nor does anything wait for the kernel's FLUSH answers: the kernel
        # serves them in the thread that unmounts, and an unmount that needs
        # a request of ours answered would never come.
        waiting, self.kernel_waiting = self.kernel_waiting, {}
        for inflight in waiting.values():
            self.resume(inflight, exc=FuseError(errno.ENXIO))
        self.unmount_due = time.monotonic() + UNMOUNT_GRACE

    def abort(self, why):
        """Linux's connection abort: everything in flight and all that
        follows fails, the kernel is asked to unmount (forcibly, as PUFFS
        does it), and the daemon sees its channel closed."""
        if self.daemon_gone:
            return
        LOG.error("aborting the mount: %s", why)
        self.aborted = why
        self.daemon_died("aborted")
        try:
            self.channel.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def overdue(self):
        """The seconds until the oldest request in flight passes the mount's
        daemon_timeout (None: no limit, or nothing in flight); 0 when it has."""
        limit = self.session.daemon_timeout
        if not limit or not self.inflight or self.daemon_gone:
            return None
        oldest = next(iter(self.inflight.values()))     # dicts keep the order of sending
        return max(0.0, oldest.sent + limit - time.monotonic())

    # --- the kernel side -------------------------------------------------

    def send_flush(self, cookie, op, start, end):
        """A PUFFSOP_FLUSH request of ours; returns its id."""
        self.flush_id += 1
        frame = bytearray(c.sizeof(MsgFlush))
        msg = MsgFlush.from_buffer(frame)
        msg.pf_cookie, msg.pf_op, msg.pf_start, msg.pf_end = cookie, op, start, end
        self.write_kernel(kernel_request(frame, msg.pr, PUFFSOP_FLUSH, self.flush_id))
        return self.flush_id

    def request_unmount(self):
        """Ask the kernel to unmount us (the daemon went away)."""
        if self.unmount_requested or self.kernel_gone or self.unmounting:
            return
        self.unmount_requested = time.monotonic()
        frame = bytearray(c.sizeof(PuffsReq))
        self.write_kernel(kernel_request(frame, PuffsReq.from_buffer(frame), PUFFSOP_UNMOUNT,
                                         OUR_REQUEST_IDS | 0xDEAD))

    def unmount_out_of_patience(self):
        """The steps after the daemon died, one per turn of the loop: ask
        the kernel to unmount once UNMOUNT_GRACE is over, unmount by path
        if it has not begun UNMOUNT_BY_PATH_AFTER later, and True once
        UNMOUNT_PATIENCE is out too (the loop ends, the device closes)."""
        now = time.monotonic()
        if now >= self.unmount_due:
            self.request_unmount()
        if not self.unmount_requested:
            return False
        waited = now - self.unmount_requested
        if waited > UNMOUNT_PATIENCE:
            LOG.warning("kernel did not unmount: closing the device")
            return True
        if waited > UNMOUNT_BY_PATH_AFTER and not self.unmounting:
            self.unmount_by_path()
        return False

    def unmount_by_path(self):
        """umount -f of the mount point, as an administrator would, retried
        while EBUSY until the kernel begins the unmount (VFS_UNMOUNT) or the
        device ends.  In a thread: unmount(2) returns only once this loop
        has answered VFS_UNMOUNT."""
        if self.unmounter is not None or self.device.unmount is None \
                or self.device.target is None:
            return

        def unmount():
            while not (self.kernel_gone or self.unmounting) and \
                    time.monotonic() - self.unmount_requested < UNMOUNT_PATIENCE:
                try:
                    self.device.unmount(self.device.target, NB_MNT_FORCE)
                    return
                except OSError as e:
                    if e.errno not in (errno.EBUSY, errno.EINVAL, errno.ENOENT):
                        LOG.warning("%s", e)
                    if e.errno != errno.EBUSY:      # EINVAL: gone by now
                        return
                time.sleep(0.05)
        LOG.info("the kernel has not unmounted %s: unmounting it", self.device.target)
        self.unmounter = threading.Thread(target=unmount, name="unmount", daemon=True)
        self.unmounter.start()

    def counting(self, owner, counter):
        """`with relay.counting(node, "writing"):` around requests that a
        translator yielding Idle(node, "writing") waits out."""
        return Scope(self._count_up, self._count_down, (owner, counter))

    @staticmethod
    def _count_up(key):
        owner, counter = key
        setattr(owner, counter, getattr(owner, counter) + 1)

    def _count_down(self, key):
        owner, counter = key
        left = getattr(owner, counter) - 1
        setattr(owner, counter, left)
        if not left:
            for inflight in self.idle_waiters.pop(key, ()):
                self.resume(inflight)

    def unmount_begins(self):
        """VFS_UNMOUNT arrived: the last FORGETs go before DESTROY, and the
        kernel is never asked to unmount again."""
        self.flush_forgets()
        self.unmounting = True

    def write_kernel(self, frame):
        try:
            self.device.write_frame(frame)
        except EOFError:
            self.kernel_gone = True
        except OSError as e:
            # The frame cannot be written (a stand-in device with small
            # buffers): a request still gets one answer, an error.
            self.device.drop_pending(frame)
            LOG.error("writing a %d-byte frame to the kernel: %s", len(frame), e.strerror)
            hdr = PuffsReq.from_buffer_copy(bytes(frame[:c.sizeof(PuffsReq)]))
            if hdr.preq_opclass & PUFFSOPFLAG_ISRESPONSE and len(frame) > c.sizeof(PuffsReq):
                self.write_kernel(error_reply(frame, E.EIO))

    def on_kernel_frame(self, frame):
        if self.debug.dump:
            LOG.debug("kernel frame:\n%s", hexdump(frame))
        if len(frame) < c.sizeof(PuffsReq):
            LOG.error("kernel frame of %d bytes ignored", len(frame))
            return
        hdr = PuffsReq.from_buffer_copy(frame[:c.sizeof(PuffsReq)])
        opclass = hdr.preq_opclass
        faf = bool(opclass & PUFFSOPFLAG_FAF)
        if hdr.preq_framelen != len(frame):
            LOG.error("kernel frame of %d bytes says %d: refused", len(frame), hdr.preq_framelen)
            if not faf:
                self.write_kernel(error_reply(frame, E.EINVAL))
            return
        if opclass & PUFFSOPFLAG_ISRESPONSE:
            # The kernel's answer to a FLUSH or UNMOUNT request of ours.
            if hdr.preq_rv:
                LOG.info("kernel answered request %#x with %d", hdr.preq_id, hdr.preq_rv)
            waiter = self.kernel_waiting.pop(hdr.preq_id, None)
            if waiter is not None:
                self.resume(waiter, hdr.preq_rv)
            return
        cls = opclass & PUFFSOP_OPCMASK
        if cls == PUFFSOP_ERROR:
            msg = MsgError.from_buffer_copy(frame.ljust(c.sizeof(MsgError), b"\0"))
            LOG.error("kernel reports error %d (type %d): %s", msg.perr_error,
                      hdr.preq_optype, msg.perr_str.decode(errors="replace"))
            return
        op = OPS.get((cls, hdr.preq_optype))
        try:
            node = self._node_for(op, hdr, len(frame))
        except PuffsError as e:
            if not faf:
                self.write_kernel(error_reply(frame, e.errno))
            return
        req = PuffsRequest(self._reply_buffer(op, frame, hdr), op, node, frame)
        if op.cred_field and not faf and self.session.refuses(req.msg, op.cred_field):
            self.finish(req, E.EACCES, None)
            return
        if self.debug.puffs:
            LOG.debug("> puffs %s id %d cookie %#x%s", op.name, hdr.preq_id,
                      hdr.preq_cookie, " FAF" if faf else "")
        if self.debug.puffs or self.trace is not None and self.trace.enabled:
            req.started = time.monotonic()
        try:
            result = op.run(self, req)
        except (FuseError, PuffsError) as e:
            self.finish(req, translate_error(e), None)
            return
        except Exception:
            LOG.exception("%s failed", op.name)
            self.finish(req, E.EIO, None)
            return
        if isinstance(result, types.GeneratorType):
            self.resume(InFlight(result, req, None))
        else:
            self.finish(req, 0, result)

    def _node_for(self, op, hdr, length):
        """The node a request is for (None for VFS ops); PuffsError when
        the request cannot be served."""
        if op is None:
            LOG.warning("unsupported op class %d type %d", hdr.preq_opclass & PUFFSOP_OPCMASK,
                        hdr.preq_optype)
            raise PuffsError(E.EOPNOTSUPP)
        if length < c.sizeof(op.layout):
            LOG.error("%s frame of %d bytes, shorter than its struct: refused", op.name, length)
            raise PuffsError(E.EINVAL)
        if not op.needs_node:
            return None
        node = self.nodes.get(hdr.preq_cookie)
        if node is None:
            LOG.warning("%s for unknown cookie %#x", op.name, hdr.preq_cookie)
            raise PuffsError(E.ENOENT)
        if node.flags & STALE and op.name not in ("INACTIVE", "RECLAIM"):
            raise PuffsError(E.ESTALE)      # the daemon's node id names another file now
        return node

    def _reply_buffer(self, op, frame, hdr):
        """The reply buffer: the fixed part for data that flows in only
        (WRITE, SETEXTATTR; the data is read from the frame itself), else
        what the kernel allocated (preq_buflen; the real kernel never
        exceeds PUFFS_MSG_MAXSIZE, a stand-in may).  Large ones are reused,
        so that big READs do not map and fault in fresh memory each time."""
        fixed = c.sizeof(op.layout)
        if op.data_in:
            return bytearray(frame[:fixed])
        size = max(len(frame), min(hdr.preq_buflen, MAX_REPLY_BUFFER), fixed)
        buf = None
        if size >= LARGE_REPLY:
            buf = next((self._spare.pop(i) for i, b in enumerate(self._spare)
                        if len(b) >= size), None)
        buf = buf or bytearray(size)
        buf[:len(frame)] = frame
        return buf

    def resume(self, inflight, value=None, exc=None):
        """Run a translator until it waits for FUSE or finishes."""
        gen, req = inflight.gen, inflight.req
        while True:
            try:
                if exc is not None:
                    e, exc = exc, None
                    freq = gen.throw(e)
                else:
                    freq = gen.send(value)
            except StopIteration as stop:
                self.finish(req, 0, stop.value)
                return
            except (FuseError, PuffsError) as e:
                if isinstance(e, FuseError) and e.errno == errno.EPROTO:
                    LOG.error("%s: %s", req.op.name, e.args[1] if len(e.args) > 1 else "EPROTO")
                self.finish(req, translate_error(e), None)
                return
            except Exception:     # a translator bug must not wedge the kernel
                LOG.exception("%s failed", req.op.name)
                self.finish(req, E.EIO, None)
                return
            if isinstance(freq, Idle):
                if getattr(freq.owner, freq.counter):
                    self.idle_waiters.setdefault((freq.owner, freq.counter), []).append(
                        inflight)
                    return
                value = None
                continue
            if isinstance(freq, KernelFlush):
                if self.daemon_gone:
                    value, exc = None, FuseError(errno.ENXIO, "daemon gone")
                    continue
                self.kernel_waiting[self.send_flush(req.node.cookie, freq.op, freq.start,
                                                    freq.end)] = inflight
                return
            if isinstance(freq, Gather):
                for i, member in enumerate(freq.requests):
                    try:
                        self.send_fuse(member, InFlight(gen, req, member, gather=freq, index=i))
                    except FuseError as e:
                        freq.results[i] = e
                        freq.left -= 1
                if freq.left:
                    return
                value = freq.results
                continue
            try:
                self.send_fuse(freq, InFlight(gen, req, freq))
                return
            except FuseError as e:
                value, exc = None, e

    def deliver(self, inflight, value=None, exc=None):
        """A reply (or failure) for an in-flight request of a translator."""
        gather = inflight.gather
        if gather is None:
            self.resume(inflight, value, exc)
            return
        gather.left -= 1
        # payloads live in the channel's buffer until its next receive: the
        # last one to arrive is used in place, earlier ones are copied
        if exc is not None:
            gather.results[inflight.index] = exc
        else:
            gather.results[inflight.index] = value if gather.left == 0 else bytes(value)
        if gather.left == 0:
            self.resume(inflight, gather.results)

    def finish(self, req, nb_errno, length):
        """The reply to req: its buffer up to `length` (None: the op's fixed
        size), or the fixed part alone with an error."""
        hdr = req.hdr
        if req.started:
            elapsed = time.monotonic() - req.started
            if self.trace is not None and self.trace.enabled:
                self.trace.record(req.op.name, elapsed)
            if self.debug.puffs:
                LOG.debug("< puffs %s id %d rv %d (%.3f ms)", req.op.name, hdr.preq_id,
                          nb_errno, elapsed * 1e3)
        if req.faf:
            if nb_errno:
                level = logging.ERROR if req.op.name in ("WRITE", "SETATTR") else logging.INFO
                LOG.log(level, "fire-and-forget %s on cookie %#x failed with errno %d%s",
                        req.op.name, hdr.preq_cookie, nb_errno,
                        " (data lost)" if req.op.name == "WRITE" else "")
            return
        if nb_errno or length is None:
            length = c.sizeof(req.op.layout)
        # Never answer with more than the kernel allocated: it would wedge.
        seal_reply(hdr, nb_errno, min(length, hdr.preq_buflen, len(req.reply)))
        length = hdr.preq_framelen
        del hdr
        req.msg = req.hdr = None
        view = memoryview(req.reply)[:length]
        self.write_kernel(view)
        if len(req.reply) >= LARGE_REPLY and not self.device.pending_output \
                and len(self._spare) < SPARE_REPLY_BUFFERS:
            view.release()
            self._spare.append(req.reply)

    def describe_inflight(self):
        return ["%s unique %d nodeid %#x%s" % (
            FUSE_OPNAMES.get(i.fuse.opcode, i.fuse.opcode), unique, i.fuse.nodeid,
            " for PUFFS %s" % i.req.op.name if i.req is not None else "")
            for unique, i in sorted(self.inflight.items())]

    # --- the loop --------------------------------------------------------

    def run(self):
        sel = selectors.DefaultSelector()
        dev_fd, chan_fd = self.device.fileno(), self.channel.fileno()
        os.set_blocking(dev_fd, False)
        self.channel.sock.setblocking(False)
        sel.register(dev_fd, selectors.EVENT_READ, "dev")
        sel.register(chan_fd, selectors.EVENT_READ, "fuse")
        if self.abort_switch is not None:
            sel.register(self.abort_switch.fileno(), selectors.EVENT_READ, "abort")
        dev_mask = chan_mask = selectors.EVENT_READ
        try:
            while not self.kernel_gone:
                if self.daemon_gone and self.unmount_out_of_patience():
                    break
                wait = self.overdue()
                if wait == 0:
                    self.abort("no answer from the daemon within daemon_timeout=%g s"
                               % self.session.daemon_timeout)
                    continue
                for key, mask in sel.select(0.1 if self.daemon_gone else wait):
                    if key.data == "abort":
                        sel.unregister(key.fd)
                        self.abort(self.abort_switch.why or "requested")
                    elif key.data == "dev":
                        if mask & selectors.EVENT_WRITE:
                            self._flush_device()
                        if mask & selectors.EVENT_READ:
                            self._drain_device()
                    else:
                        if mask & selectors.EVENT_WRITE:
                            self._flush_channel()
                        if mask & selectors.EVENT_READ:
                            self._drain_channel(sel)
                self.flush_forgets()
                want_dev = selectors.EVENT_READ | (
                    selectors.EVENT_WRITE if self.device.pending_output else 0)
                if want_dev != dev_mask and not self.kernel_gone:
                    sel.modify(dev_fd, want_dev, "dev")
                    dev_mask = want_dev
                if not self.daemon_gone:
                    want_chan = selectors.EVENT_READ | (
                        selectors.EVENT_WRITE if self.channel.pending_output else 0)
                    if want_chan != chan_mask:
                        sel.modify(chan_fd, want_chan, "fuse")
                        chan_mask = want_chan
        finally:
            sel.close()

    def _flush_device(self):
        try:
            self.device.flush()
        except EOFError:
            self.kernel_gone = True

    def _flush_channel(self):
        while True:
            try:
                self.channel.flush()
                return
            except EOFError:
                self.daemon_died("socket closed")
                return
            except MessageTooLong as e:
                LOG.error("request %d: %s", e.unique, e)
                self.fail(e.unique, errno.EMSGSIZE)

    def _drain_device(self):
        for _ in range(FRAMES_PER_WAKEUP):
            try:
                frame = self.device.read_frame()
            except EOFError as e:
                if not self.unmounting:
                    LOG.info("kernel side closed: %s", e)
                self.kernel_gone = True
                return
            if frame is None:
                return
            self.on_kernel_frame(frame)

    def _drain_channel(self, sel):
        for _ in range(REPLIES_PER_WAKEUP):
            try:
                got = self.channel.receive()
            except BlockingIOError:
                return
            except EOFError as e:
                sel.unregister(self.channel.fileno())
                self.daemon_died(str(e))
                return
            except ProtocolError as e:
                LOG.error("malformed FUSE reply%s: %s",
                          " to request %d" % e.unique if e.unique else "", e)
                if e.unique:
                    self.fail(e.unique, errno.EIO)
                continue
            if got is None:
                if not self.channel.reassembling:
                    return
                continue
            self.on_fuse_reply(*got)

    def shutdown(self):
        """Teardown after the loop: answer what is still waiting."""
        if not self.kernel_gone:
            self.fail_inflight(errno.ENXIO)
        self.inflight.clear()
        if self.unmounter is not None:
            self.unmounter.join(UNMOUNT_PATIENCE)


def seal_reply(hdr, nb_errno, length):
    """Make a request header the header of its reply: every reply frame to
    the kernel is finished here.  preq_rv is a NetBSD errno, always."""
    hdr.preq_rv = nb_errno if 0 <= nb_errno <= NETBSD_ELAST else E.EIO
    hdr.preq_opclass |= PUFFSOPFLAG_ISRESPONSE
    hdr.preq_framelen = length


def error_reply(frame, nb_errno):
    """A reply of the request header alone (56 bytes never exceed
    preq_buflen), carrying an error."""
    reply = bytearray(frame[:c.sizeof(PuffsReq)])
    seal_reply(PuffsReq.from_buffer(reply), nb_errno, len(reply))
    return reply


def kernel_request(frame, hdr, opclass, preq_id):
    """A request of ours to the kernel (FLUSH, UNMOUNT) in `frame`."""
    hdr.preq_framelen = hdr.preq_buflen = len(frame)
    hdr.preq_id, hdr.preq_opclass = preq_id, opclass
    return frame


def hexdump(data, limit=256):
    """-d dump: the first bytes of a frame, 16 a line."""
    data = bytes(data[:limit])
    return "\n".join("  %04x  %s" % (i, data[i:i + 16].hex(" "))
                     for i in range(0, len(data), 16))


class Debug:
    """-d types; attributes are read on every request, so keep them flat."""

    TYPES = ("fuse", "puffs", "dump", "fh", "reclaim", "readdir", "requeue",
             "sync", "misc", "filename")

    def __init__(self, types=()):
        self.set(types)

    def set(self, types):
        types = set(types)
        for t in self.TYPES:
            setattr(self, t, t in types)

    def enabled(self):
        return [t for t in self.TYPES if getattr(self, t)]


def parse_debug_types(text):
    types = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in types if t not in Debug.TYPES]
    if bad:
        raise ValueError("unknown debug type %s" % ", ".join(bad))
    return types


def parse_perfuse_options(text):
    """PERFUSE_OPTIONS: enable_/disable_ access, creat, poll, advlock."""
    out = {}
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        for prefix, value in (("enable_", True), ("disable_", False)):
            if word.startswith(prefix) and word[len(prefix):] in ("access", "creat", "poll",
                                                                  "advlock"):
                out[word[len(prefix):]] = value
                break
        else:
            LOG.warning("PERFUSE_OPTIONS: unknown option %r ignored", word)
    return out


class Trace:
    """SIGUSR1 trace: per-op count/min/avg/max latency."""

    def __init__(self):
        self.enabled = False
        self.stats = {}
        self.target = ""
        self.inflight = None      # set by the relay: describes what is waiting

    def record(self, name, seconds):
        st = self.stats.get(name)
        if st is None:
            self.stats[name] = [1, seconds, seconds, seconds]
        else:
            st[0] += 1
            st[1] = min(st[1], seconds)
            st[2] += seconds
            st[3] = max(st[3], seconds)

    def report(self):
        inflight = self.inflight() if self.inflight else ()
        lines = ["%-16s %8s %10s %10s %10s" % ("op", "count", "min ms", "avg ms", "max ms")]
        for name, (n, lo, total, hi) in sorted(self.stats.items()):
            lines.append("%-16s %8d %10.3f %10.3f %10.3f" % (name, n, lo * 1e3,
                                                              total / n * 1e3, hi * 1e3))
        lines.append("in flight: %d" % len(inflight))
        for item in inflight:
            lines.append("  %s" % item)
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# 9. Mount handshake and serve_connection
# ---------------------------------------------------------------------------

# sysexits(3)
EX_OK, EX_USAGE, EX_UNAVAILABLE, EX_SOFTWARE, EX_OSERR, EX_PROTOCOL, EX_NOPERM = \
    0, 64, 69, 70, 71, 76, 77



class PerfuseMountOut(c.Structure):
    """struct perfuse_mount_out (lib/libperfuse/perfuse_if.h) in the host's
    C layout (56 bytes on LP64 ports, 52 on i386), the strings after it.
    The magic "noFuseRq" is not checked, as by the C perfused.  libperfuse
    has the same definition; a test holds them equal."""
    _fields_ = [("pmo_len", c.c_uint32), ("pmo_error", c.c_int32), ("pmo_unique", c.c_uint64),
                ("pmo_magic", c.c_char * 9), ("pmo_source_len", c.c_uint32),
                ("pmo_target_len", c.c_uint32), ("pmo_filesystemtype_len", c.c_uint32),
                ("pmo_mountflags", c.c_uint32), ("pmo_data_len", c.c_uint32),
                ("pmo_sock_len", c.c_uint32)]


class MountRequest:
    """The perfuse mount request a daemon sends before FUSE_INIT."""

    FIELDS = ("source", "target", "fstype", "data", "sock")

    def __init__(self, source, target, fstype, mountflags, data, sock=None):
        self.source, self.target, self.fstype = source, target, fstype
        self.mountflags, self.data, self.sock = mountflags, data, sock

    @classmethod
    def parse(cls, record):
        if len(record) < c.sizeof(PerfuseMountOut):
            raise ValueError("mount request of %d bytes is too short" % len(record))
        head = PerfuseMountOut.from_buffer_copy(record[:c.sizeof(PerfuseMountOut)])
        if head.pmo_len != len(record):
            raise ValueError("mount request says %d bytes, got %d" % (head.pmo_len, len(record)))
        pos, values = c.sizeof(PerfuseMountOut), {}
        for name, n in zip(cls.FIELDS, (head.pmo_source_len, head.pmo_target_len,
                                        head.pmo_filesystemtype_len, head.pmo_data_len,
                                        head.pmo_sock_len)):
            if n == 0:
                values[name] = None
                continue
            raw = bytes(record[pos:pos + n])
            if len(raw) != n or not raw.endswith(b"\0"):
                raise ValueError("mount request field %s is malformed" % name)
            values[name] = os.fsdecode(raw[:-1])
            pos += n
        if not values["target"]:
            raise ValueError("mount request without a target")
        return cls(values["source"], values["target"], values["fstype"], head.pmo_mountflags,
                   values["data"], values["sock"])


def peer_credentials(sock, ancdata=()):
    """(pid, uid, gid) of the peer: SCM_CREDS on NetBSD, else SO_PEERCRED
    (Linux) or LOCAL_PEEREID (NetBSD)."""
    for level, ctype, data in ancdata:
        if level == socket.SOL_SOCKET and ctype == SCM_CREDS and len(data) >= SOCKCRED.size:
            pid, _uid, euid, _gid, egid = SOCKCRED.unpack_from(data)
            return pid, euid, egid
    if hasattr(socket, "SO_PEERCRED"):
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("=3i"))
        return struct.unpack("=3i", raw)
    raw = sock.getsockopt(SOL_LOCAL, LOCAL_PEEREID, 12)   # struct unpcbid: pid, euid, egid
    return struct.unpack("=iII", raw)


MOUNT_REQUEST_MAX = 65536      # a header and five strings: a larger record is refused
MAX_READ_LIMIT = 16 << 20       # the largest max_read= taken


def read_mount_request(sock, timeout=30.0):
    """Block until the whole mount request record arrives."""
    sock.settimeout(timeout)
    try:
        record, ancdata, _flags, _ = sock.recvmsg(MOUNT_REQUEST_MAX, socket.CMSG_SPACE(128))
    except socket.timeout:
        raise ValueError("no mount request within %g s" % timeout)
    finally:
        sock.settimeout(None)
    if not record:
        raise ValueError("connection closed before the mount request")
    creds = peer_credentials(sock, ancdata)
    if IS_NETBSD:
        try:
            sock.setsockopt(SOL_LOCAL, LOCAL_CREDS, 0)     # only the first message
        except OSError:
            pass
    return MountRequest.parse(record), creds


def mount_options(data):
    """The mount options perfused acts on, from the request's comma list:
    allow_other, allow_root, default_permissions (True when given),
    daemon_timeout=N (seconds a request may wait for the daemon before the
    mount is aborted) and max_read=N (the largest READ reply the daemon's socket buffer takes;
    without it 128 KiB, which a default-sized socket carries and which the
    NetBSD kernel never exceeds anyway).  Others are the daemon's."""
    out = {}
    for opt in (data or "").split(","):
        name, _, value = opt.partition("=")
        if name in ("allow_other", "allow_root", "default_permissions") and not value:
            out[name] = True
        elif name == "max_read":
            try:
                out[name] = max(PAGE_SIZE, min(int(value, 0), MAX_READ_LIMIT))
            except ValueError:
                LOG.warning("ignoring mount option %r", opt)
        elif name == "daemon_timeout":
            try:
                out[name] = float(value)
                if not 0 < out[name] < 1e9:
                    raise ValueError
            except ValueError:
                out.pop(name, None)
                LOG.warning("ignoring mount option %r", opt)
    return out


FUSE_CONF = "/etc/fuse.conf"
DEFAULT_MOUNT_MAX = 1000


def fuse_conf(path=FUSE_CONF):
    """What fusermount's policy file allows users who are not root:
    (user_allow_other, mount_max).  A missing file allows neither option
    and 1000 mounts."""
    allow_other, mount_max = False, DEFAULT_MOUNT_MAX
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return allow_other, mount_max
    for line in lines:
        words = line.split("#", 1)[0].replace("=", " = ").split()
        if words == ["user_allow_other"]:
            allow_other = True
        elif len(words) == 3 and words[:2] == ["mount_max", "="] and words[2].isdigit():
            mount_max = int(words[2])
        elif words:
            LOG.warning("%s: ignoring %r", path, line)
    return allow_other, mount_max


def no_other_mounts(_uid):
    """mount_max's count where nobody else's mounts are known: a perfused
    serving one connection (-i, -f) holds this one alone."""
    return 0


def check_mount_permission(uid, target, mountflags):
    """root mounts anywhere; others on a directory they own with read (and
    write unless read-only) permission.  Returns None or the reason."""
    if uid == 0:
        return None
    try:
        st = os.stat(target)
    except OSError as e:
        return "%s: %s" % (target, e.strerror)
    if not stat.S_ISDIR(st.st_mode):
        return "%s is not a directory" % target
    if st.st_uid != uid:
        return "%s is not owned by uid %d" % (target, uid)
    need = stat.S_IRUSR | (0 if mountflags & NETBSD_MNT["MNT_RDONLY"] else stat.S_IWUSR)
    if st.st_mode & need != need:
        return "%s lacks owner %s permission" % (
            target, "read" if mountflags & NETBSD_MNT["MNT_RDONLY"] else "read/write")
    return None


def build_kargs(relay, mreq, root_attr, statfs, puffs_flags):
    """struct puffs_kargs for the mount: the vnopmask from what the session
    serves, the root from its attributes, statvfs from the daemon's."""
    session = relay.session
    kargs = PuffsKargs()
    kargs.pa_vers = PUFFSVERSION
    kargs.pa_fd = relay.device.fileno()
    if not session.kernel_may_cache:
        puffs_flags = puffs_flags & ~PUFFS_KFLAG_CACHE_FS_TTL | PUFFS_KFLAG_NOCACHE_NAME
    kargs.pa_flags = puffs_flags & PUFFS_KFLAG_MASK
    kargs.pa_nhashbuckets = PUFFS_HASH_BUCKETS
    ops = set(DEFAULT_VNOPS)
    if not session.advlock:
        ops.discard("ADVLOCK")    # the kernel then keeps fcntl locks itself
    if session.poll:
        ops.add("POLL")
    for name in ops:
        kargs.pa_vnopmask[PUFFS_VN[name]] = 1
    fstype = (mreq.fstype or "fuse")
    kargs.pa_typename = ("perfuse|" + fstype).encode()[:31]
    kargs.pa_mntfromname = os.fsencode(mreq.source or "/dev/fuse")[:1023]
    kargs.pa_root_cookie = relay.nodes.root.cookie
    kargs.pa_root_vtype = VDIR
    kargs.pa_root_vsize = min(root_attr.size, NB_MAX_FILE_SIZE)
    kargs.pa_root_rdev = 0
    if statfs is not None:
        fill_statvfs(kargs.pa_svfsb, statfs, session)
    kargs.pa_time32 = 0        # time_t is 64-bit on every NetBSD port
    return bytes(kargs)


class Refused(Exception):
    """A connection that ends before the relay runs, with a sysexits status."""

    def __init__(self, status, why):
        super().__init__(why)
        self.status = status


def accept_mount_request(sock, policy_file=FUSE_CONF, mounts_of=no_other_mounts):
    """The mount request, the sender's pid and uid, and the NetBSD mount
    flags to use; Refused when the request is bad or not allowed: root
    mounts anywhere with any option; another user on a directory of their
    own, with allow_other or allow_root only where the policy file says
    user_allow_other, and below its mount_max mounts."""
    try:
        mreq, (pid, uid, _gid) = read_mount_request(sock)
    except (ValueError, OSError) as e:
        raise Refused(EX_PROTOCOL, "bad mount request: %s" % e)
    flags = netbsd_mount_flags(mreq.mountflags)
    options = mount_options(mreq.data)
    if options.get("allow_other") and options.get("allow_root"):
        raise Refused(EX_NOPERM, "mount refused for uid %d: allow_other and allow_root "
                                 "exclude each other" % uid)
    why = check_mount_permission(uid, mreq.target, flags)
    if why:
        raise Refused(EX_NOPERM, "mount refused for uid %d: %s" % (uid, why))
    if uid != 0:
        user_allow_other, mount_max = fuse_conf(policy_file)
        for option in ("allow_other", "allow_root"):
            if options.get(option) and not user_allow_other:
                raise Refused(EX_NOPERM, "mount refused for uid %d: option %s needs "
                                         "user_allow_other in %s" % (uid, option, policy_file))
        held = mounts_of(uid)
        if held >= mount_max:
            raise Refused(EX_NOPERM, "mount refused for uid %d: %d mounts held, mount_max %d "
                                     "in %s" % (uid, held, mount_max, policy_file))
        flags |= NETBSD_MNT["MNT_NOSUID"] | NETBSD_MNT["MNT_NODEV"]
    return mreq, pid, uid, flags


def open_device():
    try:
        return PuffsDevice()
    except OSError as e:
        raise Refused(EX_OSERR, "/dev/puffs: %s" % e.strerror)


def fuse_handshake(channel, mreq, uid, flags, options):
    """FUSE_INIT, the root's attributes and the file system's statfs (None
    when the daemon has none): (session, root Attr, Kstatfs)."""
    given = mount_options(mreq.data)
    try:
        session = negotiate_init(
            channel, given.get("max_read", options.get("max_read", DEFAULT_MAX_READ)),
            mount_flags=flags, owner_uid=uid, options=given, perfuse_options=options.get(
                "perfuse_options", os.environ.get("PERFUSE_OPTIONS", "")))
        root = ATTR_OUT.unpack_from(fuse_exchange(channel, FuseRequest(
            F.GETATTR, FUSE_ROOT_ID, (GETATTR_IN.pack(0, 0, 0),))))
        try:
            statfs = STATFS_OUT.unpack_from(fuse_exchange(channel, FuseRequest(
                F.STATFS, FUSE_ROOT_ID, ())))
            session.saw_statfs(statfs)
        except FuseError:
            statfs = None
    except (FuseError, EOFError, struct.error) as e:
        raise Refused(EX_PROTOCOL, "FUSE handshake with %s failed: %s"
                      % (mreq.source or "daemon", e))
    return session, root.attr, statfs


def serve_connection(sock, device=None, **options):
    """Serve one FUSE daemon connection from mount request to teardown.

    Reads the perfuse mount request, checks the caller may mount there,
    negotiates FUSE_INIT, performs the PUFFS mount on `device` (a
    PuffsDevice; /dev/puffs when None), relays until the kernel side ends or
    the daemon exits, and closes `sock`.  Returns an exit status in the
    sysexits(3) sense (0 on a normal end).  Thread safe: touches no process
    state.  Options: debug (Debug), trace (Trace), perfuse_options (str),
    bufsize, max_read, puffs_flags, keep_unheld, policy_file (instead of
    /etc/fuse.conf), mounts_of (uid -> mounts held, for mount_max), abort
    (an AbortSwitch), announce (called with the mount point once mounted).
    An aborted mount (the switch, daemon_timeout) ends with EX_UNAVAILABLE.
    """
    relay = None
    own_device = device is None
    try:
        try:
            mreq, pid, uid, flags = accept_mount_request(
                sock, options.get("policy_file", FUSE_CONF),
                options.get("mounts_of", no_other_mounts))
            if own_device:
                device = open_device()
            channel = FuseChannel(sock, options.get("bufsize"))
            session, root, statfs = fuse_handshake(channel, mreq, uid, flags, options)
            relay = Relay(device, channel, session, options)
            remember_attr(relay.nodes.root, root)
            if relay.trace is not None:
                relay.trace.target = mreq.target
                relay.trace.inflight = relay.describe_inflight
            kargs = build_kargs(relay, mreq, root, statfs,
                                options.get("puffs_flags", DEFAULT_KFLAGS))
            try:
                device.mount(mreq.target, flags, kargs)
            except (OSError, ValueError) as e:
                raise Refused(EX_OSERR, "mount %s: %s" % (mreq.target, e))
        except Refused as e:
            LOG.error("%s", e)
            return e.status
        options.get("announce", lambda target: None)(mreq.target)
        LOG.info("mounted %s on %s for uid %d (pid %d)", mreq.source, mreq.target, uid, pid)
        try:
            relay.run()
        except Exception:          # a bug: leave a trace, tear down all the same
            LOG.exception("relay for %s failed", mreq.target)
            return EX_SOFTWARE
        finally:
            relay.shutdown()
        return EX_UNAVAILABLE if relay.aborted else EX_OK
    finally:
        end_connection(relay, sock, device if own_device else None)


def end_connection(relay, sock, own_device):
    """Teardown: DESTROY for a daemon whose kernel side went away without
    an UNMOUNT, the socket closed, and a device of our own closed (on
    NetBSD that also forces a stale mount away)."""
    if relay is not None and not relay.daemon_gone and not relay.unmounting:
        try:
            relay.channel.sock.setblocking(True)
            relay.channel.sock.sendmsg(FuseRequest(F.DESTROY, FUSE_ROOT_ID).pack(
                relay.channel.new_unique()))
        except OSError:
            pass
    try:
        sock.close()
    except OSError:
        pass
    if own_device is not None:
        own_device.close()


# ---------------------------------------------------------------------------
# 10. Daemon and command line: perfused [-fs] [-d types] [-i fd]
# ---------------------------------------------------------------------------

USAGE = "usage: perfused [-fs] [-a mountpoint] [-d types] [-i fd]"


def main(argv=None):
    import getopt
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, args = getopt.getopt(argv, "fsa:d:i:")
    except getopt.GetoptError as e:
        print("perfused: %s\n%s" % (e, USAGE), file=sys.stderr)
        return EX_USAGE
    if args:
        print(USAGE, file=sys.stderr)
        return EX_USAGE
    foreground, toggle_signal, inherited_fd, types = False, False, None, []
    try:
        for opt, val in opts:
            if opt == "-a":
                return abort_mount(val)
            if opt == "-f":
                foreground = True
                types.append("misc")
            elif opt == "-s":
                toggle_signal = True
            elif opt == "-d":
                types += parse_debug_types(val)
            elif opt == "-i":
                inherited_fd = int(val)
                foreground = True
    except ValueError as e:
        print("perfused: %s\n%s" % (e, USAGE), file=sys.stderr)
        return EX_USAGE
    setup_logging(foreground, bool(types))
    debug = Debug(types)
    trace = Trace()
    install_signals(debug, trace, toggle_signal)
    device = None
    if os.environ.get("PUFFS_COMFD"):
        # libpuffs' convention, for one process serving one device at a time
        if not foreground:
            print("perfused: PUFFS_COMFD needs -f or -i", file=sys.stderr)
            return EX_USAGE
        comfd = int(os.environ["PUFFS_COMFD"])
        device = PuffsDevice(comfd, comfd_mount(comfd))
    if inherited_fd is not None:
        return serve_abortable(socket.socket(fileno=inherited_fd), device,
                               debug=debug, trace=trace)
    return listen_forever(debug, trace, foreground, device)


def run_file(target, kind):
    """/var/run/perfused-<mount point>.<kind>: the trace, and the pid of the
    process serving the mount (which perfused -a reads)."""
    name = os.path.normpath(os.path.abspath(target)).strip("/").replace("/", "-")
    return "/var/run/perfused-%s.%s" % (name or "root", kind)


def serve_abortable(conn, device=None, switch=None, **options):
    """serve_connection as a serving process runs it: SIGTERM aborts the
    mount (pulls `switch`), and the pid file names this process to
    perfused -a."""
    switch = switch or AbortSwitch()
    written = []

    def announce(target):
        path = run_file(target, "pid")
        try:
            with open(path + ".tmp", "w") as f:
                f.write("%d\n" % os.getpid())
            os.replace(path + ".tmp", path)
            written.append(path)
        except OSError as e:
            LOG.warning("%s: %s", path, e.strerror)
    signal.signal(signal.SIGTERM, lambda *_: switch.pull("SIGTERM"))
    try:
        return serve_connection(conn, device, abort=switch, announce=announce, **options)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for path in written:
            try:
                os.unlink(path)
            except OSError:
                pass
        switch.close()


def abort_mount(target):
    """perfused -a: abort the mount on target, as Linux's connection abort
    does: its requests fail, the kernel unmounts it, its daemon sees EOF."""
    path = run_file(target, "pid")
    try:
        with open(path) as f:
            pid = int(f.read())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError) as e:
        print("perfused: no perfused serves %s (%s)" % (target, getattr(e, "strerror", e)),
              file=sys.stderr)
        return EX_UNAVAILABLE
    return EX_OK


def setup_logging(foreground, verbose):
    root = logging.getLogger("perfused")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("perfused[%(process)d]: %(message)s"))
    else:
        address = next((p for p in ("/var/run/log", "/dev/log") if os.path.exists(p)),
                       ("localhost", 514))
        handler = logging.handlers.SysLogHandler(
            address, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter("perfused[%(process)d]: %(message)s"))
    root.addHandler(handler)


def install_signals(debug, trace, toggle_signal):
    saved = {"types": []}

    def toggle_debug(_sig, _frame):
        current = debug.enabled()
        debug.set(saved["types"])
        saved["types"] = current
        LOG.info("debug output %s", "on" if debug.enabled() else "off")

    def toggle_trace(_sig, _frame):
        trace.enabled = not trace.enabled
        if trace.enabled:
            LOG.info("trace recording")
        else:
            path = run_file(trace.target or "/", "trace")
            try:
                with open(path + ".tmp", "w") as f:     # readers never see half a trace
                    f.write(trace.report())
                os.replace(path + ".tmp", path)
                LOG.info("trace written to %s", path)
            except OSError as e:
                LOG.error("trace %s: %s", path, e)
            trace.stats.clear()

    if toggle_signal:
        sig = getattr(signal, "SIGINFO", signal.SIGUSR2)
        signal.signal(sig, toggle_debug)
        # Debug output starts disabled and SIGINFO turns it on.
        toggle_debug(None, None)
    signal.signal(signal.SIGUSR1, toggle_trace)


LISTEN_BACKLOG = 16
SOCKET_MODE = 0o666         # every user may connect; the mount request is checked


def bind_listener(path):
    """The listening socket at path, which never exists with another mode:
    bind(2) creates it with the umask giving SOCKET_MODE (no chmod after).
    A stale socket there is replaced; anything else is left alone and
    refused."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, "exists and is not a socket")
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    umask = os.umask(0o777 & ~SOCKET_MODE)      # single-threaded here: nobody else sees it
    try:
        listener.bind(path)
        if IS_NETBSD:
            # accepted sockets inherit LOCAL_CREDS, so the first message of
            # each connection carries SCM_CREDS
            listener.setsockopt(SOL_LOCAL, LOCAL_CREDS, 1)
        listener.listen(LISTEN_BACKLOG)
    except OSError:
        listener.close()
        raise
    finally:
        os.umask(umask)
    return listener


def listen_forever(debug, trace, foreground, device=None):
    """Accept daemons on the perfused socket: each connection served by a
    child process of its own, or in turn in the foreground (-f)."""
    path = socket_path()
    try:
        listener = bind_listener(path)
    except OSError as e:
        LOG.error("%s: %s", path, e.strerror)
        return EX_OSERR
    if not foreground:
        daemonize()
    serving = {}            # child pid -> uid it serves: the mounts each user holds
    signal.signal(signal.SIGCHLD, lambda *_: reap_children(serving))
    LOG.info("listening on %s", path)
    while True:
        try:
            conn, _ = listener.accept()
        except InterruptedError:
            continue
        if foreground:
            # SIGTERM while a connection is served aborts its mount, and
            # then ends the listener as it would have between connections
            switch = AbortSwitch()
            serve_abortable(conn, device, switch, debug=debug, trace=trace)
            if switch.why is not None:
                return EX_OK
            continue
        try:
            uid = peer_credentials(conn)[1]
        except OSError:
            uid = None
        pid = os.fork()
        if pid == 0:
            listener.close()
            code = EX_SOFTWARE
            try:
                code = serve_abortable(conn, debug=debug, trace=trace, mounts_of=lambda u: sum(
                    1 for held in serving.values() if held == u))
            finally:
                os._exit(code)
        serving[pid] = uid
        conn.close()


def reap_children(serving):
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        serving.pop(pid, None)


def daemonize():
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    fd = os.open(os.devnull, os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(fd, i)


if __name__ == "__main__":
    sys.exit(main())
