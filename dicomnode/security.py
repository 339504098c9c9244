"""DICOM TLS (PS3.15 Annex B) for the node: SSL contexts for the C-STORE SCP and for SCU destinations.

The node speaks TLS with the same certificate model as dcmtk: the SCP presents ``node.tls.cert`` and
``node.tls.key``; when ``node.tls.ca`` is set, client certificates signed by that CA are verified, and
with ``require_client_cert`` a client without one is refused during the handshake (before any DICOM
PDU is read). For destinations, the peer's certificate is verified against ``tls.ca`` (or the system
trust store when no CA is given) and ``cert``/``key`` are presented when the PACS asks for them.

A destination's certificate must also name the host the node connects to (``host``, a DNS name or an
IP address in its subjectAltName), so a certificate the CA issued to another machine cannot stand in
for the PACS; ``verify_hostname: false`` turns that off for a CA that signs only the site's own peers.
Client certificates are not matched to host names (modalities are identified by certificate and AE
title). Only TLS 1.2 and newer is offered (BCP 195, which dcmtk's default profile needs).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2


class TLSConfigError(ValueError):
    """The TLS settings cannot be used: a missing or unreadable file, a key that does not match, ..."""


def _path(tls_cfg: Any, name: str) -> Path | None:
    """Read ``name`` from a pydantic model, dataclass or mapping; None when unset."""
    value = tls_cfg.get(name) if isinstance(tls_cfg, dict) else getattr(tls_cfg, name, None)
    return None if value in (None, "") else Path(value)


def _existing(path: Path | None, what: str) -> Path | None:
    if path is not None and not path.is_file():
        raise TLSConfigError(f"TLS {what} file not found: {path}")
    return path


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path, who: str) -> None:
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{who}: cannot load certificate {cert} with key {key}: {exc.reason or exc}") from exc


def _load_ca(ctx: ssl.SSLContext, ca: Path, who: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{who}: cannot load CA certificates from {ca}: {exc.reason or exc}") from exc


def server_ssl_context(tls_cfg: Any) -> ssl.SSLContext:
    """SSL context for the node's SCP from ``node.tls`` ({cert, key, ca, require_client_cert}).

    Without ``ca`` any client may connect over TLS (the channel is encrypted, the client anonymous);
    with ``ca`` a client certificate, when presented, must chain to it; with ``require_client_cert``
    it must also be presented. Raises :class:`TLSConfigError` naming the file or setting at fault.
    """
    cert = _existing(_path(tls_cfg, "cert"), "certificate")
    key = _existing(_path(tls_cfg, "key"), "private key")
    ca = _existing(_path(tls_cfg, "ca"), "CA")
    require = bool(tls_cfg.get("require_client_cert") if isinstance(tls_cfg, dict)
                   else getattr(tls_cfg, "require_client_cert", False))
    if cert is None or key is None:
        raise TLSConfigError("node.tls needs both cert and key (the node's certificate and private key)")
    if require and ca is None:
        raise TLSConfigError("node.tls.require_client_cert needs node.tls.ca to verify client certificates against")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_TLS_VERSION
    _load_chain(ctx, cert, key, "node.tls")
    if ca is not None:
        _load_ca(ctx, ca, "node.tls")
        ctx.verify_mode = ssl.CERT_REQUIRED if require else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    logger.info("TLS enabled for the SCP (client certificates %s)",
                "required" if require else "verified when presented" if ca else "not checked")
    return ctx


def client_ssl_context(tls_cfg: Any) -> ssl.SSLContext:
    """SSL context for sending to a destination from its ``tls`` settings ({ca, cert, key}).

    The PACS certificate must chain to ``ca`` (system trust store when unset); ``cert`` and ``key``
    are presented as the node's client certificate when both are given (one without the other is
    an error, never silently ignored). The PACS certificate must name the host connected to unless
    ``verify_hostname`` is false.
    """
    ca = _existing(_path(tls_cfg, "ca"), "CA")
    cert = _existing(_path(tls_cfg, "cert"), "certificate")
    key = _existing(_path(tls_cfg, "key"), "private key")
    if (cert is None) != (key is None):
        raise TLSConfigError("destination tls: cert and key go together (give both or neither)")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MINIMUM_TLS_VERSION
    verify = tls_cfg.get("verify_hostname", True) if isinstance(tls_cfg, dict) else getattr(tls_cfg, "verify_hostname", True)
    ctx.check_hostname = bool(verify)  # the certificate must name the host in client_tls_args (see module docstring)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if ca is not None:
        _load_ca(ctx, ca, "destination tls")
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None and key is not None:
        _load_chain(ctx, cert, key, "destination tls")
    return ctx


def client_tls_args(tls_cfg: Any | None, host: str) -> tuple[ssl.SSLContext, str] | None:
    """``tls_args`` for ``pynetdicom.AE.associate`` (context, SNI host name); None for plain TCP."""
    if tls_cfg is None:
        return None
    return client_ssl_context(tls_cfg), host
