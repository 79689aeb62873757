"""The console's session: a signed cookie that stands for a signed-in principal, and its CSRF token.

The login form posts a gateway token (one of ``MOONQ_GATEWAY_TOKENS``, or one whose sha256 the
tenants file lists), looked up with ``Tenants.by_token`` (constant time); from then on the browser
holds only the session cookie, never the token: ``HttpOnly`` (no script reads it),
``SameSite=Strict`` (no other site's page sends it), ``Path=/console``, ``Secure`` when the console
is served over HTTPS. Its value is ``base64url(JSON).base64url(HMAC-SHA256)`` of
``{"fp", "tenant", "operator", "csrf", "exp"}``:

- ``fp``: a fingerprint of the token (an HMAC of its sha256 under the signing key: neither the
  token nor its hash), or ``""`` before login (the login form needs a CSRF token too);
- ``tenant``, ``operator``: the principal the token spoke for at login (``moonq.tenants.Principal``),
  which decides the jobs the session sees;
- ``csrf``: the token every form posts back, compared in constant time; a new one at each login;
- ``exp``: unix seconds after which the session is refused (``SESSION_MAX_AGE_S``).

A session stands while its token is admitted and still speaks for the recorded principal: removing
a token, or moving it to another tenant, ends its sessions when the gateway next starts.

The signing key is ``P:console:session_key`` in Redis (``session_key``): 32 random bytes made once
by the first gateway that needs them, so every gateway process of a deployment shares them and
they survive restarts. It is derived from neither the tokens nor their hashes: the tenants file
holds the hashes, and a leaked file must not let anyone forge a session. Whoever can read Redis
can forge one, but could read every job there anyway.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

import redis.asyncio

from moonq.keys import Keys
from moonq.tenants import Principal, Tenants, hash_token

COOKIE = "moonq_console"
SESSION_MAX_AGE_S = 12 * 3600
KEY_BYTES = 32
_FP_CONTEXT = b"moonq console token fingerprint v2"


async def session_key(r: redis.asyncio.Redis, keys: Keys) -> bytes:
    """The deployment's signing key: made by the first gateway that asks (SET NX), read by every one after.

    Raises:
        RuntimeError: the key holds something shorter than ``KEY_BYTES`` (not one this module made).
    """
    async with r.pipeline(transaction=True) as pipe:  # one MULTI: the key read back is the one that stands
        pipe.set(keys.console_session_key, secrets.token_bytes(KEY_BYTES), nx=True)
        pipe.get(keys.console_session_key)
        _, key = await pipe.execute()
    if not isinstance(key, bytes) or len(key) < KEY_BYTES:
        raise RuntimeError(f"{keys.console_session_key} is not a {KEY_BYTES}-byte key: delete it, restart gateways")
    return key


@dataclass(frozen=True)
class Session:
    """One browser's session: ``principal`` is None until the login succeeds."""

    fp: str
    csrf: str
    exp: int
    principal: Principal | None = None

    @property
    def signed_in(self) -> bool:
        return self.principal is not None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Issues, signs and checks sessions under one key, for the tokens one ``Tenants`` admits."""

    def __init__(self, key: bytes, tenants: Tenants, max_age_s: int = SESSION_MAX_AGE_S) -> None:
        self._key = key
        self._tenants = tenants
        # Fingerprint -> principal of every admitted token: a session stands only while its token does.
        self._principals = {self._fingerprint(digest): who for digest, who in tenants.token_hashes().items()}
        self.max_age_s = max_age_s

    def _fingerprint(self, token_sha256: str) -> str:
        return hmac.new(self._key, _FP_CONTEXT + token_sha256.encode(), hashlib.sha256).hexdigest()[:32]

    def open(self, token: str, now: float | None = None) -> Session | None:
        """A signed-in session for the principal ``token`` speaks for; None if it admits no one.

        ``Tenants.by_token`` compares the token's hash with every admitted one, always, so timing says
        nothing about which one nearly matched.
        """
        given = token.strip()
        principal = self._tenants.by_token(given) if given else None
        if principal is None:
            return None
        return self.issue(self._fingerprint(hash_token(given)), principal, now)

    def issue(self, fp: str = "", principal: Principal | None = None, now: float | None = None) -> Session:
        """A new session (anonymous without a principal) with a fresh CSRF token."""
        now = time.time() if now is None else now
        return Session(fp=fp, csrf=secrets.token_urlsafe(32), exp=int(now) + self.max_age_s, principal=principal)

    def encode(self, session: Session) -> str:
        who = session.principal
        body = {
            "fp": session.fp,
            "tenant": who.tenant if who else None,
            "operator": bool(who and who.operator),
            "csrf": session.csrf,
            "exp": session.exp,
        }
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return f"{payload}.{_b64(self._sign(payload))}"

    def decode(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session in a cookie value, or None if it is missing, forged, expired, or its token's no longer."""
        if not cookie or cookie.count(".") != 1:
            return None
        payload, signature = cookie.split(".")
        try:
            if not hmac.compare_digest(_unb64(signature), self._sign(payload)):
                return None
            data = json.loads(_unb64(payload))
            fp, csrf, exp = str(data["fp"]), str(data["csrf"]), int(data["exp"])
            principal = Principal(data["tenant"], operator=data["operator"] is True) if fp else None
        except (binascii.Error, ValueError, KeyError, TypeError):
            return None
        if exp <= (time.time() if now is None else now):
            return None
        # Signed in: only while its token is admitted and speaks for the principal it spoke for at login.
        if principal is not None and self._principals.get(fp) != principal:
            return None
        return Session(fp, csrf, exp, principal)

    def csrf_ok(self, session: Session | None, submitted: str | None) -> bool:
        """Whether a form's ``csrf`` field is this session's CSRF token (constant time)."""
        if session is None or not submitted:
            return False
        return hmac.compare_digest(session.csrf.encode(), submitted.encode())

    def _sign(self, payload: str) -> bytes:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).digest()
