"""JWT verification for the core's handshake, through PyJWT.

The core takes any ``verifier(token) -> claims`` that raises ``core.Unauthorized``;
this builds one. One algorithm is accepted, fixed by the key: HS256 for a shared
secret, RS256 or ES256 for a public key (read from the key's type). Accepting only
that one is what stops ``alg: none`` and the RS256-to-HS256 confusion attack.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jwt

from hubbub.core import Unauthorized


def _algorithm_for(public_key: str) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(public_key.encode())
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ES256"
    raise ValueError("--jwt-public-key must be an RSA or EC public key in PEM")


def jwt_verifier(
    *,
    secret: str | None = None,
    public_key: str | None = None,
    audience: str | None = None,
    issuer: str | None = None,
    leeway: float = 0.0,
) -> Callable[[str], Mapping[str, Any]]:
    """A verifier for ``core.Server(verifier=...)``: checks signature, ``exp``, ``nbf``, ``aud``, ``iss``."""
    if (secret is None) == (public_key is None):
        raise ValueError("give exactly one of a JWT secret or a public key")
    key: str = secret if secret is not None else public_key  # type: ignore[assignment]
    algorithms = ["HS256"] if secret is not None else [_algorithm_for(key)]
    options = {"require": ["sub"]}

    def verify(token: str) -> Mapping[str, Any]:
        try:
            return jwt.decode(
                token, key, algorithms=algorithms, audience=audience, issuer=issuer, leeway=leeway, options=options
            )
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(str(exc)) from exc

    return verify
