#!/usr/bin/env python3
"""make bench and make demo: perfused in front of real daemons, measured or
shown, beside the test suite (test_perfused.py), whose test kernel, daemon
helpers and NetBSD-kernel mounts they reuse.  Not tests: programs a
maintainer runs and reads.

  python3 bench.py bench   the relay's cost next to speaking FUSE directly
  python3 bench.py demo    squashfuse through perfused, what crosses it shown

bench: each workload runs twice against the same daemon in one process:
through the PUFFS test kernel and perfused ("relay"), and through
DirectFuse, a FUSE client with the test kernel's shape minus perfused
("direct").  The ratio relay/direct isolates what perfused adds.
"""

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import perfused
import rumpkernel as rk
from test_perfused import (FREAD, FUSE, FWRITE, OPCLASS_VN, PERFUSED, VN, Mount, NetBSDMount,
                           TestKernel, host_walk, kcred, kernel_walk, libfuse3_example,
                           mount_request, netbsd_tree, squashfs_image, vattr)


class DirectFuse:
    """Speaks FUSE to a daemon itself: the benchmark's no-relay side."""

    def __init__(self, sock):
        self.sock = sock
        self.unique = 0
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.replies = {}
        self.closed = False
        self.buf = bytearray(8 << 20)
        self.reader = threading.Thread(target=self._read_loop, daemon=True)
        init = struct.pack("<IIIII44x", 7, 31, 1 << 20, 0x402029 | 0x2000 | 0x400, 0)
        self.reader.start()
        err, payload = self.call(FUSE["INIT"], 0, init)
        assert err == 0
        self.max_write = struct.unpack_from("<IIIIHHI", payload)[6]

    def _read_loop(self):
        view = memoryview(self.buf)
        partial = None
        while True:
            try:
                n = self.sock.recv_into(self.buf)
            except OSError:
                n = 0
            if not n:
                with self.cond:
                    self.closed = True
                    self.cond.notify_all()
                return
            if partial is not None:
                partial[2].extend(view[:n])
                if len(partial[2]) < partial[1]:
                    continue
                rec, partial = bytes(partial[2]), None
            else:
                length = struct.unpack_from("<I", self.buf)[0]
                if length > n:
                    partial = (None, length, bytearray(view[:n]))
                    continue
                rec = bytes(view[:n])
            length, err, unique = struct.unpack_from("<IiQ", rec)
            with self.cond:
                self.replies[unique] = (err, rec[16:])
                self.cond.notify_all()

    def send(self, opcode, nodeid, *parts):
        with self.lock:
            self.unique += 1
            unique = self.unique
        body = b"".join(parts)
        self.sock.sendall(struct.pack("<IIQQIII4x", 40 + len(body), opcode, unique, nodeid,
                                      0, 0, 0) + body)
        return unique

    def wait(self, unique):
        with self.cond:
            while unique not in self.replies:
                if self.closed:
                    raise EOFError
                self.cond.wait(30)
            return self.replies.pop(unique)

    def call(self, opcode, nodeid, *parts):
        return self.wait(self.send(opcode, nodeid, *parts))


class RelaySide:
    """Workload operations through the test kernel and perfused."""

    name = "relay"

    def __init__(self, kernel):
        self.k = kernel

    def root(self):
        return self.k.root

    def getattr(self, h):
        assert self.k.getattr(h).rv == 0

    def lookup(self, d, name):
        r = self.k.lookup(d, name)
        assert r.rv == 0, r.rv
        return r.newnode

    def forget(self, h):
        self.k.reclaim(h)

    def open(self, h, mode=FREAD):
        assert self.k.open(h, mode).rv == 0
        return h

    def read(self, h, fh, off, size):
        r = self.k.read(h, off, size)
        assert r.rv == 0
        return len(r.data)

    def write(self, h, fh, off, data):
        r = self.k.write(h, off, data)
        assert r.rv == 0 and r.resid == 0

    def listdir(self, h):
        return len(self.k.listdir(h, size=65536))

    def getattr_async(self, h):
        return self.k.send(OPCLASS_VN, VN["GETATTR"], h, kcred() + bytes(4) + vattr() + bytes(16),
                           wait=False)

    def wait(self, token):
        assert self.k.wait(token).rv == 0


class DirectSide:
    """The same operations spoken as FUSE straight to the daemon."""

    name = "direct"

    def __init__(self, fuse):
        self.f = fuse

    def root(self):
        return 1

    def getattr(self, h):
        assert self.f.call(FUSE["GETATTR"], h, struct.pack("<IIQ", 0, 0, 0))[0] == 0

    def lookup(self, d, name):
        err, payload = self.f.call(FUSE["LOOKUP"], d, name.encode() + b"\0")
        assert err == 0
        return struct.unpack_from("<Q", payload)[0]

    def forget(self, h):
        self.f.send(FUSE["FORGET"], h, struct.pack("<Q", 1))

    def open(self, h, mode=FREAD):
        flags = os.O_RDONLY if mode == FREAD else os.O_RDWR
        err, payload = self.f.call(FUSE["OPEN"], h, struct.pack("<II", flags, 0))
        assert err == 0
        return struct.unpack_from("<Q", payload)[0]

    def read(self, h, fh, off, size):
        err, payload = self.f.call(FUSE["READ"], h, struct.pack("<QQIIQII", fh, off, size, 0, 0, 0, 0))
        assert err == 0
        return len(payload)

    def write(self, h, fh, off, data):
        pos = 0
        while pos < len(data):
            chunk = data[pos:pos + self.f.max_write]
            err, payload = self.f.call(FUSE["WRITE"], h, struct.pack(
                "<QQIIQII", fh, off + pos, len(chunk), 0, 0, 0, 0), chunk)
            assert err == 0
            pos += len(chunk)

    def listdir(self, h):
        err, payload = self.f.call(FUSE["OPENDIR"], h, struct.pack("<II", 0, 0))
        fh = struct.unpack_from("<Q", payload)[0]
        count, off = 0, 0
        while True:
            err, payload = self.f.call(FUSE["READDIR"], h, struct.pack(
                "<QQIIQII", fh, off, 65536, 0, 0, 0, 0))
            if not payload:
                break
            pos = 0
            while pos + 24 <= len(payload):
                ino, off, namelen, _ = struct.unpack_from("<QQII", payload, pos)
                pos += (24 + namelen + 7) & ~7
                count += 1
        self.f.call(FUSE["RELEASEDIR"], h, struct.pack("<QIIQ", fh, 0, 0, 0))
        return count

    def getattr_async(self, h):
        return self.f.send(FUSE["GETATTR"], h, struct.pack("<IIQ", 0, 0, 0))

    def wait(self, token):
        assert self.f.wait(token)[0] == 0


class BenchTarget:
    """One daemon, reachable both ways: a relay mount and a direct channel."""

    def __init__(self, argv_fn):
        self.argv_fn = argv_fn

    def __enter__(self):
        return self

    def sides(self):
        """Yield the relay side, then the direct one.  perfused runs as its
        own process (perfused.py -i, the device through PUFFS_COMFD), as on
        NetBSD, so it does not share the test kernel's interpreter lock."""
        k = TestKernel(comfd=True)
        relay_end, daemon_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s_ in (relay_end, daemon_end):
            s_.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        # the daemon's socket takes 1 MiB replies: say so (max_read, as FUSE)
        daemon_end.sendall(mount_request("/dev/fuse", "/mnt", "bench", 0,
                                         "fd=3,max_read=1048576"))
        dev = k._dev_sock.fileno()
        relay = subprocess.Popen(PERFUSED + ["-i", str(relay_end.fileno())],
                                 pass_fds=[relay_end.fileno(), dev],
                                 env=dict(os.environ, PUFFS_COMFD=str(dev)),
                                 stderr=subprocess.DEVNULL)
        relay_end.close()
        k._dev_sock.close()
        fd = daemon_end.fileno()
        daemon = subprocess.Popen(self.argv_fn("/dev/fd/%d" % fd), pass_fds=[fd],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        daemon_end.close()
        assert k.mounted.wait(20), "no mount"
        try:
            yield RelaySide(k)
        finally:
            k.unmount()
            k.close_device()
            for p_ in (relay, daemon):
                try:
                    p_.wait(20)
                except subprocess.TimeoutExpired:
                    p_.kill()
            k.check()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        proc = subprocess.Popen(self.argv_fn("/dev/fd/%d" % b.fileno()), pass_fds=[b.fileno()],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        b.close()
        try:
            yield DirectSide(DirectFuse(a))
        finally:
            a.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __exit__(self, *exc):
        pass


def _timed(fn, repeat):
    """Median seconds of repeat runs of fn()."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def bench(repeat=3):
    """make bench: print the table and the two machine-readable lines."""
    # Every workload against the same daemons, in a fixed order, inside one
    # set of mounts: long, as the run it describes.
    import pathlib
    import platform
    import resource
    import tracemalloc
    passthrough = libfuse3_example("passthrough_ll")
    squashfuse = shutil.which("squashfuse")
    if not squashfuse or not shutil.which("mksquashfs"):
        print("bench: squashfuse and squashfs-tools are needed (sh .ci/run as root)", file=sys.stderr)
        return 1
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="perfused-bench-"))
    rows, ratios = [], {}
    big = 256 << 20

    def record(key, label, unit, relay, direct):
        ratios[key] = relay / direct
        rows.append((label, unit, relay, direct, relay / direct))

    try:
        data = tmp / "data"
        data.mkdir()
        with open(data / "big", "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(big >> 20):
                f.write(chunk)
        (data / "many").mkdir()
        for i in range(10000):
            (data / "many" / ("entry-%05d" % i)).write_bytes(b"")
        (data / "one").write_bytes(b"x")
        img = squashfs_image(tmp, data)
        pt = lambda mp: [passthrough, "-f", "-o", "source=%s" % data, mp]
        sq = lambda mp: [squashfuse, "-f", img, mp]

        # 1. metadata
        with BenchTarget(pt) as t:
            res = {}
            for side in t.sides():
                one = side.lookup(side.root(), "one")
                n = 5000
                res[side.name, "getattr"] = n / _timed(lambda: [side.getattr(one) for _ in range(n)], repeat)
                many = side.lookup(side.root(), "many")
                names = ["entry-%05d" % i for i in range(10000)]

                def lookups():
                    handles = [side.lookup(many, nm) for nm in names]
                    for h in handles:
                        side.forget(h)
                res[side.name, "lookup"] = 10000 / _timed(lookups, repeat)
                res[side.name, "readdir"] = 10000 / _timed(lambda: side.listdir(many), repeat)
            record("metadata", "GETATTR round trips (passthrough_ll)", "ops/s",
                   res["relay", "getattr"], res["direct", "getattr"])
            record("lookup", "LOOKUP of 10,000 names (passthrough_ll)", "ops/s",
                   res["relay", "lookup"], res["direct", "lookup"])
            record("readdir", "READDIR of 10,000 entries (passthrough_ll)", "entries/s",
                   res["relay", "readdir"], res["direct", "readdir"])

        # 2. and 3. sequential READ and WRITE
        for key, label, argv in (("read", "squashfuse", sq), ("ptread", "passthrough_ll", pt)):
            with BenchTarget(argv) as t:
                res = {}
                for side in t.sides():
                    h = side.lookup(side.root(), "big")
                    fh = side.open(h)
                    for size in (64 << 10, 1 << 20):
                        def readall():
                            off = 0
                            while off < big:
                                off += side.read(h, fh, off, size)
                        res[side.name, size] = big / _timed(readall, repeat) / 1e6
                for size, tag in ((64 << 10, "64k"), (1 << 20, "1m")):
                    record(key + tag if key == "read" else "pt_read" + tag,
                           "sequential READ, %s requests (%s)" % (tag.upper(), label), "MB/s",
                           res["relay", size], res["direct", size])
        with BenchTarget(pt) as t:
            res = {}
            payload = os.urandom(1 << 20)
            for side in t.sides():
                if side.name == "relay":
                    r = side.k.create(side.root(), "w-relay")
                    h, fh = r.newnode, None
                    side.open(h, FWRITE)
                else:
                    err, out = side.f.call(FUSE["CREATE"], 1, struct.pack("<IIII", os.O_RDWR | os.O_CREAT, 0o644, 0, 0), b"w-direct\0")
                    h = struct.unpack_from("<Q", out)[0]
                    fh = struct.unpack_from("<Q", out, 128)[0]

                def writeall():
                    for off in range(0, big, 1 << 20):
                        side.write(h, fh, off, payload)
                res[side.name] = big / _timed(writeall, repeat) / 1e6
            record("write1m", "sequential WRITE, 1M requests (passthrough_ll)", "MB/s",
                   res["relay"], res["direct"])

        # 5. requests in flight against a multi-threaded daemon
        with BenchTarget(pt) as t:
            res = {}
            for side in t.sides():
                files = [side.lookup(side.root(), "one")]
                for depth in (64, 256):
                    total = 20000

                    def flight():
                        pending = []
                        for i in range(total):
                            pending.append(side.getattr_async(files[0]))
                            if len(pending) >= depth:
                                side.wait(pending.pop(0))
                        for tok in pending:
                            side.wait(tok)
                    res[side.name, depth] = total / _timed(flight, repeat)
            for depth in (64, 256):
                record("inflight%d" % depth, "%d GETATTRs in flight (passthrough_ll)" % depth,
                       "ops/s", res["relay", depth], res["direct", depth])

        # 6. what the write-through page cache costs, through NetBSD's kernel
        cache = write_through_cost(passthrough, data, repeat)

        # 7. memory per node held by perfused, and after the kernel reclaims
        many_entries = tmp / "nodes"
        many_entries.mkdir()
        for i in range(100000):
            (many_entries / ("n%06d" % i)).write_bytes(b"")
        nodes_img = str(tmp / "nodes.squashfs")
        subprocess.run(["mksquashfs", str(many_entries), nodes_img, "-quiet", "-no-progress"],
                       check=True, capture_output=True)
        tracemalloc.start()
        # squashfuse: passthrough_ll would hold an fd per node (EMFILE)
        m = Mount(lambda mp: [squashfuse, "-f", nodes_img, mp], fstype="bench")
        k = m.k
        here = perfused.__file__

        def relay_bytes():
            snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, here)])
            return sum(st.size for st in snap.statistics("filename"))
        k.getattr(k.root)
        base = relay_bytes()
        cookies = []
        for i in range(100000):
            r = k.lookup(k.root, "n%06d" % i)
            assert r.rv == 0, r.rv
            cookies.append(r.newnode)
        held = relay_bytes() - base
        for c in cookies:
            k.reclaim(c)
        k.getattr(k.root)               # a round trip: every RECLAIM was handled
        retained = max(0, relay_bytes() - base)
        m.stop()
        tracemalloc.stop()
        per_node = held / 100000.0

        print("perfused benchmark: relay (test kernel -> perfused -> daemon) vs direct "
              "(same client speaking FUSE to the daemon); median of %d runs" % repeat)
        print("machine: %d CPUs, Python %s, %s" % (os.cpu_count(), platform.python_version(),
                                                  platform.platform()))
        versions = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\\n",
                                   "squashfuse", "libfuse3-3", "libfuse3-dev"],
                                  capture_output=True, text=True).stdout.split("\n")
        print("daemons: squashfuse, passthrough_ll (libfuse3 example); packages: %s"
              % ", ".join(v for v in versions if v))
        print()
        print("%-52s %-9s %12s %12s %7s" % ("workload", "unit", "relay", "direct", "ratio"))
        for label, unit, relay, direct, ratio in rows:
            print("%-52s %-9s %12.1f %12.1f %7.2f" % (label, unit, relay, direct, ratio))
        print("%-52s %-9s %12.0f" % ("memory held per node after 100,000 lookups", "bytes", per_node))
        print("%-52s %-9s %12.0f" % ("memory retained after the kernel reclaims them", "bytes", retained))
        print("max RSS of the benchmark process: %d KiB" % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        print()
        order = ("metadata", "lookup", "read64k", "read1m", "write1m", "readdir", "inflight64",
                 "inflight256")
        print("ratios " + " ".join("%s=%.2f" % (k_, ratios[k_]) for k_ in order))
        print("memory bytes_per_node=%d retained_after_reclaim=%d" % (round(per_node), retained))
        if cache is None:
            print("page cache: not measured (no rump kernel libraries, $RUMPLIB)")
        else:
            print("page cache (NetBSD kernel, passthrough_ll, 32 MiB in 64 KiB write(2)s "
                  "then fsync): write-through %.1f MB/s, write-back %.1f MB/s" % cache)
            print("page_cache write_through/write_back=%.2f" % (cache[0] / cache[1]))
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_through_cost(passthrough, data, repeat):
    """(write-through MB/s, write-back MB/s): a 32 MiB file written through
    NetBSD's kernel (rump) and passthrough_ll, in 64 KiB write(2)s, then
    fsync'ed, with perfused's flags and without PUFFS_KFLAG_WTCACHE.  None
    without the rump kernel libraries."""
    if rk.library_dir() is None:
        return None
    kernel = rk.RumpKernel()
    size, chunk = 32 << 20, os.urandom(64 << 10)
    out = []
    try:
        for flags in (perfused.DEFAULT_KFLAGS,
                      perfused.DEFAULT_KFLAGS & ~perfused.PUFFS_KFLAG_WTCACHE):
            m = NetBSDMount(kernel, lambda fd: [passthrough, "-f", "-o", "source=%s" % data, fd],
                            fstype="bench", options={"puffs_flags": flags})
            p, path = m.p, m.path("written")

            def write_file():
                fd = p.open(path, rk.O_WRONLY | rk.O_CREAT | rk.O_TRUNC)
                for _ in range(size // len(chunk)):
                    p.write(fd, chunk)
                p.fsync(fd)
                p.close(fd)
            out.append(size / _timed(write_file, repeat) / 1e6)
            p.unlink(path)
            m.unmount()
    finally:
        kernel.close()
    return tuple(out)


def demo():
    """make demo: squashfuse behind perfused, NetBSD's kernel (rump) in front
    when its libraries are there, else the test kernel, and what crosses
    the relay printed as `perfused -d puffs,fuse` would."""
    import logging
    missing = [t for t in ("squashfuse", "mksquashfs") if not shutil.which(t)]
    if missing:
        print("demo: %s missing: apt-get install squashfuse squashfs-tools (as root)"
              % ", ".join(missing), file=sys.stderr)
        return 1
    import pathlib
    log = logging.getLogger("perfused")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("  perfused: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="perfused-demo-"))
    try:
        tree = tmp / "tree"
        tree.mkdir()
        (tree / "README").write_bytes(b"A squashfs image, read through PUFFS -> perfused -> FUSE.\n")
        (tree / "docs").mkdir()
        (tree / "docs" / "notes.txt").write_bytes(b"NetBSD kernel frames in, FUSE requests out.\n")
        os.symlink("docs/notes.txt", str(tree / "notes"))
        img = squashfs_image(tmp, tree)
        trace = perfused.Trace()
        trace.enabled = True
        argv = lambda mp: [shutil.which("squashfuse"), "-f", img, mp]    # noqa: E731
        options = {"debug": perfused.Debug(["puffs", "fuse"]), "trace": trace}
        if rk.library_dir():
            print("== mounting %s with squashfuse through perfused, NetBSD's kernel in front"
                  % img)
            kernel = rk.RumpKernel()
            m = NetBSDMount(kernel, argv, fstype="squashfuse", source=img, options=options)
            print("== walking the tree with NetBSD system calls")
            found = netbsd_tree(m.p, m.target)

            def stop():
                m.unmount()
                kernel.close()
        else:
            print("== mounting %s with squashfuse through perfused (test kernel as NetBSD;"
                  " $RUMPLIB for the real one)" % img)
            m = Mount(argv, fstype="squashfuse", source=img, options=options)
            print("== walking the tree")
            found = kernel_walk(m.k, m.k.root)
            stop = m.stop
        for path, (kind, value) in sorted(found.items()):
            shown = value.decode().strip() if kind == "file" else value
            print("   %-16s %-5s %s" % (path, kind, shown or ""))
        assert found == host_walk(str(tree)), "the tree read back differs"
        print("== unmounting")
        stop()
        log.removeHandler(handler)
        print("== per-op latency through the relay")
        print(trace.report())
        print("demo: OK, the tree read through perfused equals its source")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) == 2 else ""
    if command in ("bench", "demo"):
        sys.exit({"bench": bench, "demo": demo}[command]())
    print("usage: bench.py bench | demo", file=sys.stderr)
    sys.exit(64)
