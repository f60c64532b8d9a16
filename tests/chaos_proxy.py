"""A fault-injecting HTTP proxy for the hardening tests: put it between boto3 and the moto server
(AWS_ENDPOINT_URL) or between the validation/batch clients and vLLM.

Each request, with probability `rate`, gets one fault instead of the upstream's answer:
- `throttle`: AWS's throttling error in the request's own protocol (JSON `ThrottlingException`,
  query/EC2 XML `Throttling`/`RequestLimitExceeded`, S3 `SlowDown` 503); a plain 429 for vLLM;
- `error_5xx`: a 500 (AWS `InternalError`) or a 503 (vLLM, as a load balancer answers);
- `drop`: the connection is closed before the request reaches the upstream (a reset).
Faults are injected before forwarding, so a retried create never meets its own first attempt.
Responses are relayed as they arrive (SSE streams stay streams). `counts` says what was injected.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

EC2_VERSION = "2016-11-15"


class ChaosProxy:
    def __init__(self, upstream: str, rate: float, kinds=("throttle", "error_5xx", "drop"), aws: bool = True, seed: int = 7):
        self.upstream = urlsplit(upstream)
        self.rate, self.kinds, self.aws = rate, tuple(kinds), aws
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.requests = 0
        self.parse_errors = 0
        self.upstream_errors: list[tuple] = []
        self.enabled = True
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "ChaosProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _pick(self, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            if not self.enabled or path.startswith("/moto-api") or self._random.random() >= self.rate:
                return None
            kind = self._random.choice(self.kinds)
            self.counts[kind] += 1
            return kind

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    body = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return body
                        body += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def send_error(self, code, message=None, explain=None) -> None:
                proxy.parse_errors += 1  # a request the proxy itself could not read: a bug here, not a fault
                super().send_error(code, message, explain)

            def _fault(self, kind: str, body: bytes) -> None:
                if kind == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                status, ctype, payload = proxy.error_response(kind, self.headers, body)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _relay(self) -> None:
                body = self._body()
                kind = proxy._pick(self.path)
                if kind:
                    self._fault(kind, body)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=600)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "proxy-connection", "transfer-encoding")}
                if body:
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body if body or self.command in ("POST", "PUT") else None,
                             headers=headers)
                resp = conn.getresponse()
                if resp.status == 400 and resp.getheader("Content-Length") is not None:
                    peek = resp.read()  # small error bodies only: kept for diagnosis, then relayed
                    proxy.upstream_errors.append((self.command, self.path, dict(self.headers), peek[:500]))
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection"):
                            self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(peek)
                    conn.close()
                    return
                self.send_response(resp.status, resp.reason)
                chunked = resp.getheader("Content-Length") is None and self.command != "HEAD" and resp.status not in (204, 304)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection"):
                        self.send_header(k, v)
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if self.command == "HEAD":
                    conn.close()
                    return
                while True:
                    chunk = resp.read1(65536) if chunked else resp.read(65536)
                    if not chunk:
                        break
                    if chunked:
                        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                        self.wfile.flush()
                    else:
                        self.wfile.write(chunk)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
                conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _relay

        return Handler

    def error_response(self, kind: str, headers, body: bytes) -> tuple[int, str, bytes]:
        if not self.aws:
            status = 429 if kind == "throttle" else 503
            return status, "application/json", json.dumps({"error": {"message": f"chaos {kind}", "code": status}}).encode()
        throttle = kind == "throttle"
        # The signing scope names the service (…/us-east-1/s3/aws4_request): S3's errors are REST XML
        # even for a JSON object body, which the Content-Type would otherwise suggest.
        scope = (headers.get("Authorization") or "").split("Credential=")[-1].split(",")[0].split("/")
        service = scope[3] if len(scope) > 3 else ""
        if service == "s3":
            code = "SlowDown" if throttle else "InternalError"
            return (503 if throttle else 500), "application/xml", (
                f"<Error><Code>{code}</Code><Message>chaos {kind}</Message><RequestId>chaos</RequestId></Error>").encode()
        if headers.get("X-Amz-Target") or "json" in (headers.get("Content-Type") or ""):
            code = "ThrottlingException" if throttle else "InternalFailure"
            return (400 if throttle else 500), "application/x-amz-json-1.1", json.dumps(
                {"__type": code, "message": f"chaos {kind}"}).encode()
        form = parse_qs(body.decode(errors="replace")) if "x-www-form-urlencoded" in (headers.get("Content-Type") or "") else {}
        if form.get("Action"):
            if form.get("Version", [""])[0] == EC2_VERSION:
                code = "RequestLimitExceeded" if throttle else "InternalError"
                xml = (f"<Response><Errors><Error><Code>{code}</Code><Message>chaos {kind}</Message></Error></Errors>"
                       "<RequestID>chaos</RequestID></Response>")
            else:
                code = "Throttling" if throttle else "InternalFailure"
                xml = (f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>chaos {kind}</Message>"
                       "</Error><RequestId>chaos</RequestId></ErrorResponse>")
            return (400 if throttle else 500), "text/xml", xml.encode()
        code = "SlowDown" if throttle else "InternalError"  # S3
        return (503 if throttle else 500), "application/xml", (
            f"<Error><Code>{code}</Code><Message>chaos {kind}</Message><RequestId>chaos</RequestId></Error>").encode()
