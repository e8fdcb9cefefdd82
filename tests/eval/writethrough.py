"""A guest that switched its cache to write-through (VIRTIO_BLK_F_CONFIG_WCE, writeback = 0) never
sends FLUSH: every completed write must be durable. SIGKILL the backend after writes complete
(no FLUSH), restart, read back: every completed write must be there."""
import os
import random
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import evlib
from vu import SET_CONFIG, GET_CONFIG

work = sys.argv[1]
os.makedirs(work, exist_ok=True)
BIN = evlib.vu.BIN
C = 65536
image = os.path.join(work, "wt.img")
if os.path.exists(image):
    os.unlink(image)
subprocess.run([BIN, "create", image, "--size", "16M"], check=True, stdout=subprocess.DEVNULL)
rng = random.Random(11)
b = evlib.new_backend(image)
cl = evlib.Client(b)
wce = bool(cl.acked & (1 << 11))
print("CONFIG_WCE negotiated:", wce)
cfg = evlib.vu.get_config(cl.c, 0, 60)
print("writeback byte before:", cfg[3][32])
r = cl.c.msg(SET_CONFIG, struct.pack("<III", 32, 1, 0) + b"\x00")
cfg = evlib.vu.get_config(cl.c, 0, 60)
print("SET_CONFIG ack:", r, "writeback byte after:", cfg[3][32])
if len(sys.argv) > 2 and sys.argv[2] == "flush_first":
    print("a FLUSH in write-through mode:", cl.flush())
    cfg = evlib.vu.get_config(cl.c, 0, 60)
    print("writeback byte after the FLUSH:", cfg[3][32])
written = {}
for i in range(60):
    c = rng.randrange(200)
    if rng.random() < 0.5:
        n = 512 * rng.randrange(1, 9)
        off = c * 512 * 8
        data = rng.randbytes(n)
    else:
        off = (c % 250) * C // 4 * 4
        off -= off % 512
        data = (f"wt {i} ".encode() * 20000)[:C]
    st = cl.write(off // 512, data)
    assert st == 0
    for k in range(0, len(data), 512):
        written[off + k] = data[k:k + 512]
time.sleep(0.05)
b.p.kill()
b.p.wait()
print("SIGKILLed after", len(written), "sectors written write-through, no FLUSH")
b2 = evlib.new_backend(image)
cl2 = evlib.Client(b2)
lost = []
for off, d in sorted(written.items()):
    st, got = cl2.read(off // 512, 512)
    if st != 0 or got != d:
        lost.append(off)
print("LOST write-through sectors:", len(lost), "of", len(written), lost[:10])
cl2.close()
print("stop", b2.stop())
p = subprocess.run([BIN, "check", image], capture_output=True, text=True)
print("check rc", p.returncode)
