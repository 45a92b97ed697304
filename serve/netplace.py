"""Workers on two sides of a shaped link: prefill (and the router) in one network namespace,
decode in another, KV crossing a rate-limited veth pair, control messages a second, unshaped
one (so tokens never queue behind KV bytes).

The router process must itself run inside the server namespace (``bench e2e --rate`` re-runs
itself there). Workers are started with ``ip netns exec`` and connect back to the router over
an authenticated ``multiprocessing.connection`` socket; UCX is forced onto tcp over the shaped
veth (shared memory would bypass the link).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
from dataclasses import dataclass
from multiprocessing.connection import Listener

from thunderkv._spawn import module_argv

ENV = "THUNDERKV_PLACEMENT"


@dataclass
class LinkInfo:
    """What a process inside the server namespace needs to know about the link."""

    server_ns: str
    client_ns: str
    server_addr: str
    client_addr: str
    server_control_addr: str
    rate_bps: int

    @classmethod
    def from_link(cls, link) -> LinkInfo:
        return cls(link.server_ns, link.client_ns, link.server_addr, link.client_addr,
                   link.server_control_addr, link.rate_bps)

    def to_env(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_env(cls) -> LinkInfo | None:
        text = os.environ.get(ENV)
        return cls(**json.loads(text)) if text else None


class _Proc:
    """A Popen with the bits of multiprocessing.Process the engine uses."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def kill(self) -> None:
        self.popen.kill()


class Placement:
    """Launches workers: prefill/colocated in the server namespace, decode in the client one."""

    def __init__(self, link: LinkInfo) -> None:
        self.link = link
        self.authkey = secrets.token_bytes(32)
        self.listener = Listener((link.server_control_addr, 0), authkey=self.authkey)
        self._lock = threading.Lock()

    def launch(self, worker_id: int, role: str, config, token: str):
        side = "client" if role == "decode" else "server"
        ns = self.link.client_ns if side == "client" else self.link.server_ns
        kv_host = self.link.client_addr if side == "client" else self.link.server_addr
        host, port = self.listener.address
        env = {**os.environ, "THUNDERKV_WORKER_AUTHKEY": self.authkey.hex(),
               "THUNDERKV_TRANSFER_TOKEN": token, "UCX_TLS": "tcp",
               "UCX_NET_DEVICES": "tkv-c" if side == "client" else "tkv-s"}
        env.pop(ENV, None)
        argv = ["ip", "netns", "exec", ns, *module_argv("thunderkv.serve.worker"),
                "--connect", f"{host}:{port}", "--id", str(worker_id), "--model", config.model,
                "--role", role, "--threads", str(config.threads), "--kv-host", kv_host]
        popen = subprocess.Popen(argv, env=env)
        with self._lock:  # workers connect in any order; each says who it is first
            conn = self.listener.accept()
            hello = conn.recv()
        if hello.get("hello") != worker_id:
            raise RuntimeError(f"worker {worker_id} expected, {hello} connected")
        return _Proc(popen), conn

    def close(self) -> None:
        self.listener.close()
