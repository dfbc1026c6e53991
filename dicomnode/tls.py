"""DICOM TLS contexts (TLS 1.2 or later, as PS3.15's BCP 195 profiles ask): the files they
load, for the listener's ``[tls]`` and each ``[[destinations]]`` table with ``tls = true``."""

from __future__ import annotations

import re
import ssl
import threading
from pathlib import Path

from dicomnode.config import Destination


def load_cert_chain(context: ssl.SSLContext, cert: Path, key: Path, what: str) -> None:
    """Load a certificate (PEM, with any intermediates) and its private key into ``context``;
    a ValueError ``<what>: cannot load <files>: <why>`` when they cannot be loaded."""
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"{what} {cert} / key {key}: {exc}") from exc


def load_ca(context: ssl.SSLContext, ca: Path, what: str) -> None:
    """Trust the CA certificate(s) in ``ca`` (PEM); a ValueError ``<what> <ca>: <why>``."""
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"{what} {ca}: {exc}") from exc


def _resolved(path: Path, base_dir: Path) -> Path:
    return path if path.is_absolute() else base_dir / path


def destination_context(destination: Destination, base_dir: Path) -> ssl.SSLContext:
    """The TLS context for exports to ``destination`` (its ``tls_*`` keys, relative paths
    against ``base_dir``): the PACS's certificate verified against ``tls_ca`` (else the
    system's trust store) and, with ``tls_verify_hostname``, checked to name its ``host``;
    ``tls_cert``/``tls_key`` as the node's client certificate. A ValueError names the key
    and the file that cannot be loaded."""
    where = f"[[destinations]] {destination.name}:"
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if destination.tls_ca is not None:
        ca = _resolved(destination.tls_ca, base_dir)
        load_ca(context, ca, f"{where} cannot load tls_ca")
    if destination.tls_cert is not None and destination.tls_key is not None:
        cert = _resolved(destination.tls_cert, base_dir)
        key = _resolved(destination.tls_key, base_dir)
        load_cert_chain(context, cert, key, f"{where} cannot load tls_cert")
    # Without the check the chain is still verified: only the name in it is not compared.
    context.check_hostname = destination.tls_verify_hostname
    return context


# Per destination (by name): its TLS keys, base folder and files as they were on disk, and the
# context built from them; rebuilt when any of them changes (a reload, a renewed certificate
# written over the old file), at the next association.
_CONTEXTS: dict[str, tuple[tuple, ssl.SSLContext]] = {}
_CONTEXTS_LOCK = threading.Lock()


def _file_state(path: Path | None, base_dir: Path) -> tuple:
    if path is None:
        return ()
    resolved = _resolved(path, base_dir)
    try:
        stat = resolved.stat()
    except OSError:
        return (str(resolved),)
    return (str(resolved), stat.st_mtime_ns, stat.st_size)


def destination_tls_args(destination: Destination, base_dir: Path) -> tuple[ssl.SSLContext, str]:
    """pynetdicom's ``tls_args`` for an association to ``destination`` (``tls = true``): its
    context (:func:`destination_context`, built once and reused while its keys and files stay
    the same) and the host name its certificate must name."""
    files = (destination.tls_ca, destination.tls_cert, destination.tls_key)
    state = (
        destination.tls_verify_hostname,
        str(base_dir),
        *(_file_state(path, base_dir) for path in files),
    )
    with _CONTEXTS_LOCK:
        built = _CONTEXTS.get(destination.name)
    if built is not None and built[0] == state:
        return built[1], destination.host
    context = destination_context(destination, base_dir)
    with _CONTEXTS_LOCK:
        _CONTEXTS[destination.name] = (state, context)
    return context, destination.host


_OPENSSL_NOISE = re.compile(r"^\[SSL: [A-Z0-9_]+\] | \(_ssl\.c:\d+\)$")


def handshake_failure(exc: ssl.SSLError) -> str:
    """Why a TLS handshake failed, in OpenSSL's words without its code names and source lines:
    ``certificate verify failed: unable to get local issuer certificate``."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    return _OPENSSL_NOISE.sub("", str(exc)).strip() or type(exc).__name__
