"""Two `serve` processes on one image (I8): A serves a client doing writes; B is started on the same
image and a second client writes through it. Expected: B cannot write (clear error, requests fail
or wait), A's data is intact, check clean afterwards."""
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import evlib

work = sys.argv[1]
os.makedirs(work, exist_ok=True)
wa, wb = os.path.join(work, "a"), os.path.join(work, "b")
os.makedirs(wa, exist_ok=True)
os.makedirs(wb, exist_ok=True)
BIN = evlib.vu.BIN
C = 65536
image = os.path.join(work, "two.img")
if os.path.exists(image):
    os.unlink(image)
subprocess.run([BIN, "create", image, "--size", "16M"], check=True, stdout=subprocess.DEVNULL)
A = evlib.vu.Backend(image=image, queues=1, workdir=wa)
ca = evlib.Client(A)
print("A write", ca.write(0, b"A" * C), "flush", ca.flush())
B = evlib.vu.Backend(image=image, queues=1, workdir=wb)
time.sleep(0.5)
print("B alive after start:", B.alive())
try:
    cb = evlib.Client(B)
    t0 = time.time()
    st = cb.write(0, b"B" * C, ) if False else None
    h, stp, _ = evlib.blk_req(cb.mem, cb.ring, evlib.T_OUT, 0, b"B" * C)
    u = cb.ring.wait_used(1, 15)
    print("B write:", "not completed in 15 s" if u is False else cb.mem.r(stp, 1)[0], f"after {time.time() - t0:.1f}s")
    h, stp, d = evlib.blk_req(cb.mem, cb.ring, evlib.T_IN, 0, data_len=C, writable_data=True)
    u = cb.ring.wait_used(1, 15)
    print("B read:", "not completed" if u is False else (cb.mem.r(stp, 1)[0], cb.mem.r(d, 8)))
except Exception as e:
    print("B client error:", repr(e))
print("B SIGTERM (A still serving):", B.stop())
print("A write again", ca.write(128, b"a" * C), "flush", ca.flush())
st, d = ca.read(0, C)
print("A reads its cluster 0:", st, d[:4])
ca.close()
print("A SIGTERM", A.stop())
print("B log:\n" + "\n".join(l for l in B.text().splitlines() if "WARN" in l or "ERROR" in l or "lock" in l)[:1500])
p = subprocess.run([BIN, "check", image], capture_output=True, text=True)
print("check rc", p.returncode)
raw = os.path.join(work, "two.raw")
if os.path.exists(raw):
    os.unlink(raw)
subprocess.run([BIN, "convert", image, raw], check=True)
data = open(raw, "rb").read()
print("cluster0:", data[:4], "cluster1:", data[C:C + 4])
