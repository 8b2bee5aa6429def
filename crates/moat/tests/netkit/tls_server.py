# An HTTPS test server for moat's network tests (runs on the host, started by
# the tests). Usage: tls_server.py CERT KEY [GIT_PROJECT_ROOT]
# Listens on 127.0.0.1 (random port) and prints one JSON line per event on
# stdout: ["ready", port], ["conn", peer] for every accepted TCP connection
# (before any TLS byte is read), ["req", method, path, host] per request,
# ["tls-error", text] for a failed handshake. Paths under /git/ are served by
# `git http-backend` from GIT_PROJECT_ROOT; anything else gets a short text.
import http.server
import json
import os
import socket
import ssl
import subprocess
import sys
import threading

CERT, KEY = sys.argv[1], sys.argv[2]
GIT_ROOT = sys.argv[3] if len(sys.argv) > 3 else None
_lock = threading.Lock()


def emit(*event):
    with _lock:
        sys.stdout.write(json.dumps(list(event)) + "\n")
        sys.stdout.flush()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, status, headers, body):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def any(self):
        body = self.read_body()
        emit("req", self.command, self.path, self.headers.get("Host", ""))
        if GIT_ROOT and self.path.startswith("/git/"):
            return self.git(body)
        self.reply(200, [("Content-Type", "text/plain")], b"tls-hello " + self.path.encode() + b"\n")

    def git(self, body):
        path, _, query = self.path[len("/git"):].partition("?")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": GIT_ROOT,
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": "127.0.0.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
        }
        for h in ("Content-Encoding", "Git-Protocol"):
            if self.headers.get(h):
                env["HTTP_" + h.upper().replace("-", "_")] = self.headers[h]
        out = subprocess.run(
            ["git", "-c", "safe.directory=*", "http-backend"],
            input=body, env=env, capture_output=True, timeout=60,
        ).stdout
        head, _, rest = out.partition(b"\r\n\r\n")
        if not rest and b"\n\n" in out:
            head, _, rest = out.partition(b"\n\n")
        status, headers = 200, []
        for line in head.decode("latin-1").splitlines():
            k, _, v = line.partition(":")
            if k.lower() == "status":
                status = int(v.strip().split()[0])
            elif k:
                headers.append((k, v.strip()))
        self.reply(status, headers, rest)

    do_GET = do_POST = do_HEAD = do_PUT = any


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def get_request(self):
        sock, peer = self.socket.accept()
        emit("conn", "%s:%d" % peer[:2])
        sock.settimeout(15)
        return CTX.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), peer

    def handle_error(self, request, client_address):
        emit("tls-error", str(sys.exc_info()[1]))


CTX = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
CTX.load_cert_chain(CERT, KEY)
server = Server(("127.0.0.1", 0), Handler)
emit("ready", server.server_address[1])
server.serve_forever()
