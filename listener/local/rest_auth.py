"""Who a REST request runs as: the API key check, then PostgREST's JWT decoding and claim rules."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from listener.local import rest_errors
from listener.local.rest_errors import RestError

ANON = "anon"  # PostgREST's db-anon-role on Supabase: no JWT, or a JWT without a role claim
API_KEY_ROLES = (ANON, "service_role")
CLAIMS_CACHE_SIZE = 1024
CLOCK_SKEW_S = 30  # PostgREST's allowedSkewSeconds for exp, nbf and iat
INT64_MAX = 2**63 - 1
BASE64URL = frozenset(string.ascii_letters + string.digits + "-_")
# The `alg` values jose-jwt (PostgREST's JWT library) can parse; any other is a broken header.
JOSE_ALGORITHMS = frozenset(
    {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "EdDSA"}
)
TIME_CLAIMS = (  # checked in PostgREST's order: exp must not be past, nbf and iat not future
    ("exp", "JWT expired"),
    ("nbf", "JWT not yet valid"),
    ("iat", "JWT issued at future"),
)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request runs as: the database role and the JWT claims (as JSON)."""

    role: str
    claims: str

    @property
    def authenticated(self) -> bool:
        """PostgREST's notion: any role but the anonymous one (decides 401 vs 403)."""
        return self.role != ANON


@dataclass(frozen=True, slots=True)
class _Verified:
    """A token whose signature checked out: its claims, and the identity they give."""

    claims: dict[str, Any]
    identity: Identity


class Authenticator:
    """Checks the API key as Supabase's gateway does and the bearer JWT as PostgREST does,
    remembering signatures it has verified (PostgREST's JWT cache; times are checked on use)."""

    def __init__(self, secret: str, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret.encode()
        self._clock = clock
        self._verified: dict[str, _Verified] = {}

    def identity(self, request: Request) -> Identity:
        """The identity to run as; raises the gateway's or PostgREST's 401."""
        api_key = request.headers.get("apikey") or request.query_params.get("apikey")
        if not api_key:
            raise rest_errors.missing_api_key()
        try:
            key = self._verify(api_key)
        except RestError:
            raise rest_errors.invalid_api_key() from None
        if key.claims.get("role") not in API_KEY_ROLES:
            raise rest_errors.invalid_api_key()
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return key.identity
        return self._verify(token.strip()).identity

    def _verify(self, token: str) -> _Verified:
        verified = self._verified.get(token)
        if verified is None:
            claims = decode(self._secret, token)
            verified = _Verified(claims, _identity(claims))
            if len(self._verified) >= CLAIMS_CACHE_SIZE:
                self._verified.clear()
            self._verified[token] = verified
        check_claims(verified.claims, self._clock())
        return verified


def decode(secret: bytes, token: str) -> dict[str, Any]:
    """The claims of an HS256 token signed with `secret`; PGRST301/303 as PostgREST (jose-jwt)
    answers: an empty token, not three parts, an unparsable token, `alg: none`, another
    algorithm or a wrong signature, claims that are not a JSON object."""
    if not token:
        raise rest_errors.jwt_error("PGRST301", "Empty JWT is sent in Authorization header")
    parts = token.split(".")
    if len(parts) != 3:
        raise rest_errors.jwt_error("PGRST301", f"Expected 3 parts in JWT; got {len(parts)}")
    try:
        header = _json(_base64url(parts[0]))
        payload, signature = _base64url(parts[1]), _base64url(parts[2])
    except ValueError:  # binascii.Error, UnicodeDecodeError and JSONDecodeError included
        raise rest_errors.jwt_error("PGRST301", "JWT cryptographic operation failed") from None
    alg = header.get("alg") if isinstance(header, dict) else None
    if alg == "none":
        raise rest_errors.jwt_error(
            "PGRST301",
            "Wrong or unsupported encoding algorithm",
            "JWT is unsecured but expected 'alg' was not 'none'",
        )
    if alg not in JOSE_ALGORITHMS:
        raise rest_errors.jwt_error("PGRST301", "JWT cryptographic operation failed")
    if alg != "HS256":  # the secret is an HS256 key: no key fits another algorithm
        raise _no_key("No suitable key was found to decode the JWT")
    signed = f"{parts[0]}.{parts[1]}".encode()
    if not hmac.compare_digest(hmac.new(secret, signed, hashlib.sha256).digest(), signature):
        raise _no_key("None of the keys was able to decode the JWT")
    try:
        claims = _json(payload)
    except ValueError:
        claims = None
    if not isinstance(claims, dict):
        raise rest_errors.jwt_error("PGRST303", "Parsing claims failed")
    return claims


def check_claims(claims: dict[str, Any], now: float) -> None:
    """PostgREST's claim checks, the first failure winning: exp, nbf and iat (each optional)
    must be numbers and hold within 30 s of `now`; aud, when present, a string or an array of
    strings. No `jwt-aud` is set on Supabase, so any audience is accepted."""
    now_s = int(now)
    for claim, message in TIME_CLAIMS:
        value = claims.get(claim)
        if value is None:  # absent or null
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise rest_errors.jwt_error("PGRST303", f"The JWT '{claim}' claim must be a number")
        at = _whole_seconds(value)
        if now_s - CLOCK_SKEW_S > at if claim == "exp" else now_s + CLOCK_SKEW_S < at:
            raise rest_errors.jwt_error("PGRST303", message)
    aud = claims.get("aud")
    if not (
        aud is None
        or isinstance(aud, str)
        or (isinstance(aud, list) and all(isinstance(a, str) for a in aud))
    ):
        raise rest_errors.jwt_error(
            "PGRST303", "The JWT 'aud' claim must be a string or an array of strings"
        )


def _identity(claims: dict[str, Any]) -> Identity:
    """The role claim (a non-string one as its JSON text; the anon role when there is none),
    and the claims PostgREST passes on: with `role` set to that role."""
    value = claims.get("role", ANON)
    role = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return Identity(role, json.dumps({**claims, "role": role}, separators=(",", ":")))


def _whole_seconds(value: float) -> int:
    """A time claim as PostgREST reads it: a fraction or an out-of-range number counts as 0."""
    if isinstance(value, float) and not value.is_integer():
        return 0
    seconds = int(value)
    return seconds if -INT64_MAX - 1 <= seconds <= INT64_MAX else 0


def _json(text: bytes) -> Any:
    """Strict JSON, as aeson reads it: NaN and Infinity are no numbers (a ValueError)."""
    return json.loads(text, parse_constant=_not_json)


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def _base64url(part: str) -> bytes:
    """Unpadded base64url, strictly (a padding or foreign character is a ValueError)."""
    if not BASE64URL.issuperset(part):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _no_key(details: str) -> RestError:
    return rest_errors.jwt_error("PGRST301", "No suitable key or wrong key type", details)
