"""Small helpers over tests/proto/vu.py: one ring, synchronous requests."""
import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proto"))
import vu  # noqa: E402
from vu import Mem, Ring, handshake, blk_req, T_IN, T_OUT, T_FLUSH, T_GET_ID  # noqa: E402,F401

T_DISCARD, T_WRITE_ZEROES = 11, 13


class Client:
    def __init__(self, backend, mem_size=32 << 20, queues=1):
        self.b = backend
        self.c = backend.connect()
        self.mem = Mem(size=mem_size)
        self.offered, self.acked, self.pf, self.nq, self.cfg = handshake(self.c, self.mem)
        self.rings = [Ring(self.mem, q, size=128) for q in range(queues)]
        for r in self.rings:
            r.setup(self.c, order="qemu")
        self.ring = self.rings[0]

    def _do(self, rtype, sector, data=b"", data_len=0, writable=False, timeout=30):
        h, st, d = blk_req(self.mem, self.ring, rtype, sector, data, data_len, writable)
        u = self.ring.wait_used(1, timeout)
        if u is False:
            raise RuntimeError(f"request type {rtype} sector {sector} not completed in {timeout}s")
        status = self.mem.r(st, 1)[0]
        out = self.mem.r(d, data_len) if (writable and d is not None) else None
        return status, out

    def write(self, sector, data):
        return self._do(T_OUT, sector, data)[0]

    def read(self, sector, n):
        return self._do(T_IN, sector, data_len=n, writable=True)

    def flush(self):
        return self._do(T_FLUSH, 0)[0]

    def segs(self, rtype, segs):
        payload = b"".join(struct.pack("<QII", s, n, f) for s, n, f in segs)
        return self._do(rtype, 0, payload)[0]

    def close(self):
        self.c.close()


def new_backend(image, extra=(), size=None, queues=1):
    return vu.Backend(image=image, queues=queues, extra=extra, workdir=os.path.dirname(image),
                      size=size or "16M")
