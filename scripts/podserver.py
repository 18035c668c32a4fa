#!/usr/bin/env python3
"""A pod's workload for kxp's namespace tests and demo: answers with its pod name.

HTTP on --http-port (default 8080):
  GET /        -> "<name>\n"
  GET /big     -> the bytes of --big (a file), for transfers whose bytes are verified
UDP on --udp-port (default 5353): every datagram is answered with "<name>:<datagram>".

Runs until killed. Standard library only.
"""
import argparse
import http.server
import socket
import socketserver
import sys
import threading


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--udp-port", type=int, default=5353)
    p.add_argument("--big")
    a = p.parse_args()
    name = a.name.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if self.path == "/big" and a.big:
                with open(a.big, "rb") as f:
                    body = f.read()
            elif self.path in ("/", "/name"):
                body = name + b"\n"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Pod", a.name)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    httpd = Server(("0.0.0.0", a.http_port), Handler)

    def udp():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", a.udp_port))
        while True:
            data, peer = s.recvfrom(65535)
            s.sendto(name + b":" + data, peer)

    threading.Thread(target=udp, daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    httpd.serve_forever()


if __name__ == "__main__":
    main()
