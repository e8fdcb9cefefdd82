import os
import sys, time, re
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "vm-tests"))
import vmtest as v
t = v.Test("qsize", v.InsituBackend)
try:
    v.InsituBackend.create_image(t.image, 64 << 20)
    b = t.backend("b1", extra_args=["--queue-size", "128"]).start()
    g = t.guest("boot1", 'dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct && echo INSITU-READ-OK\n', b.sock, queue_size=256).start()
    try:
        g.wait_result(60)
        print("guest result PASS")
    except Exception as e:
        print("guest:", e)
    print(v.tail(g.console, 15))
    print(v.tail(g.stderr_path, 10))
    print("\n".join(l[:250] for l in b.log_text().splitlines() if "DEBUG" not in l)[-3000:])
finally:
    t.cleanup()
