"""The node's access policy: which callers may associate, and the limits every connection lives under.

Plain configuration (``pneumo dicom listen`` maps its options onto :class:`AccessPolicy`); the
:mod:`pneumo.dicom.guard` applies it under pynetdicom. Also the server TLS context (DICOM TLS,
PS3.15 B.1: a client certificate is required when TLS is on).
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class CallerRule:
    """One allowed caller: an AE title (``None``: any) from a network (``None``: any host)."""

    ae_title: str | None
    network: IpNetwork | None

    @classmethod
    def parse(cls, text: str) -> CallerRule:
        """``AE``, ``AE@host-ip``, ``AE@network/prefix`` or ``*@network/prefix``.

        Raises:
            ValueError: the text is none of these; the message shows the forms.
        """
        ae, _, host = text.strip().partition("@")
        if not ae or len(ae) > 16 or "\\" in ae or (ae == "*" and not host):
            raise ValueError(f"caller {text!r} is not AE, AE@HOST or AE@NETWORK/PREFIX (e.g. ORTHANC@10.0.0.0/8).")
        try:
            network = ipaddress.ip_network(host, strict=False) if host else None
        except ValueError as err:
            raise ValueError(f"caller {text!r}: {host!r} is not an IP address or network (e.g. 10.0.0.0/8).") from err
        return cls(None if ae == "*" else ae, network)

    def host_matches(self, ip: str) -> bool:
        try:
            return self.network is None or ipaddress.ip_address(ip.split("%")[0]) in self.network
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"{self.ae_title or '*'}@{self.network}" if self.network else str(self.ae_title)


@dataclass(frozen=True)
class AccessPolicy:
    """The node's access and resource limits (``pneumo dicom listen`` maps its options onto this).

    Attributes:
        callers: allowed callers; empty allows any caller (a warning is logged at start).
        check_called_ae: reject associations addressed to another AE title.
        max_associations: associations admitted at once (more get A-ASSOCIATE-RJ, local limit exceeded).
        max_pending: connections not yet admitted (more evict the oldest of them).
        request_timeout_s: ACSE timeout: how long a connection may take to send its A-ASSOCIATE-RQ.
        dimse_timeout_s: how long the node waits for a DIMSE message it expects.
        network_timeout_s: an association idle this long is aborted; also the time one PDU may take to arrive.
        max_request_bytes: largest A-ASSOCIATE-RQ accepted.
        max_pdu_bytes: the Maximum Length the node receives (negotiated; larger P-DATA PDUs close the connection).
        max_instance_bytes: largest C-STORE dataset accepted.
        tls_handshake_s: time allowed for the TLS handshake, when TLS is on.
    """

    callers: tuple[CallerRule, ...] = ()
    check_called_ae: bool = True
    max_associations: int = 32
    max_pending: int = 16
    request_timeout_s: float = 10.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    max_request_bytes: int = 64 * 1024
    max_pdu_bytes: int = 256 * 1024
    max_instance_bytes: int = 1024 * 2**20
    tls_handshake_s: float = 10.0

    def host_allowed(self, ip: str) -> bool:
        return not self.callers or any(rule.host_matches(ip) for rule in self.callers)

    def caller_allowed(self, ae_title: str, ip: str) -> bool:
        return not self.callers or any(
            rule.host_matches(ip) and (rule.ae_title is None or rule.ae_title == ae_title) for rule in self.callers
        )


def tls_server_context(certificate: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 or later) that requires a client certificate signed by ``client_ca``.

    Raises:
        ValueError: a file is missing or unreadable; the message names it.
    """
    for path in (certificate, key, client_ca):
        if not Path(path).is_file():
            raise ValueError(f"TLS file {path} does not exist; give the node's certificate, its key and the CA.")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(str(certificate), str(key))
    except (OSError, ssl.SSLError) as err:
        raise ValueError(f"TLS certificate {certificate} or key {key} cannot be loaded ({err}).") from err
    return context
