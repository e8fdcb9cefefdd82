"""Host ENOSPC under the real daemon: a 64 MiB image on a small tmpfs, filled with random data.
Expect: failing writes/FLUSHes get IOERR, the daemon stays alive and keeps serving reads, data
flushed before the disk filled stays intact, SIGTERM exits, `check` afterwards (space added) is
clean or reports leaks only, and flushed data reads back."""
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import evlib

mnt = sys.argv[1]
fs_mb = int(sys.argv[2]) if len(sys.argv) > 2 else 24
wb = sys.argv[3] if len(sys.argv) > 3 else "32M"
BIN = evlib.vu.BIN
C = 65536
subprocess.run(["umount", mnt], stderr=subprocess.DEVNULL)
os.makedirs(mnt, exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={fs_mb}M", "tmpfs", mnt], check=True)
image = os.path.join(mnt, "disk.img")
subprocess.run([BIN, "create", image, "--size", "64M"], check=True, stdout=subprocess.DEVNULL)
rng = random.Random(3)
b = evlib.new_backend(image, extra=("--write-buffer", wb))
cl = evlib.Client(b)
flushed = {}   # cluster -> data durable (after a successful flush)
pending = {}
statuses = []
first_fail = None
for c in range(1024):
    data = rng.randbytes(C) if c % 3 else (rng.randbytes(4096) * 16)
    st = cl.write(c * C // 512, data)
    statuses.append(st)
    if st == 0:
        pending[c] = data
    elif first_fail is None:
        first_fail = c
    if c % 8 == 7:
        f = cl.flush()
        statuses.append(("F", f))
        if f == 0:
            flushed.update(pending)
            pending.clear()
        elif first_fail is None:
            first_fail = ("flush", c)
    if not b.alive():
        print("BACKEND DIED at cluster", c)
        break
print("first failure at", first_fail, "df:", subprocess.run(["df", "-k", mnt], capture_output=True, text=True).stdout.split("\n")[1])
fails = [s for s in statuses if s not in (0, ("F", 0))]
print("failed statuses:", len(fails), "examples", fails[:5], "flushed clusters", len(flushed))
# partial writes (read-modify-write) and small writes on a full disk
pst = cl.write((100 * C + 4096) // 512, b"p" * 4096)
print("partial write status:", pst, "flush:", cl.flush(), "flush again:", cl.flush())
if pst == 0 and 100 in flushed:
    d = bytearray(flushed[100]); d[4096:8192] = b"p" * 4096; flushed[100] = bytes(d)
    print("cluster 5 now expected with the partial write (a later FLUSH must cover it)")
else:
    flushed.pop(100, None)
# reads of flushed data still work
bad = []
for c, d in list(flushed.items())[:200]:
    st, got = cl.read(c * C // 512, C)
    if st != 0 or got != d:
        bad.append((c, st))
print("flushed clusters read back wrong while full:", bad[:10], len(bad))
# free some space: discard 32 clusters, then writes should work again (after reclaim)
print("discard:", cl.segs(evlib.T_DISCARD, [(0, 32 * C // 512, 0)]), "flush:", cl.flush())
for c in range(32):
    flushed.pop(c, None)
    pending.pop(c, None)
time.sleep(12)
st_after = []
for c in range(32, 36):
    d = rng.randbytes(C)
    st_after.append(cl.write(c * C // 512, d))
    if st_after[-1] == 0:
        flushed[c] = d
print("writes after discard+12s:", st_after, "flush:", cl.flush())
print("alive:", b.alive())
cl.close()
rc = b.stop()
print("SIGTERM exit:", rc)
log = b.text()
print("panics in log:", "panicked" in log)
print("log tail:\n" + "\n".join(log.splitlines()[-15:]))
subprocess.run(["mount", "-o", "remount,size=512M", mnt], check=True)
p = subprocess.run([BIN, "check", image], capture_output=True, text=True)
print("check rc", p.returncode, p.stdout[-800:], p.stderr[-500:])
raw = os.path.join(mnt, "out.raw")
p = subprocess.run([BIN, "convert", image, raw], capture_output=True, text=True)
print("convert rc", p.returncode, p.stderr[-300:])
if p.returncode == 0:
    with open(raw, "rb") as f:
        wrong = []
        for c, d in flushed.items():
            f.seek(c * C)
            if f.read(C) != d:
                wrong.append(c)
    print("FLUSHED CLUSTERS LOST/WRONG:", len(wrong), wrong[:20], "of", len(flushed))
    with open(raw, "rb") as f:
        f.seek(100 * C)
        d5 = f.read(C)
    print("cluster 5 bytes 4096..4100:", d5[4096:4100], "bytes 0..4:", d5[:4])
