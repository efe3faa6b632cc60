"""A throwaway certificate authority for the sandbox's kube-apiserver and its admin.

Each control plane gets its own CA, a serving certificate for loopback, an admin client
certificate in the system:masters group, the apiserver's client certificate for the kubelets
(logs, exec), and the key that signs service-account tokens. Real nodes get from it each a
kubelet client certificate (system:node:<name>) and a serving certificate for the node's
address, which the apiserver checks (--kubelet-certificate-authority).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=365)
CA_KEY = "ca.key"
KUBERNETES_SERVICE_IP = "10.96.0.1"


@dataclass(frozen=True)
class Bundle:
    ca_cert: pathlib.Path
    serving_cert: pathlib.Path
    serving_key: pathlib.Path
    admin_cert: pathlib.Path
    admin_key: pathlib.Path
    kubelet_client_cert: pathlib.Path
    kubelet_client_key: pathlib.Path
    sa_key: pathlib.Path
    sa_pub: pathlib.Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: pathlib.Path, key: ec.EllipticCurvePrivateKey) -> None:
    """0600 from its first byte, and whole or not at all (a temporary file renamed over)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )


def make(directory: pathlib.Path) -> Bundle:
    """Writes a fresh CA, serving, admin and service-account keys into directory."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key = _key()
    ca_name = _name("podwire-sandbox-ca")
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        cn: str, org: str | None, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = _key()
        b = _builder(_name(cn, org), ca_name, key.public_key()).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, b.sign(ca_key, hashes.SHA256())

    serving_key, serving = leaf(
        "kube-apiserver",
        None,
        ExtendedKeyUsageOID.SERVER_AUTH,
        [
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            # The in-cluster address pods use (kubernetes.default, the Service CIDR's first).
            x509.IPAddress(ipaddress.ip_address(KUBERNETES_SERVICE_IP)),
            x509.DNSName("localhost"),
            x509.DNSName("kubernetes.default.svc"),
        ],
    )
    admin_key, admin = leaf("podwire-admin", "system:masters", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    # What the apiserver shows a kubelet for logs, exec and port-forward; the kubelet asks the
    # apiserver (a SubjectAccessReview) whether this user may, and system:masters may.
    kubelet_client_key, kubelet_client = leaf(
        "kube-apiserver-kubelet-client", "system:masters", ExtendedKeyUsageOID.CLIENT_AUTH, []
    )
    sa_key = _key()

    bundle = Bundle(
        ca_cert=directory / "ca.crt",
        serving_cert=directory / "apiserver.crt",
        serving_key=directory / "apiserver.key",
        admin_cert=directory / "admin.crt",
        admin_key=directory / "admin.key",
        kubelet_client_cert=directory / "apiserver-kubelet-client.crt",
        kubelet_client_key=directory / "apiserver-kubelet-client.key",
        sa_key=directory / "sa.key",
        sa_pub=directory / "sa.pub",
    )
    bundle.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    # Kept (0600, beside the others) so that nodes added later get their kubelet's certificate.
    _write_key(directory / CA_KEY, ca_key)
    bundle.serving_cert.write_bytes(serving.public_bytes(serialization.Encoding.PEM))
    bundle.admin_cert.write_bytes(admin.public_bytes(serialization.Encoding.PEM))
    _write_key(bundle.serving_key, serving_key)
    _write_key(bundle.admin_key, admin_key)
    bundle.kubelet_client_cert.write_bytes(kubelet_client.public_bytes(serialization.Encoding.PEM))
    _write_key(bundle.kubelet_client_key, kubelet_client_key)
    _write_key(bundle.sa_key, sa_key)
    bundle.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return bundle


def client(
    directory: pathlib.Path, name: str, cn: str, org: str
) -> tuple[pathlib.Path, pathlib.Path]:
    """A client certificate and key (0600) for cn in group org, signed by the CA that make()
    wrote into directory: a kubelet's (system:node:<node>, system:nodes). Returns their paths."""
    return _issue(directory, name, _name(cn, org), ExtendedKeyUsageOID.CLIENT_AUTH, [])


def serving(
    directory: pathlib.Path, name: str, cn: str, addresses: list[str]
) -> tuple[pathlib.Path, pathlib.Path]:
    """A serving certificate and key (0600) for cn at these IP addresses, signed by the CA that
    make() wrote into directory: a kubelet's, for its node's address. Returns their paths."""
    sans: list[x509.GeneralName] = [x509.DNSName(cn)]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    return _issue(directory, name, _name(cn), ExtendedKeyUsageOID.SERVER_AUTH, sans)


def _issue(
    directory: pathlib.Path,
    name: str,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
) -> tuple[pathlib.Path, pathlib.Path]:
    ca_key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / CA_KEY} is not the CA's EC key")
    key = _key()
    builder = _builder(subject, ca_cert.subject, key.public_key()).add_extension(
        x509.ExtendedKeyUsage([usage]), critical=False
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
