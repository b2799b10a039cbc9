# Run as root inside a sandbox by tests/guest_limits.rs: kills the agent worker,
# takes its virtio-serial port and writes what a hostile guest could (garbage,
# absurd lengths, torn frames, a sustained flood), while looping DNS queries to
# the gateway. Usage: hostile_guest.py GATEWAY SECONDS
import os, socket, struct, sys, threading, time

def find_port():
    # As the agent does: the /sys/class/virtio-ports entry whose name is ours.
    base = "/sys/class/virtio-ports"
    for d in os.listdir(base):
        try:
            with open(os.path.join(base, d, "name")) as f:
                if f.read().strip() == "org.atelier.agent.0":
                    return "/dev/" + d
        except OSError:
            pass
    return "/dev/virtio-ports/org.atelier.agent.0"


PORT = find_port()
MAGIC = b"\xa7ATL"
gateway, seconds = sys.argv[1], float(sys.argv[2])
end = time.time() + seconds
stats = {"dns_sent": 0, "dns_answered": 0, "port_bytes": 0, "kills": 0, "open_errno": 0, "got_port": 0}


def dns_loop():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    i = 0
    while time.time() < end:
        i = (i + 1) & 0xFFFF
        q = struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 0)
        q += b"\x07example\x03com\x00" + struct.pack(">HH", 1, 1)
        try:
            s.sendto(q, (gateway, 53))
            stats["dns_sent"] += 1
        except OSError:
            time.sleep(0.001)
        try:
            while True:
                s.recv(4096)
                stats["dns_answered"] += 1
        except OSError:
            pass


def workers():
    me = os.getpid()
    for p in os.listdir("/proc"):
        if not p.isdigit() or p == "1" or int(p) == me:
            continue
        try:
            if os.readlink("/proc/%s/exe" % p).endswith("atelier-agent"):
                yield int(p)
        except OSError:
            pass


def grab_port():
    # Kill the worker, then open the port as soon as its fd is gone: before the
    # supervisor's restart (200 ms or more later) takes it again.
    while time.time() < end:
        for p in workers():
            try:
                os.kill(p, 9)
                stats["kills"] += 1
            except OSError:
                pass
        until = time.time() + 0.15
        while time.time() < until:
            try:
                return os.open(PORT, os.O_RDWR | os.O_NONBLOCK)
            except OSError as e:
                stats["open_errno"] = e.errno
                time.sleep(0.0005)
    return None


def write(fd, data):
    view = memoryview(data)
    while view and time.time() < end:
        try:
            n = os.write(fd, view)
            stats["port_bytes"] += n
            view = view[n:]
        except BlockingIOError:
            time.sleep(0.001)
        except OSError:
            time.sleep(0.01)


threading.Thread(target=dns_loop, daemon=True).start()
fd = grab_port()
if fd is not None:
    stats["got_port"] = 1
    write(fd, os.urandom(2 << 20))  # garbage
    write(fd, (MAGIC + b"\xff\xff\xff\xff") * 2000)  # absurd lengths
    write(fd, (MAGIC + struct.pack("<I", 1000) + b"torn") * 2000)  # torn frames
    chunk = os.urandom(64 << 10)
    while time.time() < end:  # sustained flood
        write(fd, chunk)
while time.time() < end:
    time.sleep(0.1)
if fd is not None:
    os.close(fd)
with open("/tmp/hostile.stats", "w") as f:
    f.write(" ".join("%s=%d" % kv for kv in sorted(stats.items())) + "\n")
