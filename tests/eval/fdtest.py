"""serve --fd N (libvirt style: an inherited listening socket), and --fd with the wrong kinds of fd."""
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import evlib

work = sys.argv[1]
os.makedirs(work, exist_ok=True)
BIN = evlib.vu.BIN
image = os.path.join(work, "fd.img")
if os.path.exists(image):
    os.unlink(image)
subprocess.run([BIN, "create", image, "--size", "8M"], check=True, stdout=subprocess.DEVNULL)
path = os.path.join(work, "fd.sock")


def attempt(label, sock):
    fd = sock.fileno()
    p = subprocess.Popen([BIN, "serve", "--fd", str(fd), "--blk-file", image], pass_fds=[fd],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(1.0)
    alive = p.poll() is None
    return p, alive


# 1. a proper listening unix socket
if os.path.exists(path):
    os.unlink(path)
ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
ls.bind(path)
ls.listen(1)
p, alive = attempt("listening", ls)
ls.close()
ok = None
if alive:
    class FakeBackend:
        sock = path

        def connect(self):
            return evlib.vu.Conn(path)
    cl = evlib.Client(FakeBackend())
    ok = (cl.write(0, b"F" * 4096), cl.read(0, 4096)[1] == b"F" * 4096, cl.flush())
    cl.close()
    time.sleep(0.3)
    # a second connection after the first closed
    cl = evlib.Client(FakeBackend())
    ok2 = cl.read(0, 4096)[1] == b"F" * 4096
    cl.close()
    ok = ok + (ok2,)
    p.terminate()
out = p.communicate(timeout=20)[0].decode(errors="replace")
print("listening unix socket: alive", alive, "io", ok, "exit", p.returncode, "panic", "panicked" in out)

for label, mk in [
    ("unix socket not listening", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)),
    ("unix datagram", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)),
    ("tcp listening", lambda: (lambda s: (s.bind(("127.0.0.1", 0)), s.listen(1), s)[2])(socket.socket())),
    ("connected unix pair", lambda: socket.socketpair()[0]),
]:
    s = mk()
    p, alive = attempt(label, s)
    if alive:
        p.terminate()
    out = p.communicate(timeout=20)[0].decode(errors="replace")
    print(f"{label}: alive after 1s {alive} exit {p.returncode}: {out.strip().splitlines()[-1][:200] if out.strip() else ''}")
    s.close()
