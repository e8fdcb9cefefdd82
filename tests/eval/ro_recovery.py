"""serve --read-only of an image left by a SIGKILL (journal to replay): the guest must read the
recovered content (equal to GOLDEN) and the image file must not change. Also GET_ID with an empty
--serial, FLUSH on a read-only disk, and option combinations."""
import hashlib
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import evlib
from vu import T_GET_ID

src, golden, work = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(work, exist_ok=True)
BIN = evlib.vu.BIN
image = os.path.join(work, "ro.img")
subprocess.run(["cp", "--sparse=always", src, image], check=True)
before = hashlib.sha256(open(image, "rb").read()).hexdigest()
gold = open(golden, "rb").read()
b = evlib.vu.Backend(image=image, queues=1, workdir=work, extra=("--read-only", "--serial", ""))
cl = evlib.Client(b, mem_size=64 << 20)
bad = []
for off in range(0, len(gold), 1 << 20):
    st, d = cl.read(off // 512, 1 << 20)
    if st != 0 or d != gold[off:off + (1 << 20)]:
        bad.append((off, st))
print("read-only serve of a crashed image: wrong MiB blocks", len(bad), bad[:5])
st, idb = cl._do(T_GET_ID, 0, data_len=20, writable=True)
print("GET_ID with --serial '':", st, idb)
print("FLUSH on read-only:", cl.flush())
print("write on read-only:", cl.write(0, b"x" * 512))
cl.close()
print("stop", b.stop())
after = hashlib.sha256(open(image, "rb").read()).hexdigest()
print("image file unchanged:", before == after)
print("panic", "panicked" in b.text())
for extra in (["--read-only", "--create-size", "1M"], ["--read-only", "--wait-lock"], ["--read-only", "--write-buffer", "0"]):
    tgt = os.path.join(work, "new.img") if "--create-size" in extra else image
    if os.path.exists(os.path.join(work, "new.img")):
        os.unlink(os.path.join(work, "new.img"))
    p = subprocess.run(["timeout", "2", BIN, "serve", "--socket-path", os.path.join(work, "x.sock"), "--blk-file", tgt,
                        *extra], capture_output=True, text=True)
    print(extra, "rc", p.returncode, [l[:160] for l in (p.stdout + p.stderr).splitlines() if "INFO" not in l][:3],
          "created" if os.path.exists(os.path.join(work, "new.img")) else "")
