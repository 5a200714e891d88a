"""Test certificates, made with the ``openssl`` command-line tool.

A CA, a server certificate for ``IP:127.0.0.1`` and ``DNS:localhost`` and a client
certificate, all signed by that CA, with EC P-256 keys (quick to generate). Each test makes
its own in its tmp_path; nothing is shared or kept.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """A CA and the server and client certificates it signed."""

    ca: KeyPair
    server: KeyPair
    client: KeyPair


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        [OPENSSL, *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def make_ca(directory: Path, name: str = "ca") -> KeyPair:
    """A self-signed CA certificate valid for a day."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(pair.key), "-out", str(pair.cert), "-days", "1",
        "-subj", f"/CN=lesson-progress test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return pair


def issue(ca: KeyPair, directory: Path, name: str, *, server: bool) -> KeyPair:
    """A leaf certificate signed by ``ca``: for a server (SAN 127.0.0.1 and localhost) or a
    client (CN ``name``)."""
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    extensions = directory / f"{name}.ext"
    if server:
        extensions.write_text(
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        )
    else:
        extensions.write_text(
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=clientAuth\n"
        )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(pair.key), "-out", str(csr),
        "-subj", f"/CN={'localhost' if server else name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-out", str(pair.cert), "-days", "1", "-sha256",
        "-extfile", str(extensions),
        cwd=directory,
    )  # fmt: skip
    return pair


def make_pki(directory: Path) -> Pki:
    """A CA with a server and a client certificate, in ``directory``."""
    ca = make_ca(directory)
    return Pki(
        ca=ca,
        server=issue(ca, directory, "server", server=True),
        client=issue(ca, directory, "client", server=False),
    )
