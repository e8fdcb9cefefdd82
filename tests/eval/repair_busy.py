import os, sys, subprocess, hashlib
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evlib
w = "/tmp/ev/rb"; os.makedirs(w, exist_ok=True)
img = os.path.join(w, "rb.img")
if os.path.exists(img): os.unlink(img)
BIN = evlib.vu.BIN
subprocess.run([BIN, "create", img, "--size", "8M"], check=True, stdout=subprocess.DEVNULL)
b = evlib.vu.Backend(image=img, queues=1, workdir=w)
cl = evlib.Client(b)
assert cl.write(0, b"R" * 65536) == 0 and cl.flush() == 0
assert cl.write(128, b"U" * 65536) == 0   # unflushed
p = subprocess.run([BIN, "check", "--repair", img], capture_output=True, text=True)
print("repair while served:", p.returncode, (p.stdout + p.stderr).strip().splitlines()[-1][:200])
p = subprocess.run([BIN, "check", img], capture_output=True, text=True)
print("check while served:", p.returncode, p.stdout.strip().splitlines()[-1][:200] if p.stdout.strip() else p.stderr[:200])
print("read after:", cl.read(0, 65536)[1][:2], cl.read(128, 65536)[1][:2], "flush", cl.flush())
cl.close(); print("stop", b.stop())
p = subprocess.run([BIN, "check", img], capture_output=True, text=True); print("final check", p.returncode)
