"""What the control server signs with its TLS key, and how anyone checks it offline.

Audit checkpoints and proof reports are signed by the server's key and carry the
server certificate that signed them. A verifier holds only the fleet's CA: the
certificate must be issued by that CA to the server itself (an operator's key could
sign too, but is not the server), the signature must verify, and the signing time
must fall within the certificate's validity, so a signature outlives a certificate
rotation but not a change of CA.
"""

from __future__ import annotations

import base64

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from control.errors import KillswitchError
from control.pki import SERVER_COMMON_NAME


def sign(payload: bytes, key_pem: bytes, what: str) -> str:
    """The base64 ECDSA-SHA256 signature of ``payload`` by the server's key."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KillswitchError(f"the server key is not an EC key: cannot sign {what}")
    return base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()


def problem(
    signer: x509.Certificate, signature: bytes, payload: bytes, at: float, ca: x509.Certificate
) -> str | None:
    """Why ``signature`` over ``payload``, made at ``at``, is not the server's; or None."""
    try:
        signer.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "its certificate was not issued by this fleet's CA"
    names = [a.value for a in signer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    roles = signer.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if names != [SERVER_COMMON_NAME] or roles:
        return f"signed by {signer.subject.rfc4514_string()}, not the server"
    public = signer.public_key()
    try:
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise InvalidSignature
        public.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return "forged (its signature does not verify)"
    if not signer.not_valid_before_utc.timestamp() <= at <= signer.not_valid_after_utc.timestamp():
        return "dated outside its certificate's validity"
    return None
