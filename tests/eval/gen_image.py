"""Builds a real image with checkpoint + journal records through the real daemon, ends with a
FLUSH and a SIGKILL (so journal records stay). Writes the expected logical content to EXPECTED."""
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import evlib

image, expected_path = sys.argv[1], sys.argv[2]
size_mb = int(sys.argv[3]) if len(sys.argv) > 3 else 16
extra = sys.argv[4:]
BIN = evlib.vu.BIN
C = 65536
if os.path.exists(image):
    os.unlink(image)
subprocess.run([BIN, "create", image, "--size", f"{size_mb}M", *extra], check=True, stdout=subprocess.DEVNULL)
rng = random.Random(7)
exp = bytearray(size_mb << 20)
b = evlib.new_backend(image)
cl = evlib.Client(b)
ncl = (size_mb << 20) // C


def content(kind, n):
    if kind == 0:
        return bytes(n)
    if kind == 1:
        line = f"line {rng.randrange(1 << 30)} of compressible text\n".encode()
        return (line * (n // len(line) + 1))[:n]
    if kind == 2:
        return rng.randbytes(n)
    half = rng.randbytes(n // 2)
    return half + bytes(n - n // 2)


ops = 0
for rnd in range(3):
    for c in range(0, ncl - 8):
        r = rng.random()
        if r < 0.6:
            data = content(rng.randrange(4), C)
            off = c * C
        elif r < 0.85:
            n = 512 * rng.randrange(1, 17)
            off = c * C + 512 * rng.randrange(0, (C - n) // 512 + 1)
            data = content(rng.randrange(1, 4), n)
        else:
            continue
        st = cl.write(off // 512, data)
        assert st == 0, f"write status {st}"
        exp[off:off + len(data)] = data
        ops += 1
        if ops % 25 == 0:
            assert cl.flush() == 0
    # a discard and a write-zeroes of whole clusters
    st = cl.segs(evlib.T_DISCARD, [((rnd * 8) * C // 512, 2 * C // 512, 0)])
    if st == 0:
        exp[rnd * 8 * C:(rnd * 8 + 2) * C] = bytes(2 * C)
    st2 = cl.segs(evlib.T_WRITE_ZEROES, [((rnd * 8 + 4) * C // 512, C // 512, 0)])
    if st2 == 0:
        exp[(rnd * 8 + 4) * C:(rnd * 8 + 5) * C] = bytes(C)
    print("discard", st, "write_zeroes", st2)
    assert cl.flush() == 0
time.sleep(0.2)
b.p.send_signal(int(os.environ.get("GEN_SIG", "9")))
b.p.wait()
with open(expected_path, "wb") as f:
    f.write(exp)
print("ops", ops)
