#!/usr/bin/env python3
"""A raw vhost-user frontend for protocol probes of insitu-blk (review branch `proto`).

Speaks vhost-user.rst on the wire (no library): every message, flag and payload can be chosen,
so sequences of frontends we have not run (cloud-hypervisor, crosvm, SPDK-style, libblkio) and
malformed ones can be sent. Guest memory is a memfd shared with SET_MEM_TABLE / ADD_MEM_REG;
split rings are laid out by hand in it.
"""
import mmap
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time

# FrontendReq codes (vhost-user.rst "Front-end message types")
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_LOG_BASE, SET_LOG_FD, SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE = 6, 7, 8, 9, 10
GET_VRING_BASE, SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 11, 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
SET_BACKEND_REQ_FD, IOTLB_MSG, SET_VRING_ENDIAN, GET_CONFIG, SET_CONFIG = 21, 22, 23, 24, 25
GET_INFLIGHT_FD, SET_INFLIGHT_FD, RESET_DEVICE, VRING_KICK = 31, 32, 34, 35
GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG, SET_STATUS, GET_STATUS = 36, 37, 38, 39, 40

VERSION, REPLY, NEED_REPLY = 0x1, 0x4, 0x8
F_PROTOCOL_FEATURES = 1 << 30
F_LOG_ALL = 1 << 26
F_VERSION_1 = 1 << 32
F_EVENT_IDX = 1 << 29
F_INDIRECT = 1 << 28
F_RING_PACKED = 1 << 34
F_IN_ORDER = 1 << 35
F_ACCESS_PLATFORM = 1 << 33
PF = {name: 1 << bit for bit, name in enumerate(
    "MQ LOG_SHMFD RARP REPLY_ACK MTU BACKEND_REQ CROSS_ENDIAN CRYPTO PAGEFAULT CONFIG "
    "BACKEND_SEND_FD HOST_NOTIFIER INFLIGHT_SHMFD RESET_DEVICE INBAND_NOTIFICATIONS "
    "CONFIGURE_MEM_SLOTS STATUS XEN_MMAP SHARED_OBJECT DEVICE_STATE".split())}

import atexit
import shutil

_CREATED_DIRS = []


@atexit.register
def _cleanup():
    """Scratch directories (images, sockets, logs) are removed at exit unless VU_KEEP=1."""
    if os.environ.get("VU_KEEP") != "1":
        for d in _CREATED_DIRS:
            shutil.rmtree(d, ignore_errors=True)


BIN = os.environ.get("INSITU_BLK", os.path.join(os.path.dirname(__file__), "../../target/release/insitu-blk"))


class Closed(Exception):
    pass


class Conn:
    def __init__(self, path, timeout=10.0):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.s.settimeout(timeout)
        self.need_reply = False  # set NEED_REPLY on every message without a reply of its own

    def send(self, code, payload=b"", fds=(), flags=VERSION):
        hdr = struct.pack("<III", code, flags, len(payload))
        if fds:
            socket.send_fds(self.s, [hdr + payload], list(fds))
        else:
            self.s.sendall(hdr + payload)

    def recv_exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise Closed("backend closed the connection")
            buf += chunk
        return buf

    def recv(self):
        code, flags, size = struct.unpack("<III", self.recv_exact(12))
        payload = self.recv_exact(size) if size else b""
        return code, flags, payload

    def call(self, code, payload=b""):
        """A message with a reply of its own (GET_*)."""
        self.send(code, payload)
        rc, flags, p = self.recv()
        assert rc == code, f"reply code {rc} to {code}"
        assert flags & REPLY, f"reply flags {flags:#x}"
        return p

    def msg(self, code, payload=b"", fds=(), ack=None):
        """A message without a reply of its own; returns the REPLY_ACK value if asked."""
        ack = self.need_reply if ack is None else ack
        self.send(code, payload, fds, VERSION | (NEED_REPLY if ack else 0))
        if ack:
            rc, flags, p = self.recv()
            assert rc == code, f"ack code {rc} to {code}"
            return struct.unpack("<Q", p)[0]
        return None

    def call_fd(self, code, payload=b""):
        """A message whose reply carries a file descriptor (GET_INFLIGHT_FD): (payload, fd)."""
        self.send(code, payload)
        hdr, fds, _, _ = socket.recv_fds(self.s, 12, 1)
        if not hdr:
            raise Closed("backend closed the connection")
        hdr += self.recv_exact(12 - len(hdr))
        rc, flags, size = struct.unpack("<III", hdr)
        assert rc == code, f"reply code {rc} to {code}"
        assert flags & REPLY, f"reply flags {flags:#x}"
        p = self.recv_exact(size) if size else b""
        return p, (fds[0] if fds else None)

    def u64(self, code):
        return struct.unpack("<Q", self.call(code))[0]

    def close(self):
        self.s.close()


class Mem:
    """Guest memory: one memfd region at GPA 0, frontend VA = VA_BASE + GPA."""
    VA_BASE = 0x7F00_0000_0000

    def __init__(self, size=16 << 20):
        self.size = size
        self.fd = os.memfd_create("vu-probe-guest")
        os.ftruncate(self.fd, size)
        self.m = mmap.mmap(self.fd, size)
        self.next = 1 << 20

    def region(self, gpa=0, size=None, off=0):
        size = self.size if size is None else size
        return struct.pack("<QQQQ", gpa, size, self.VA_BASE + gpa, off)

    def mem_table(self):
        return struct.pack("<II", 1, 0) + self.region()

    def va(self, gpa):
        return self.VA_BASE + gpa

    def w(self, gpa, data):
        self.m[gpa:gpa + len(data)] = data

    def r(self, gpa, n):
        return bytes(self.m[gpa:gpa + n])

    def alloc(self, n, align=16):
        a = (self.next + align - 1) // align * align
        if a + n > self.size:
            a = (1 << 20)
        self.next = a + n
        return a


class Ring:
    def __init__(self, mem, index, size=128):
        self.mem, self.index, self.size = mem, index, size
        base = 0x10000 * index
        self.desc, self.avail, self.used = base, base + 0x4000, base + 0x8000
        mem.w(self.avail, bytes(6 + 2 * size))
        mem.w(self.used, bytes(6 + 8 * size))
        self.avail_idx = 0
        self.last_used = 0
        self.next_desc = 0
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)

    def setup(self, c, base=0, order="ch", enable=True, call=True, kick=True, keep_idx=False):
        """Start the ring. order 'ch': NUM ADDR BASE CALL KICK ENABLE (cloud-hypervisor);
        'qemu': NUM BASE ADDR KICK CALL ENABLE."""
        i = self.index
        if not keep_idx:
            self.avail_idx = self.last_used = base
            self.mem.w(self.avail + 2, struct.pack("<H", base))
            self.mem.w(self.used + 2, struct.pack("<H", base))
        num = lambda: c.msg(SET_VRING_NUM, struct.pack("<II", i, self.size))
        addr = lambda: c.msg(SET_VRING_ADDR, struct.pack("<IIQQQQ", i, 0, self.mem.va(self.desc),
                                                            self.mem.va(self.used), self.mem.va(self.avail), 0))
        vbase = lambda: c.msg(SET_VRING_BASE, struct.pack("<II", i, base))
        callm = lambda: c.msg(SET_VRING_CALL, struct.pack("<Q", i), fds=[self.call]) if call else None
        kickm = lambda: c.msg(SET_VRING_KICK, struct.pack("<Q", i), fds=[self.kick]) if kick else None
        en = lambda: c.msg(SET_VRING_ENABLE, struct.pack("<II", i, 1)) if enable else None
        seq = {"ch": [num, addr, vbase, callm, kickm, en],
               "qemu": [num, vbase, addr, kickm, callm, en],
               "enable_first": [num, vbase, addr, en, kickm, callm]}[order]
        out = [f() for f in seq]
        return out

    def put_chain(self, descs):
        """descs: list of (addr, len, write). Returns head."""
        idx = []
        for _ in descs:
            idx.append(self.next_desc)
            self.next_desc = (self.next_desc + 1) % self.size
        for k, (addr, ln, wr) in enumerate(descs):
            flags = (2 if wr else 0) | (1 if k + 1 < len(descs) else 0)
            nxt = idx[k + 1] if k + 1 < len(descs) else 0
            self.mem.w(self.desc + 16 * idx[k], struct.pack("<QIHH", addr, ln, flags, nxt))
        return idx[0]

    def publish(self, head, kick=True):
        slot = self.avail + 4 + 2 * (self.avail_idx % self.size)
        self.mem.w(slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        # used_event (EVENT_IDX): ask for a notification at the next used entry, as Linux does
        self.mem.w(self.avail + 4 + 2 * self.size, struct.pack("<H", self.last_used))
        self.mem.w(self.avail + 2, struct.pack("<H", self.avail_idx))
        if kick:
            os.eventfd_write(self.kick, 1)

    def used_idx(self):
        return struct.unpack("<H", self.mem.r(self.used + 2, 2))[0]

    def wait_used(self, n=1, timeout=10.0):
        deadline = time.time() + timeout
        while ((self.used_idx() - self.last_used) & 0xFFFF) < n:
            if time.time() > deadline:
                return False
            time.sleep(0.001)
        got = []
        for _ in range(n):
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            got.append(struct.unpack("<II", self.mem.r(slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return got

    def call_pending(self, timeout=0.0):
        r, _, _ = select.select([self.call], [], [], timeout)
        if r:
            os.eventfd_read(self.call)
            return True
        return False


def blk_req(mem, ring, rtype, sector, data=b"", data_len=0, writable_data=False, publish=True, kick=True):
    hdr = mem.alloc(16)
    mem.w(hdr, struct.pack("<IIQ", rtype, 0, sector))
    st = mem.alloc(1)
    mem.w(st, b"\xff")
    chain = [(hdr, 16, False)]
    dgpa = None
    n = len(data) or data_len
    if n:
        dgpa = mem.alloc(n, 512)
        if data:
            mem.w(dgpa, data)
        chain.append((dgpa, n, writable_data))
    chain.append((st, 1, True))
    head = ring.put_chain(chain)
    if publish:
        ring.publish(head, kick)
    return head, st, dgpa


T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8


class Backend:
    def __init__(self, size="8M", queues=4, extra=(), image=None, workdir=None):
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="vu-probe-")
            _CREATED_DIRS.append(workdir)
        self.dir = workdir
        self.image = image or os.path.join(self.dir, "disk.img")
        if not os.path.exists(self.image):
            subprocess.run([BIN, "create", "--size", size, self.image], check=True)
        self.sock = os.path.join(self.dir, "vu.sock")
        self.log = os.path.join(self.dir, "serve.log")
        self.queues, self.extra = queues, extra
        self.start()

    def start(self):
        self.logf = open(self.log, "ab")
        if os.environ.get("VU_BACKEND") == "qsd":
            # reference backend (libvhost-user) for comparison: qemu-storage-daemon on a raw file
            raw = self.image + ".raw"
            if not os.path.exists(raw):
                with open(raw, "wb") as f:
                    f.truncate(os.path.getsize(self.image) if False else 64 << 20)
            if os.path.exists(self.sock):
                os.unlink(self.sock)
            self.p = subprocess.Popen(["qemu-storage-daemon", "--blockdev",
                                       f"driver=file,node-name=f,filename={raw},cache.direct=off",
                                       "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={self.sock},writable=on,num-queues={self.queues}"],
                                      stdout=self.logf, stderr=subprocess.STDOUT)
            deadline = time.time() + 20
            while not os.path.exists(self.sock):
                if self.p.poll() is not None or time.time() > deadline:
                    raise RuntimeError("qsd did not start: " + open(self.log).read())
                time.sleep(0.02)
            return
        self.p = subprocess.Popen([BIN, "serve", "--socket-path", self.sock, "--blk-file", self.image,
                                   "--num-queues", str(self.queues), "--log-level", "debug", *self.extra],
                                  stdout=self.logf, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while not os.path.exists(self.sock):
            if self.p.poll() is not None or time.time() > deadline:
                raise RuntimeError("backend did not start: " + open(self.log).read())
            time.sleep(0.02)

    def connect(self):
        deadline = time.time() + 10
        while True:
            try:
                return Conn(self.sock)
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.02)

    def alive(self):
        return self.p.poll() is None

    def text(self):
        return open(self.log, errors="replace").read()

    def stop(self, sig=15):
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        return self.p.returncode


def handshake(c, mem, features=None, pf_want=None, order="ch", need_reply=True, config_len=60):
    """SET_OWNER, GET_FEATURES, [GET/SET_PROTOCOL_FEATURES], GET_QUEUE_NUM, GET_CONFIG, SET_FEATURES,
    SET_MEM_TABLE (cloud-hypervisor's order). Returns (offered, acked, pf, config)."""
    c.msg(SET_OWNER, ack=False)
    offered = c.u64(GET_FEATURES)
    want = offered if features is None else (offered & features)
    pf = 0
    if want & F_PROTOCOL_FEATURES:
        pf = c.u64(GET_PROTOCOL_FEATURES)
        if pf_want is not None:
            pf &= pf_want
        c.msg(SET_PROTOCOL_FEATURES, struct.pack("<Q", pf), ack=False)
        c.need_reply = need_reply and bool(pf & PF["REPLY_ACK"])
    nq = c.u64(GET_QUEUE_NUM) if pf & PF["MQ"] else 1
    cfg = None
    if pf & PF["CONFIG"]:
        cfg = get_config(c, 0, config_len)
    assert c.msg(SET_FEATURES, struct.pack("<Q", want)) in (None, 0)
    assert c.msg(SET_MEM_TABLE, mem.mem_table(), fds=[mem.fd]) in (None, 0)
    return offered, want, pf, nq, cfg


def get_config(c, offset, size, flags=0):
    p = c.call(GET_CONFIG, struct.pack("<III", offset, size, flags) + bytes(size))
    off, sz, fl = struct.unpack("<III", p[:12])
    return (off, sz, fl, p[12:])


def inflight_description(mmap_size, mmap_offset, num_queues, queue_size):
    """The VhostUserInflight payload of GET/SET_INFLIGHT_FD (24 bytes)."""
    return struct.pack("<QQHHI", mmap_size, mmap_offset, num_queues, queue_size, 0)


def get_and_set_inflight(c, num_queues, queue_size):
    """cloud-hypervisor's (and QEMU's) first start with INFLIGHT_SHMFD: GET_INFLIGHT_FD, then
    SET_INFLIGHT_FD with the answer and its fd. Returns (payload, fd) to hand to later backends."""
    p, fd = c.call_fd(GET_INFLIGHT_FD, inflight_description(0, 0, num_queues, queue_size))
    assert fd is not None, "GET_INFLIGHT_FD reply without an fd"
    assert c.msg(SET_INFLIGHT_FD, p, fds=[fd]) in (None, 0), "SET_INFLIGHT_FD refused"
    return p, fd
