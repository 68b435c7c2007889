#!/usr/bin/env python3
"""A small PKI for the X.509 conformance tests (spec section 7), on the `cryptography` package.

It makes root CAs, intermediate CAs (root -> int1 -> int2 -> ...), device (leaf) certificates, self-signed
device certificates and proof-of-possession certificates (spec 7.3), with ECDSA P-256 (`ec`, the default) or
RSA-2048 (`rsa`) keys, SHA-256 signatures, and subjects of one CN only (so `subjectName` is exactly `CN=<cn>`
whatever the format of the distinguished name).

  root / intermediate  basicConstraints CA:true (critical), keyUsage keyCertSign+cRLSign+digitalSignature
                       (critical), subject/authority key identifiers; valid from 1 hour ago for 365 days.
  device               CN = the registration ID, basicConstraints CA:false (critical), keyUsage
                       digitalSignature (+keyEncipherment for RSA), extendedKeyUsage clientAuth; valid from
                       1 hour ago for 30 days (or, with `expired`, from 3 days ago to 2 days ago).
  self-signed          the same as a device, but signed by its own key (issuer = subject).
  proof                CN = a verification code, basicConstraints CA:false, signed by the given CA's key
                       (issuer = the CA's subject).

Every certificate is written as three PEM files into the output directory, named after `name`:

  <name>.key.pem     the private key (PKCS#8, unencrypted)
  <name>.pem         the certificate alone
  <name>.chain.pem   the certificate followed by the intermediates between it and the root, nearest first,
                     without the root: what a device sends (`cert_file` of the Python SDK, `cert` of the
                     Node SDK). A leaf under int2 (root -> int1 -> int2) gets leaf + int2 + int1; a leaf
                     signed by the root, a root and a self-signed certificate get just themselves.

Module use (the Python suite):

    import pki
    root = pki.root("root")
    int1 = pki.intermediate(root, "int1")
    int2 = pki.intermediate(int1, "int2", key_type="rsa")
    dev = pki.device(int2, "dev-1")           # dev.chain == [dev.cert, int2.cert, int1.cert]
    mine = pki.self_signed("dev-2")
    proof = pki.proof(root, "<verification code>")
    files = dev.write("/tmp/x")              # {"key": ..., "cert": ..., "chain": ...} (paths)
    dev.cert_pem, dev.key_pem, dev.chain_pem, dev.sha1_thumbprint, dev.sha256_thumbprint

Command line (the Node suite), each command writing the three files and printing one JSON object
`{"name", "cn", "issuer", "key", "cert", "chain", "sha1Thumbprint", "sha256Thumbprint", "serialNumber",
"notBeforeUtc", "notAfterUtc"}` (paths absolute, `issuer` the issuer's CN, thumbprints uppercase hex, serial number
uppercase hex without leading zeros, dates `2017-11-14T12:34:18Z`) on stdout:

    python pki.py root         --out DIR --name root [--cn CN] [--key ec|rsa]
    python pki.py intermediate --ca DIR/root --out DIR --name int1 [--cn CN] [--key ec|rsa]
    python pki.py device       --ca DIR/int2 --cn dev-1 --out DIR [--name NAME] [--key ec|rsa] [--expired]
    python pki.py self-signed  --cn dev-2 --out DIR [--name NAME] [--key ec|rsa]
    python pki.py proof        --ca DIR/root --code CODE --out DIR [--name proof] [--key ec|rsa]

`--ca PREFIX` names an issuer written before: PREFIX.pem, PREFIX.key.pem and PREFIX.chain.pem (the chain
file gives the intermediates its children carry). `--name` defaults to the CN for device, self-signed and
proof. `--cn` defaults to the name for root and intermediate.
"""

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_TYPES = ("ec", "rsa")
CA_DAYS = 365
DEVICE_DAYS = 30
BACKDATE = datetime.timedelta(hours=1)


def new_key(key_type="ec"):
    """A fresh private key: ECDSA P-256 (`ec`) or RSA-2048 (`rsa`)."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r} (one of {', '.join(KEY_TYPES)})")


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _is_self_issued(cert):
    return cert.subject == cert.issuer


class Identity:
    """A certificate with its private key and the intermediates between it and its root (nearest first,
    root excluded)."""

    def __init__(self, name, key, cert, intermediates=()):
        self.name = name
        self.key = key
        self.cert = cert
        self.intermediates = list(intermediates)

    @property
    def cn(self):
        return self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[-1].value

    @property
    def chain(self):
        """This certificate followed by its intermediates: what a device presents."""
        return [self.cert, *self.intermediates]

    @property
    def issuer_cn(self):
        return self.cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[-1].value

    @property
    def is_root(self):
        return _is_self_issued(self.cert)

    @property
    def cert_pem(self):
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def cert_der(self):
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def chain_pem(self):
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in self.chain)

    @property
    def key_pem(self):
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()

    @property
    def sha1_thumbprint(self):
        return self.cert.fingerprint(hashes.SHA1()).hex().upper()

    @property
    def sha256_thumbprint(self):
        return self.cert.fingerprint(hashes.SHA256()).hex().upper()

    @property
    def serial_hex(self):
        return format(self.cert.serial_number, "X")

    def children_intermediates(self):
        """The intermediates a certificate issued by this one carries."""
        return [] if self.is_root else [self.cert, *self.intermediates]

    def paths(self, out_dir):
        out = Path(out_dir).resolve()
        return {
            "key": str(out / f"{self.name}.key.pem"),
            "cert": str(out / f"{self.name}.pem"),
            "chain": str(out / f"{self.name}.chain.pem"),
        }

    def write(self, out_dir):
        """Writes `<name>.key.pem`, `<name>.pem` and `<name>.chain.pem`; returns their paths."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        paths = self.paths(out_dir)
        key_path = Path(paths["key"])
        key_path.write_text(self.key_pem)
        os.chmod(key_path, 0o600)
        Path(paths["cert"]).write_text(self.cert_pem)
        Path(paths["chain"]).write_text(self.chain_pem)
        return paths

    def describe(self, out_dir):
        iso = "%Y-%m-%dT%H:%M:%SZ"
        return {
            "name": self.name,
            "cn": self.cn,
            "issuer": self.issuer_cn,
            **self.paths(out_dir),
            "sha1Thumbprint": self.sha1_thumbprint,
            "sha256Thumbprint": self.sha256_thumbprint,
            "serialNumber": self.serial_hex,
            "notBeforeUtc": self.cert.not_valid_before_utc.strftime(iso),
            "notAfterUtc": self.cert.not_valid_after_utc.strftime(iso),
        }

    @classmethod
    def load(cls, prefix):
        """Reads back what `write` wrote: PREFIX.pem, PREFIX.key.pem, PREFIX.chain.pem."""
        prefix = str(prefix)
        cert = x509.load_pem_x509_certificate(Path(prefix + ".pem").read_bytes())
        key = serialization.load_pem_private_key(Path(prefix + ".key.pem").read_bytes(), password=None)
        chain_path = Path(prefix + ".chain.pem")
        chain = x509.load_pem_x509_certificates(chain_path.read_bytes()) if chain_path.exists() else [cert]
        if chain[0] != cert:
            raise ValueError(f"{chain_path} does not start with {prefix}.pem")
        return cls(Path(prefix).name, key, cert, chain[1:])


def _builder(subject, issuer, public_key, not_before, not_after):
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _validity(days, expired=False):
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    if expired:
        return now - datetime.timedelta(days=3), now - datetime.timedelta(days=2)
    return now - BACKDATE, now + datetime.timedelta(days=days)


def _ca_extensions(builder):
    return builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).add_extension(
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )


def _end_entity_extensions(builder, key, client_auth=True):
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True).add_extension(
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=isinstance(key, rsa.RSAPrivateKey),
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    if client_auth:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder


def _authority_key_id(issuer_cert):
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key())


def root(name, cn=None, key_type="ec", days=CA_DAYS):
    """A self-signed root CA."""
    key = new_key(key_type)
    subject = _name(cn or name)
    builder = _ca_extensions(_builder(subject, subject, key.public_key(), *_validity(days)))
    builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
    return Identity(name, key, builder.sign(key, hashes.SHA256()))


def intermediate(ca, name, cn=None, key_type="ec", days=CA_DAYS):
    """An intermediate CA signed by `ca` (a root or another intermediate)."""
    key = new_key(key_type)
    builder = _ca_extensions(_builder(_name(cn or name), ca.cert.subject, key.public_key(), *_validity(days)))
    builder = builder.add_extension(_authority_key_id(ca.cert), critical=False)
    return Identity(name, key, builder.sign(ca.key, hashes.SHA256()), ca.children_intermediates())


def device(ca, cn, name=None, key_type="ec", days=DEVICE_DAYS, expired=False, client_auth=True):
    """A device (leaf) certificate with subject CN = `cn` (the registration ID), signed by `ca`."""
    key = new_key(key_type)
    builder = _builder(_name(cn), ca.cert.subject, key.public_key(), *_validity(days, expired))
    builder = _end_entity_extensions(builder, key, client_auth).add_extension(
        _authority_key_id(ca.cert), critical=False
    )
    return Identity(name or cn, key, builder.sign(ca.key, hashes.SHA256()), ca.children_intermediates())


def self_signed(cn, name=None, key_type="ec", days=DEVICE_DAYS, expired=False):
    """A self-signed device certificate (issuer = subject = CN `cn`), not a CA."""
    key = new_key(key_type)
    subject = _name(cn)
    builder = _end_entity_extensions(_builder(subject, subject, key.public_key(), *_validity(days, expired)), key)
    builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
    return Identity(name or cn, key, builder.sign(key, hashes.SHA256()))


def proof(ca, code, name=None, key_type="ec", days=DEVICE_DAYS):
    """A proof-of-possession certificate: subject CN = the verification code, signed by `ca`'s key."""
    key = new_key(key_type)
    builder = _builder(_name(code), ca.cert.subject, key.public_key(), *_validity(days))
    builder = _end_entity_extensions(builder, key, client_auth=False).add_extension(
        _authority_key_id(ca.cert), critical=False
    )
    return Identity(name or "proof", key, builder.sign(ca.key, hashes.SHA256()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, help_text, ca=False, cn=False, name_required=False):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--name", required=name_required, help="file name stem")
        p.add_argument("--key", choices=KEY_TYPES, default="ec", help="key type (default ec = P-256)")
        if ca:
            p.add_argument("--ca", required=True, help="issuer written before: PREFIX(.pem|.key.pem|.chain.pem)")
        if cn:
            p.add_argument("--cn", required=cn == "required", help="subject common name")
        return p

    command("root", "a self-signed root CA", cn=True, name_required=True)
    command("intermediate", "an intermediate CA", ca=True, cn=True, name_required=True)
    command("device", "a device certificate", ca=True, cn="required").add_argument(
        "--expired", action="store_true", help="valid from 3 days ago to 2 days ago"
    )
    command("self-signed", "a self-signed device certificate", cn="required").add_argument(
        "--expired", action="store_true", help="valid from 3 days ago to 2 days ago"
    )
    command("proof", "a proof-of-possession certificate", ca=True).add_argument(
        "--code", required=True, help="verification code (becomes the CN)"
    )
    args = parser.parse_args(argv)

    if args.command == "root":
        made = root(args.name, cn=args.cn, key_type=args.key)
    elif args.command == "intermediate":
        made = intermediate(Identity.load(args.ca), args.name, cn=args.cn, key_type=args.key)
    elif args.command == "device":
        made = device(Identity.load(args.ca), args.cn, name=args.name, key_type=args.key, expired=args.expired)
    elif args.command == "self-signed":
        made = self_signed(args.cn, name=args.name, key_type=args.key, expired=args.expired)
    else:
        made = proof(Identity.load(args.ca), args.code, name=args.name, key_type=args.key)
    made.write(args.out)
    json.dump(made.describe(args.out), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
