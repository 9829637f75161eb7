"""Who may talk to the node, and how much any peer can make it hold: access control under pynetdicom.

pynetdicom checks a calling AE title list and counts associations, and that is all. A PACS
administrator also needs, and this module adds, in the few places pynetdicom leaves open:

* **callers by AE title and host**: ``ORTHANC@10.1.2.3``, ``ORTHANC@10.1.0.0/16``, ``*@10.1.0.0/16``
  or a bare ``ORTHANC``; a host no rule names is cut at ``accept()``, an AE title from the wrong
  host is rejected (A-ASSOCIATE-RJ, calling AE title not recognised);
* **the called AE title** must be the node's (A-ASSOCIATE-RJ, called AE title not recognised);
* **connections that have not associated yet are bounded and evicted oldest first**: idle sockets
  (which used to fill pynetdicom's fixed limit of 10 and lock out the PACS), slow association
  requests and floods only ever displace each other, while the association limit counts
  associations that were admitted (default 32);
* **every PDU is bounded before it is read**: an A-ASSOCIATE-RQ over ``max_request_bytes`` (one
  that declared 4 GB used to be buffered as it arrived, no AE title needed) and a P-DATA PDU over
  the negotiated maximum close the connection at its 6-byte header; an instance over
  ``max_instance_bytes`` closes it as soon as that many bytes have come;
* **TLS** with a client certificate required (:func:`tls_server_context`), the handshake done in
  the connection's own thread under a timeout (pynetdicom does it in the accept loop, where one
  silent client stalls every other).

The policy itself (:class:`AccessPolicy`, :class:`CallerRule`, :func:`tls_server_context`) lives in
:mod:`pneumo.dicom.policy`.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from pneumo.dicom.policy import AccessPolicy, CallerRule, tls_server_context

__all__ = ["AccessPolicy", "CallerRule", "Guard", "GuardedServer", "tls_server_context"]  # the policy, re-exported

log = logging.getLogger(__name__)

#: PDU types (PS3.8 9.3): A-ASSOCIATE-RQ/AC/RJ, P-DATA-TF, A-RELEASE-RQ/RP, A-ABORT.
_ASSOCIATE_TYPES = (0x01, 0x02, 0x03)
_P_DATA = 0x04
_SMALL_PDU_BYTES = 64


@dataclass
class Connection:
    """One TCP connection to the SCP: who, since when, and whether its association was admitted."""

    sock: socket.socket
    peer: str
    opened: float = field(default_factory=time.monotonic)
    admitted: bool = False
    closed: bool = False
    assoc: Any = None

    @property
    def finished(self) -> bool:
        """Its association thread ran and ended (its socket may have been closed without telling us)."""
        return self.closed or (self.assoc is not None and self.assoc.ident is not None and not self.assoc.is_alive())

    def peer_left(self) -> bool:
        """The peer closed its side or the connection broke: ``poll`` with ``POLLRDHUP``, reading nothing.

        Never a ``recv`` here: this runs in the accept loop while the connection's own thread reads
        the same socket with a timeout, and Python's ``recv`` on a socket in timeout mode waits for
        data up to that timeout whatever the flags (a peek that lost the race to the reader stalled
        every later connection for up to a minute). Where ``POLLRDHUP`` does not exist (not Linux),
        only a hang-up or an error counts.
        """
        try:
            poller = select.poll()
            poller.register(self.sock.fileno(), getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def drop(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class Guard:
    """The policy applied: the connection table, admission, and the audit of refusals.

    Args:
        policy: the limits.
        ae_title: the node's own (called) AE title.
        on_refusal: called with ``(reason, peer, calling_ae, called_ae, detail)`` for every refusal.
    """

    def __init__(self, policy: AccessPolicy, ae_title: str, on_refusal: Callable[..., None]) -> None:
        self.policy = policy
        self.ae_title = ae_title
        self.on_refusal = on_refusal
        self._lock = threading.Lock()
        self._connections: dict[int, Connection] = {}

    def open(self, sock: socket.socket, peer: str) -> bool:
        """Register a new connection, evicting the oldest unadmitted one when too many wait; False refuses it."""
        if not self.policy.host_allowed(peer):
            self.on_refusal("host_not_allowed", peer)
            return False
        with self._lock:
            live = {key: c for key, c in self._connections.items() if not c.finished}
            self._connections = live
            # Connections whose peer already left go first, then the oldest: a flood of short-lived or idle
            # connections only ever displaces itself, while a sender that associates at once gets through.
            pending = sorted((c for c in live.values() if not c.admitted), key=lambda c: (not c.peer_left(), c.opened))
            while len(pending) >= self.policy.max_pending:
                oldest = pending.pop(0)
                oldest.drop()
                self.on_refusal(
                    "evicted_unassociated", oldest.peer, detail={"open_s": round(time.monotonic() - oldest.opened, 1)}
                )
            self._connections[id(sock)] = Connection(sock, peer)
        return True

    def connection(self, sock: Any) -> Connection | None:
        return self._connections.get(id(sock))

    def admit(self, sock: Any, calling_ae: str, called_ae: str, peer: str) -> tuple[str, tuple[int, int, int]] | None:
        """Decide on an A-ASSOCIATE-RQ: ``None`` admits it, else ``(reason, (result, source, diagnostic))``."""
        if not self.policy.caller_allowed(calling_ae, peer):
            return "calling_ae_not_allowed", (0x01, 0x01, 0x03)
        if self.policy.check_called_ae and called_ae != self.ae_title:
            return "called_ae_not_recognised", (0x01, 0x01, 0x07)
        with self._lock:
            admitted = sum(1 for c in self._connections.values() if c.admitted and not c.finished)
            if admitted >= self.policy.max_associations:
                return "association_limit", (0x02, 0x03, 0x02)
            conn = self._connections.get(id(sock))
            if conn is not None:
                conn.admitted = True
        return None

    def close(self, sock: Any) -> None:
        with self._lock:
            conn = self._connections.pop(id(sock), None)
        if conn is not None:
            conn.closed = True

    def pdu_limit(self, pdu_type: int) -> int:
        if pdu_type in _ASSOCIATE_TYPES:
            return self.policy.max_request_bytes
        if pdu_type == _P_DATA:
            return self.policy.max_pdu_bytes + _SMALL_PDU_BYTES
        return _SMALL_PDU_BYTES


class BoundedSocket(AssociationSocket):
    """pynetdicom's socket, refusing any PDU over its limit at the 6-byte header, and oversized instances.

    pynetdicom reads a PDU as ``recv(6)`` (type and length) then ``recv(length)``; answering an
    over-limit length with no bytes makes pynetdicom see a closed connection (after this closes it).
    """

    guard: Guard
    peer: str
    raw: Any = None
    _pdu: tuple[int, int] | None = None
    _requested = False
    _instance_bytes = 0

    def recv(self, nr_bytes: int) -> bytearray:
        deadline = time.monotonic() + self.guard.policy.network_timeout_s
        if self._pdu is None:
            data = self._read(nr_bytes, deadline)
            if nr_bytes == 6 and len(data) == 6:
                pdu_type, _, length = struct.unpack(">BBL", bytes(data))
                if length > self.guard.pdu_limit(pdu_type):
                    return self._refuse("request_too_large" if pdu_type == 0x01 else "pdu_too_large", length)
                self._pdu = (pdu_type, length)
            elif len(data) < nr_bytes:
                self._closed_early()
            return data
        pdu_type, length = self._pdu
        self._pdu = None
        data = self._read(nr_bytes, deadline)
        if len(data) < length:
            self._closed_early()
        elif pdu_type == 0x01:
            self._requested = True
        elif pdu_type == _P_DATA and not self._count_instance_bytes(data):
            return self._refuse("instance_too_large", self._instance_bytes)
        return data

    def _closed_early(self) -> None:
        """The peer left before completing its A-ASSOCIATE-RQ: end the association thread now.

        pynetdicom's acceptor would wait out the whole ACSE timeout for a request that cannot come
        (a flood of such connections piles up threads); ``None`` on its queue means "timed out".
        """
        if not self._requested:
            self.assoc.dul.to_user_queue.put(None)

    def _read(self, nr_bytes: int, deadline: float) -> bytearray:
        """Up to ``nr_bytes``; fewer when the peer closes or the PDU does not arrive by ``deadline``."""
        sock = self.socket
        data = bytearray()
        while sock is not None and len(data) < nr_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                sock.settimeout(left)
                chunk = sock.recv(min(65536, nr_bytes - len(data)))
            except (OSError, ValueError):  # timeout, reset, or closed under us: a short read says "closed"
                break
            if not chunk:
                break
            data += chunk
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.settimeout(None)
        return data

    def _count_instance_bytes(self, body: bytearray) -> bool:
        """Add the dataset bytes of this P-DATA PDU to the instance being received; False when over the limit."""
        offset = 0
        while offset + 6 <= len(body):
            (item_length,) = struct.unpack(">L", bytes(body[offset : offset + 4]))
            header = body[offset + 5]
            if not header & 0x01:  # a dataset fragment (not a command)
                self._instance_bytes += max(0, item_length - 2)
                if self._instance_bytes > self.guard.policy.max_instance_bytes:
                    return False
                if header & 0x02:  # the last fragment of this dataset
                    self._instance_bytes = 0
            offset += 4 + item_length
        return True

    def _refuse(self, reason: str, size: int) -> bytearray:
        self.guard.on_refusal(reason, self.peer, detail={"bytes": size})
        self._closed_early()
        if self.socket is not None:
            with contextlib.suppress(OSError):
                self.socket.shutdown(socket.SHUT_RDWR)
        return bytearray()


class GuardedHandler(RequestHandler):
    """pynetdicom's request handler, with the TLS handshake here (under a timeout) and the bounded socket."""

    server: GuardedServer

    def handle(self) -> None:
        guard = self.server.guard
        sock = self.request
        if isinstance(sock, ssl.SSLSocket):
            try:
                sock.settimeout(guard.policy.tls_handshake_s)
                sock.do_handshake()
                sock.settimeout(None)
            except (OSError, ssl.SSLError) as err:
                guard.on_refusal("tls_handshake_failed", self.client_address[0], detail={"error": type(err).__name__})
                guard.close(sock)
                self.server.shutdown_request(sock)
                return
        super().handle()

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        guarded = cast(BoundedSocket, assoc.dul.socket)
        guarded.__class__ = BoundedSocket  # same object and state, bounded recv (see BoundedSocket)
        guarded.guard = self.server.guard
        guarded.peer = str(self.client_address[0])
        guarded.raw = self.request
        conn = self.server.guard.connection(self.request)
        if conn is not None:
            conn.assoc = assoc
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the :class:`Guard` at ``accept()`` and TLS handshakes off the accept loop.

    The listen backlog is 128, not socketserver's 5: a burst of connections waits in the kernel for the
    guard to accept and judge them, instead of having its SYNs dropped (a sender on a busy machine then
    stalls for seconds of TCP retransmission before the guard ever sees it).
    """

    request_queue_size = 128

    def __init__(
        self,
        ae: Any,
        address: Any,
        ae_title: str,
        contexts: Any,
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: Any = None,
        *,
        guard: Guard,
    ) -> None:
        self.guard = guard
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers, request_handler=GuardedHandler)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.guard.open(request, str(client_address[0]))

    def shutdown_request(self, request: Any) -> None:
        self.guard.close(request)
        super().shutdown_request(request)

    def shutdown(self) -> None:
        """Stop serving and close the socket (started by the node, not through ``AE.start_server``)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()
