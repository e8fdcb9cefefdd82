"""Largest requests the device allows (seg_max x size_max = 126 x 1 MiB) on several queues at once:
the backend's peak RSS must stay bounded (not a full copy of every request), the data round-trips."""
import os
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import evlib
from vu import Ring, Mem, handshake, T_IN, T_OUT

work = sys.argv[1]
queues = int(sys.argv[2]) if len(sys.argv) > 2 else 4
os.makedirs(work, exist_ok=True)
BIN = evlib.vu.BIN
image = os.path.join(work, "big.img")
if os.path.exists(image):
    os.unlink(image)
subprocess.run([BIN, "create", image, "--size", "2G"], check=True, stdout=subprocess.DEVNULL)
b = evlib.vu.Backend(image=image, queues=queues, workdir=work)


def hwm():
    for line in open(f"/proc/{b.p.pid}/status"):
        if line.startswith(("VmHWM", "RssAnon", "RssShmem")):
            print("  ", line.strip())


c = b.connect()
MB = 1 << 20
mem = Mem(size=160 * MB)
handshake(c, mem)
cfg = evlib.vu.get_config(c, 0, 60)[3]
seg_max, size_max = struct.unpack_from("<I", cfg, 12)[0], struct.unpack_from("<I", cfg, 8)[0]
print("seg_max", seg_max, "size_max", size_max)
rings = [Ring(mem, q, size=256) for q in range(queues)]
for r in rings:
    r.setup(c, order="qemu")
print("after setup:")
hwm()
DATA = 16 * MB  # data area: 126 x 1 MiB descriptors all inside [16 MiB, 142 MiB)
pattern = b"".join(bytes([i % 251]) * 4096 for i in range(size_max * seg_max // 4096))
mem.w(DATA, pattern)
statuses = []
for rnd, rtype in enumerate((T_OUT, T_IN)):
    sts = []
    for q, r in enumerate(rings):
        hdr = 0x300000 + 64 * q + 4096 * rnd
        st = 0x310000 + 64 * q + 4096 * rnd
        mem.w(hdr, struct.pack("<IIQ", rtype, 0, q * (size_max * seg_max // 512)))
        mem.w(st, b"\xff")
        if rtype == T_IN:
            dst = DATA  # read back over the same area (the pattern is rewritten by the read)
            mem.w(DATA, bytes(size_max * seg_max))
        chain = [(hdr, 16, False)] + [(DATA + k * size_max, size_max, rtype == T_IN) for k in range(seg_max)] + [(st, 1, True)]
        head = r.put_chain(chain)
        r.publish(head)
        sts.append(st)
    for r in rings:
        if r.wait_used(1, 120) is False:
            print("request not completed")
    print("round", "write" if rtype == T_OUT else "read", "statuses", [mem.r(s, 1)[0] for s in sts])
    hwm()
    if rtype == T_IN:
        print("last read data ok:", mem.r(DATA, size_max * seg_max) == pattern)
c.close()
print("stop", b.stop())
print("panic", "panicked" in b.text())
