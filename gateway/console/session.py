"""The console's session: a signed cookie that stands for a gateway token, and its CSRF token.

The login form posts a token from ``MOONQ_GATEWAY_TOKENS``; from then on the browser holds only
the session cookie, never the token: ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no
other site's page sends it), ``Path=/console``, ``Secure`` when the console is served over HTTPS.
Its value is ``base64url(JSON).base64url(HMAC-SHA256)`` of ``{"fp", "csrf", "exp"}``:

- ``fp``: a fingerprint of the token it was opened with (an HMAC of it, not the token), or ``""``
  before login (the login form needs a CSRF token too);
- ``csrf``: the token every form posts back, compared in constant time; a new one at each login;
- ``exp``: unix seconds after which the session is refused (``SESSION_MAX_AGE_S``).

The signing key is derived from all the configured tokens, so gateway replicas that share their
tokens share sessions, and changing ``MOONQ_GATEWAY_TOKENS`` ends every session (a removed token's
sessions above all). Someone who holds one token cannot forge a session for another: the key
needs all of them.
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

COOKIE = "moonq_console"
SESSION_MAX_AGE_S = 12 * 3600
_KEY_CONTEXT = b"moonq console session v1"
_FP_CONTEXT = b"moonq console token fingerprint v1"


@dataclass(frozen=True)
class Session:
    """One browser's session: ``fp`` is empty until the login succeeds."""

    fp: str
    csrf: str
    exp: int

    @property
    def signed_in(self) -> bool:
        return bool(self.fp)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Issues, signs and checks sessions for one set of gateway tokens."""

    def __init__(self, tokens: list[str], max_age_s: int = SESSION_MAX_AGE_S) -> None:
        if not tokens:
            raise ValueError("the console needs at least one gateway token")
        self._key = hmac.new(_KEY_CONTEXT, "\n".join(sorted(tokens)).encode(), hashlib.sha256).digest()
        self._tokens = [t.encode() for t in tokens]
        self._fingerprints = {self._fingerprint(t) for t in self._tokens}
        self.max_age_s = max_age_s

    def _fingerprint(self, token: bytes) -> str:
        return hmac.new(self._key, _FP_CONTEXT + token, hashlib.sha256).hexdigest()[:32]

    def match(self, token: str) -> str | None:
        """The fingerprint of ``token`` if it is one of the gateway's tokens, else None.

        Compared against every token, always, so timing says nothing about which one nearly matched.
        """
        given = token.strip().encode()
        hits = [hmac.compare_digest(given, t) for t in self._tokens]
        return self._fingerprint(given) if given and any(hits) else None

    def issue(self, fp: str = "", now: float | None = None) -> Session:
        """A new session (anonymous when ``fp`` is empty) with a fresh CSRF token."""
        now = time.time() if now is None else now
        return Session(fp=fp, csrf=secrets.token_urlsafe(32), exp=int(now) + self.max_age_s)

    def encode(self, session: Session) -> str:
        body = json.dumps({"fp": session.fp, "csrf": session.csrf, "exp": session.exp}, separators=(",", ":"))
        payload = _b64(body.encode())
        return f"{payload}.{_b64(self._sign(payload))}"

    def decode(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session in a cookie value, or None if it is missing, forged, expired, or of a removed token."""
        if not cookie or cookie.count(".") != 1:
            return None
        payload, signature = cookie.split(".")
        try:
            if not hmac.compare_digest(_unb64(signature), self._sign(payload)):
                return None
            data = json.loads(_unb64(payload))
            session = Session(fp=str(data["fp"]), csrf=str(data["csrf"]), exp=int(data["exp"]))
        except (binascii.Error, ValueError, KeyError, TypeError):
            return None
        if session.exp <= (time.time() if now is None else now):
            return None
        if session.fp and session.fp not in self._fingerprints:
            return None
        return session

    def csrf_ok(self, session: Session | None, submitted: str | None) -> bool:
        """Whether a form's ``csrf`` field is this session's CSRF token (constant time)."""
        if session is None or not submitted:
            return False
        return hmac.compare_digest(session.csrf.encode(), submitted.encode())

    def _sign(self, payload: str) -> bytes:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).digest()
