"""A cluster whose stored payload is corrupt (one flipped byte on the host), served by the real daemon.
Expected (I4): reads of it fail (IOERR), other clusters unaffected; a partial write into it can
not merge with bytes it cannot read: it must fail (now or at the FLUSH), never turn the unreadable
bytes into zeros or garbage that later reads as data; a full overwrite heals it."""
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import evlib

work = sys.argv[1]
wb = sys.argv[2] if len(sys.argv) > 2 else "32M"
os.makedirs(work, exist_ok=True)
BIN = evlib.vu.BIN
C = 65536
image = os.path.join(work, "bad.img")
if os.path.exists(image):
    os.unlink(image)
rng = random.Random(5)
raw = os.path.join(work, "bad.raw")
content = bytearray()
for c in range(64):
    line = f"cluster {c} compressible line\n".encode()
    content += (line * (C // len(line) + 1))[:C]
open(raw, "wb").write(content)
subprocess.run([BIN, "convert", raw, image], check=True)
D = int.from_bytes(open(image, "rb").read(120)[112:120], "little")
# find cluster 5's payload: home slot 5 at D + 5*C (convert writes home slots)
with open(image, "r+b") as f:
    f.seek(D + 5 * C)
    blk = f.read(4096)
    assert any(blk), "cluster 5 payload not at its home slot"
    f.seek(D + 5 * C + 100)
    bb = f.read(1)
    f.seek(D + 5 * C + 100)
    f.write(bytes([bb[0] ^ 0x5A]))
p = subprocess.run([BIN, "check", image], capture_output=True, text=True)
print("check rc", p.returncode, p.stdout.strip()[-300:])
b = evlib.new_backend(image, extra=("--write-buffer", wb))
cl = evlib.Client(b)
st, d = cl.read(5 * C // 512, 4096)
print("read corrupt cluster:", st)
st6, d6 = cl.read(6 * C // 512, C)
print("read neighbour:", st6, d6 == bytes(content[6 * C:7 * C]))
# partial write into the corrupt cluster
wst = cl.write((5 * C + 8192) // 512, b"N" * 4096)
print("partial write into corrupt cluster:", wst)
fst = cl.flush()
print("flush after it:", fst)
st2, d2 = cl.read(5 * C // 512, C)
print("read whole corrupt cluster after partial write:", st2,
      "zeros-in-unwritten-part" if st2 == 0 and d2[:8192] == bytes(8192) else "")
if st2 == 0:
    print("  first bytes:", d2[:40], "written part ok:", d2[8192:12288] == b"N" * 4096,
          "orig part equal:", d2[:8192] == bytes(content[5 * C:5 * C + 8192]))
st3, d3 = cl.read((5 * C + 8192) // 512, 4096)
print("read only the written 4K:", st3, d3 == b"N" * 4096 if st3 == 0 else None)
# a write-zeroes/discard of part of it
print("partial write-zeroes:", cl.segs(evlib.T_WRITE_ZEROES, [((5 * C + 16384) // 512, 8, 0)]), "flush", cl.flush())
st4, d4 = cl.read(5 * C // 512, C)
print("read after partial write-zeroes:", st4)
# full overwrite heals
print("full overwrite:", cl.write(5 * C // 512, b"H" * C), "flush", cl.flush())
st5, d5 = cl.read(5 * C // 512, C)
print("read after full overwrite:", st5, d5 == b"H" * C if st5 == 0 else None)
cl.close()
print("SIGTERM rc", b.stop())
log = b.text()
print("panicked" in log and "PANIC" or "no panic")
print("\n".join(l for l in log.splitlines() if "WARN" in l or "ERROR" in l)[:2000])
p = subprocess.run([BIN, "check", image], capture_output=True, text=True)
print("check rc", p.returncode, p.stdout.strip()[-500:])
