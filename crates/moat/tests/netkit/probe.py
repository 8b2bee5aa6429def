# Helpers for the network tests' Python probes, which run INSIDE a sandbox
# (copied into its /workspace). A probe script does `from probe import *`,
# records each attempt with `attempt(label, fn, ...)` and ends with `done()`,
# which prints one JSON object: label -> {"ok": bool, "value" | "error", "text"}.
import errno
import json
import os
import random
import socket
import ssl
import struct

R = {}
PROXY = ("127.0.0.1", 3128)


class ProxyRefused(Exception):
    """The door answered a CONNECT with something other than 200."""


def attempt(label, fn, *args, **kwargs):
    try:
        R[label] = {"ok": True, "value": fn(*args, **kwargs)}
    except socket.gaierror as e:
        R[label] = {"ok": False, "error": "gaierror", "text": str(e)}
    except ssl.SSLError as e:
        R[label] = {"ok": False, "error": "SSLError", "text": str(e)}
    except OSError as e:
        name = errno.errorcode.get(e.errno) if e.errno else None
        R[label] = {"ok": False, "error": name or type(e).__name__, "text": str(e)}
    except Exception as e:  # noqa: BLE001 - every failure is a result here
        R[label] = {"ok": False, "error": type(e).__name__, "text": str(e)}


def done():
    print(json.dumps(R))


def read_head(s):
    """Reads a response head byte by byte (never past the blank line)."""
    buf = b""
    while not buf.endswith(b"\r\n\r\n"):
        c = s.recv(1)
        if not c:
            break
        buf += c
    return buf.decode("latin-1")


def read_all(s, limit=1 << 20):
    buf = b""
    while len(buf) < limit:
        try:
            c = s.recv(65536)
        except socket.timeout:
            return buf + b"[timeout]"
        except ConnectionResetError:
            return buf + b"[reset]"
        if not c:
            break
        buf += c
    return buf


def response(raw):
    """Status, X-Moat-Denied and body of a raw HTTP response."""
    text = raw.decode("latin-1")
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    denied = ""
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k.lower() == "x-moat-denied":
            denied = v.strip()
    return {"status": status, "denied": denied, "body": body, "raw": text[:600]}


def raw(data, addr=PROXY, timeout=15):
    """Sends raw bytes (to the proxy by default) and returns the parsed response."""
    if isinstance(data, str):
        data = data.encode("latin-1")
    s = socket.create_connection(addr, timeout=timeout)
    try:
        s.sendall(data)
        return response(read_all(s))
    finally:
        s.close()


def connect_status(target, timeout=15):
    """Sends CONNECT target and returns the door's answer (no tunnel use)."""
    s = socket.create_connection(PROXY, timeout=timeout)
    try:
        s.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)).encode())
        return response(read_head(s).encode("latin-1"))
    finally:
        s.close()


def tls_get(host, port, sni, cafile=None, path="/", via_proxy=True, addr=None,
            connect_target=None, timeout=15):
    """GET over TLS, through a CONNECT tunnel (default) or straight to addr.
    sni=None sends no server name (and skips certificate checks)."""
    if via_proxy:
        s = socket.create_connection(PROXY, timeout=timeout)
        target = connect_target or "%s:%d" % (host, port)
        s.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)).encode())
        head = read_head(s)
        if " 200 " not in head.split("\r\n")[0] + " ":
            s.close()
            raise ProxyRefused(head.split("\r\n")[0])
    else:
        s = socket.create_connection((addr or host, port), timeout=timeout)
    if sni is None or cafile is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=cafile)
    t = ctx.wrap_socket(s, server_hostname=sni)
    try:
        t.sendall(("GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n" % (path, host, port)).encode())
        return response(read_all(t))
    finally:
        t.close()


def tcp_connect(host, port, family=socket.AF_INET, timeout=5):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        return "connected"
    finally:
        s.close()


def udp_exchange(host, port, payload, family=socket.AF_INET, timeout=2):
    """Sends one datagram on a connected UDP socket and waits for an answer."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        s.send(payload)
        return s.recv(65536).hex()
    finally:
        s.close()


def dns_query(name, qtype=1, tcp=False, server=("127.0.0.1", 53), timeout=3, more=()):
    """One DNS message asking for name (and the names in more); returns rcode,
    answer count and whether the id matched."""
    qid = random.randrange(1 << 16)
    q = struct.pack(">HHHHHH", qid, 0x0100, 1 + len(more), 0, 0, 0)
    for n in (name,) + tuple(more):
        for label in n.rstrip(".").split("."):
            q += bytes([len(label)]) + label.encode()
        q += b"\x00" + struct.pack(">HH", qtype, 1)
    if tcp:
        s = socket.create_connection(server, timeout=timeout)
        try:
            s.sendall(struct.pack(">H", len(q)) + q)
            n = struct.unpack(">H", s.recv(2))[0]
            resp = b""
            while len(resp) < n:
                c = s.recv(n - len(resp))
                if not c:
                    break
                resp += c
        finally:
            s.close()
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        try:
            s.sendto(q, server)
            resp = s.recv(4096)
        finally:
            s.close()
    an = struct.unpack(">H", resp[6:8])[0]
    addrs = []
    if an and qtype == 1:
        addrs = [socket.inet_ntoa(resp[-4:])]
    return {"rcode": resp[3] & 0x0F, "answers": an, "id_ok": struct.unpack(">H", resp[:2])[0] == qid,
            "addrs": addrs}


def resolve4(name):
    return sorted({a[4][0] for a in socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)})


def env_without_proxy():
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def client_hello(names=(), name_type=0, hs_type=1, pad=0, suites=1, copies=1):
    """A hand-made TLS ClientHello handshake message (not a record) whose
    server_name extension lists names (none: no extension), sent copies times."""
    body = b"\x03\x03" + os.urandom(32) + b"\x00"
    body += struct.pack(">H", 2 * suites) + b"\x13\x01" * suites + b"\x01\x00"
    exts = b""
    if names:
        entries = b"".join(bytes([name_type]) + struct.pack(">H", len(n)) + n.encode() for n in names)
        sn = struct.pack(">H", len(entries)) + entries
        exts += (b"\x00\x00" + struct.pack(">H", len(sn)) + sn) * copies
    exts += b"\x00\x2b\x00\x03\x02\x03\x04"
    if pad:
        exts += b"\x00\x15" + struct.pack(">H", pad) + bytes(pad)
    body += struct.pack(">H", len(exts)) + exts
    return bytes([hs_type]) + struct.pack(">I", len(body))[1:] + body


def records(handshake, cut=None):
    """The handshake message in one TLS record, or in two split at cut."""
    parts = [handshake] if cut is None else [handshake[:cut], handshake[cut:]]
    out = b""
    for part in parts:
        for i in range(0, len(part), 16384):
            chunk = part[i:i + 16384]
            out += b"\x16\x03\x01" + struct.pack(">H", len(chunk)) + chunk
    return out


def tunnel_bytes(target, data, timeout=15):
    """CONNECT target, send data through the tunnel, return what comes back
    (the door closes a refused tunnel without a byte)."""
    s = socket.create_connection(PROXY, timeout=timeout)
    try:
        s.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)).encode())
        head = read_head(s)
        s.sendall(data)
        back = read_all(s, 4096)
        if back.endswith(b"[reset]"):  # closed with our bytes unread: no answer either
            back = back[:-7]
        return head.split("\r\n")[0] + " | " + back.hex()
    finally:
        s.close()
