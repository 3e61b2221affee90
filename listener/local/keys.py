"""JWTs for the local stack: anon and service-role keys and user tokens (HS256, one secret)."""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Any

import jwt

ISSUER = "supabase-local"
KEY_TTL_S = 10 * 365 * 24 * 3600  # like Supabase's legacy API keys
USER_TTL_S = 3600


def new_secret() -> str:
    """A fresh random JWT secret (at least 32 characters, as Supabase requires)."""
    return secrets.token_urlsafe(48)


def sign(secret: str, claims: dict[str, Any]) -> str:
    """Sign claims with HS256."""
    return jwt.encode(claims, secret, algorithm="HS256")


def api_key(secret: str, role: str, now: float | None = None) -> str:
    """A long-lived project API key for `anon` or `service_role`."""
    iat = int(now if now is not None else time.time())
    return sign(secret, {"iss": ISSUER, "role": role, "iat": iat, "exp": iat + KEY_TTL_S})


def user_token(
    secret: str,
    user_id: uuid.UUID | str,
    email: str | None = None,
    ttl_s: int = USER_TTL_S,
    now: float | None = None,
) -> str:
    """An access token for an authenticated user, shaped like Supabase Auth's."""
    iat = int(now if now is not None else time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": str(user_id),
        "aud": "authenticated",
        "role": "authenticated",
        "iat": iat,
        "exp": iat + ttl_s,
    }
    if email:
        claims["email"] = email
    return sign(secret, claims)


def verify(secret: str, token: str) -> dict[str, Any]:
    """Decode and verify a token (signature, exp; `role` and `exp` required); raise jwt errors."""
    claims: dict[str, Any] = jwt.decode(
        token,
        secret,
        algorithms=["HS256"],
        options={"require": ["role", "exp"], "verify_aud": False},
    )
    return claims
