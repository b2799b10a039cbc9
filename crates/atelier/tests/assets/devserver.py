"""Dev server the proxy tests run in a guest: plain pages, header echo, a large
streamed download, a hashed upload and a WebSocket echo (RFC 6455, by hand: the
guest image has only the standard library)."""
import base64, hashlib, http.server, json, socketserver, struct, sys

PATTERN = bytes(range(256)) * 256  # 64 KiB

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send_body(self, code, body, ctype="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/":
            return self.send_body(200, b"hello from the dev server\n")
        if self.path == "/headers":
            h = {k.lower(): v for k, v in self.headers.items()}
            return self.send_body(200, json.dumps({"headers": h, "path": self.path}).encode(), "application/json")
        if self.path.startswith("/headers?"):
            h = {k.lower(): v for k, v in self.headers.items()}
            return self.send_body(200, json.dumps({"headers": h, "path": self.path}).encode(), "application/json")
        if self.path.startswith("/big/"):
            n = int(self.path[5:])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            while n > 0:
                chunk = PATTERN[: min(n, len(PATTERN))]
                self.wfile.write(chunk)
                n -= len(chunk)
            return
        if self.path == "/ws":
            return self.websocket()
        self.send_body(404, b"not found\n")

    def do_POST(self):
        if self.path != "/sha":
            return self.send_body(404, b"not found\n")
        h = hashlib.sha256()
        total = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                data = self.rfile.read(size)
                h.update(data)
                total += len(data)
                self.rfile.readline()
        else:
            n = int(self.headers.get("Content-Length", "0"))
            while n > 0:
                data = self.rfile.read(min(n, 1 << 16))
                if not data:
                    break
                h.update(data)
                total += len(data)
                n -= len(data)
        self.send_body(200, f"{total} {h.hexdigest()}".encode())

    def websocket(self):
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        r, w = self.rfile, self.wfile
        while True:
            head = r.read(2)
            if len(head) < 2:
                return
            op, ln = head[0] & 0x0F, head[1] & 0x7F
            if ln == 126:
                ln = struct.unpack(">H", r.read(2))[0]
            elif ln == 127:
                ln = struct.unpack(">Q", r.read(8))[0]
            mask = r.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytearray(r.read(ln))
            for i in range(len(data)):
                data[i] ^= mask[i % 4]
            if op == 8:
                w.write(b"\x88\x00")
                w.flush()
                return
            if op == 9:
                op = 10
            hdr = bytes([0x80 | op])
            if len(data) < 126:
                hdr += bytes([len(data)])
            elif len(data) < 65536:
                hdr += bytes([126]) + struct.pack(">H", len(data))
            else:
                hdr += bytes([127]) + struct.pack(">Q", len(data))
            w.write(hdr + bytes(data))
            w.flush()

class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 512
    allow_reuse_address = True

Server(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
