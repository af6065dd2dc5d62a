# Opens N (argv[1]) TCP connections to the sandbox resolver and keeps them.
# Prints "opened still-open"; then holds them HOLD seconds (argv[2]) and
# exits, or, without HOLD, prints again after each line on stdin until
# stdin closes. Shared by the DNS cap tests of the worker and of the lab.
import socket, sys, time

n = int(sys.argv[1])
hold = float(sys.argv[2]) if len(sys.argv) > 2 else None
socks = []
for _ in range(n):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(('127.0.0.11', 53))
        socks.append(s)
    except OSError:
        s.close()
time.sleep(0.3)


def alive(s):
    s.settimeout(0.02)
    try:
        return s.recv(1) != b''
    except socket.timeout:
        return True
    except OSError:
        return False


while True:
    print(len(socks), sum(map(alive, socks)), flush=True)
    if hold is not None:
        time.sleep(hold)
        break
    if not sys.stdin.readline():
        break
