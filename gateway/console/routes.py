"""The console's pages and actions, mounted by the gateway at ``/console``.

Pages (GET): ``/console/login``, ``/console/jobs`` (recent jobs: filter by status and model,
search by id, paged), ``/console/jobs/{id}`` (request, live answer, timeline, usage and cost),
``/console/failed`` (dead letters), ``/console/fleet``. Live data: ``/console/jobs/{id}/events``
(the job's events as SSE, resumable with ``Last-Event-ID``, then one ``summary`` event) and
``/console/fleet.json``. Actions (POST, each a form with the session's CSRF token): login,
logout, cancel, retry, retry many dead letters. Every page but the login needs a signed-in session
(gateway/console/session.py); the gateway's bearer tokens do not apply under ``/console``.

A session is a tenant's or an operator's (``Viewer``): a tenant's sees and acts on its own jobs
only, and another tenant's job answers exactly as an unknown id does, on every page and action; it
sees the fleet's health but not its spend or its nodes' addresses (``fleet.for_tenant``).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import Receive, Scope, Send

from gateway.console import render
from gateway.console.fleet import REFRESH_S, FleetWatch, for_tenant
from gateway.console.jobs import PAGE_JOBS, Filters, JobReader, JobRow, Viewer, duration, make_row, money, when
from gateway.console.session import COOKIE, Session, Sessions, session_key
from gateway.console.web import ConsoleGuard, read_form
from moonq.errors import InvalidRequest, JobNotFound, TenantBudgetExceeded
from moonq.keys import Keys
from moonq.record import JobRecord, JobStatus
from moonq.tenants import Tenants
from moonq.usage import load_prices
from moonq.wire import JobEnvelope
from producers.aio import AsyncClient

HERE = Path(__file__).parent
DIGITS = re.compile(r"[0-9]{1,18}")
JOB_ID = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
RETRY_MANY_MAX = 500  # dead letters one click retries
FAILED_SHOWN = 500


class LoginRequired(Exception):
    """No signed-in session: pages redirect to the login form, live data answers 401."""


class Refused(Exception):
    """A request the console will not act on: shown as a page with this status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def no_job(job_id: str) -> Refused:
    """The one answer for an id that is unknown, expired, or another tenant's: the three look alike."""
    return Refused(404, f"no job {job_id[:200]!r}: never submitted, or ended more than a record's lifetime ago")


def _templates() -> Jinja2Templates:
    # Autoescape everything: model output, requests and errors are text, never markup.
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env.filters["duration"] = duration
    env.filters["money"] = money
    env.filters["when"] = when
    return Jinja2Templates(env=env)


class Console:
    """The console's routes over the gateway's shared ``AsyncClient``."""

    def __init__(
        self, client_of: Callable[[], AsyncClient], *, tenants: Tenants, keys: Keys, prices_file: str | None
    ) -> None:
        self.client_of = client_of
        self.tenants = tenants
        self.keys = keys
        self._sessions: Sessions | None = None
        self.prices = load_prices(prices_file)
        self.fleet = FleetWatch(lambda: self.client_of().redis, keys)
        self.templates = _templates()

    @property
    def reader(self) -> JobReader:
        return JobReader(self.client_of().redis, self.keys, self.prices)

    # --- sessions --------------------------------------------------------------------------

    async def open(self) -> None:
        """Reads the deployment's session key from Redis once, at the first request: on the loop that serves."""
        if self._sessions is None:
            self._sessions = Sessions(await session_key(self.client_of().redis, self.keys), self.tenants)

    @property
    def sessions(self) -> Sessions:
        if self._sessions is None:
            raise RuntimeError("the console's sessions exist from its first request on (Console.open)")
        return self._sessions

    def _session(self, request: Request) -> Session | None:
        return self.sessions.decode(request.cookies.get(COOKIE))

    def _viewer(self, request: Request) -> Viewer:
        session = self._session(request)
        if session is None or session.principal is None:
            raise LoginRequired
        return Viewer(session.principal)

    async def _post(self, request: Request, *, signed_in: bool = True) -> tuple[Session, dict[str, list[str]]]:
        """The form of a POST whose CSRF token is the session's (else 403; no session: login)."""
        session = self._session(request)
        if session is None or (signed_in and not session.signed_in):
            raise LoginRequired if signed_in else Refused(403, "the login form has expired: load it again")
        form = await read_form(request)
        if not self.sessions.csrf_ok(session, (form.get("csrf") or [""])[0]):
            raise Refused(403, "the form's CSRF token is missing or wrong: load the page again")
        return session, form

    def _set_session(self, request: Request, response: Response, session: Session) -> Response:
        response.set_cookie(
            COOKIE,
            self.sessions.encode(session),
            max_age=self.sessions.max_age_s,
            path=self._base(request) or "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @staticmethod
    def _base(request: Request) -> str:
        return str(request.scope.get("root_path", ""))

    def _page(
        self, request: Request, name: str, status: int = 200, *, session: Session | None = None, **context: Any
    ) -> Response:
        session = session or self._session(request)
        principal = session.principal if session else None
        context = {
            "base": self._base(request),
            "csrf": session.csrf if session else "",
            "signed_in": principal is not None,
            "viewer": Viewer(principal) if principal else None,
            "nav": name.removesuffix(".html"),
            **context,
        }
        return self.templates.TemplateResponse(request, name, context, status_code=status)

    def _redirect(self, request: Request, path: str) -> RedirectResponse:
        return RedirectResponse(self._base(request) + path, status_code=303)

    # --- login -----------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        session = self._session(request)
        return self._redirect(request, "/jobs" if session and session.signed_in else "/login")

    async def login_form(self, request: Request) -> Response:
        session = self._session(request)
        fresh = session is None
        if session is None:
            session = self.sessions.issue()
        response = self._page(request, "login.html", session=session, refused=False)
        return self._set_session(request, response, session) if fresh else response

    async def login(self, request: Request) -> Response:
        session, form = await self._post(request, signed_in=False)
        # A new session, with a new CSRF token: nothing chosen before the login carries over.
        opened = self.sessions.open((form.get("token") or [""])[0])
        if opened is None:
            return self._page(request, "login.html", 401, session=session, refused=True)
        return self._set_session(request, self._redirect(request, "/jobs"), opened)

    async def logout(self, request: Request) -> Response:
        await self._post(request)
        response = self._redirect(request, "/login")
        response.delete_cookie(COOKIE, path=self._base(request) or "/", httponly=True, samesite="strict")
        return response

    # --- jobs ------------------------------------------------------------------------------

    async def jobs(self, request: Request) -> Response:
        viewer = self._viewer(request)
        q = request.query_params
        search = q.get("q", "").strip()
        reader = self.reader
        if search and await self._visible(search, viewer):
            return self._redirect(request, f"/jobs/{search}")
        filters, query = self._filters(request, viewer, search)
        offset = int(q["offset"]) if DIGITS.fullmatch(q.get("offset", "")) else 0
        page = await reader.page(offset, filters, now=time.time())
        return self._page(
            request,
            "jobs.html",
            page=page,
            rows=page.rows,
            filters=filters,
            search=search,
            statuses=[s.value for s in JobStatus],
            tenants=self.tenants.names,
            models=await reader.models(viewer.scope),
            query=query,
            prev_offset=max(0, offset - PAGE_JOBS) if offset and not filters.active else None,
        )

    def _filters(self, request: Request, viewer: Viewer, search: str) -> tuple[Filters, str]:
        """The list's filters, and the query string of those the person chose (for the pager's links).

        A tenant's session is filtered to its tenant, always; an operator may pick a configured tenant.
        """
        q = request.query_params
        status = q.get("status", "")
        status = status if status in set(JobStatus) else ""
        picked = "" if viewer.scope else q.get("tenant", "")
        picked = picked if picked in self.tenants else ""
        model = q.get("model", "").strip()[:200]
        filters = Filters(status, model, search[:200], viewer.scope or picked)
        query = {"status": status, "model": model, "q": search, "tenant": picked}
        return filters, urlencode({k: v for k, v in query.items() if v})

    async def _visible(self, job_id: str, viewer: Viewer) -> bool:
        """Whether the job exists for this viewer: another tenant's is, to a tenant, one that does not."""
        tenant = await self.reader.tenant(job_id) if JOB_ID.fullmatch(job_id) else None
        return tenant is not None and viewer.sees(tenant)

    async def _row(self, request: Request, viewer: Viewer) -> tuple[JobRow, JobRecord]:
        job_id = request.path_params["job_id"]
        rec = await self.reader.record(job_id) if await self._visible(job_id, viewer) else None
        if rec is None:  # unknown, another tenant's, or expired since: one answer for the three
            raise no_job(job_id)
        return make_row(job_id, rec, self.prices, time.time()), rec

    async def job(self, request: Request) -> Response:
        row, rec = await self._row(request, self._viewer(request))
        # A request may be 100 MB of images: read and lay it out off the event loop.
        shown = await asyncio.to_thread(_request_shown, rec.envelope or "")
        result = rec.result_data() if rec.status is JobStatus.SUCCEEDED else None
        return self._page(
            request,
            "job.html",
            row=row,
            messages=shown[0],
            body_json=shown[1],
            answer=render.answer(result),
            can_cancel=not row.terminal,
            can_retry=row.status in (JobStatus.FAILED, JobStatus.CANCELLED),
        )

    async def job_events(self, request: Request) -> Response:
        viewer = self._viewer(request)
        row, rec = await self._row(request, viewer)
        last = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
        after = int(last) if DIGITS.fullmatch(last) else 0
        job = self.client_of().job(row.id, viewer.scope)

        async def stream() -> AsyncIterator[bytes]:
            yield b"retry: 2000\n\n"
            # Already past the end (a reconnect after the terminal event): nothing more will come.
            if not (rec.terminal and after >= rec.seq):
                async for event in job.events(after_seq=after):
                    data = json.dumps(event.model_dump(mode="json", exclude_none=True), ensure_ascii=False)
                    yield f"id: {event.seq}\ndata: {data}\n\n".encode()
            final = await self.reader.rows([row.id], time.time())
            if final:
                yield f"event: summary\ndata: {json.dumps(final[0].summary())}\n\n".encode()

        headers = {"X-Accel-Buffering": "no"}  # a proxy must not hold back a live stream
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def cancel(self, request: Request) -> Response:
        await self._post(request)
        viewer = self._viewer(request)
        row, _ = await self._row(request, viewer)
        await self.client_of().job(row.id, viewer.scope).cancel()
        return self._redirect(request, f"/jobs/{row.id}")

    async def retry(self, request: Request) -> Response:
        await self._post(request)
        viewer = self._viewer(request)
        row, _ = await self._row(request, viewer)
        new = await self._retry_one(row.id, viewer)
        return self._redirect(request, f"/jobs/{new}")

    async def _retry_one(self, job_id: str, viewer: Viewer) -> str:
        try:
            return (await self.client_of().retry(job_id, viewer.scope)).id
        except JobNotFound:
            raise no_job(job_id) from None
        except InvalidRequest as err:
            raise Refused(409, str(err)) from None
        except TenantBudgetExceeded as err:  # the job's tenant has spent its daily budget: no re-run today
            raise Refused(429, str(err)) from None

    # --- dead letters ----------------------------------------------------------------------

    async def failed(self, request: Request) -> Response:
        viewer = self._viewer(request)
        letters = await self.client_of().failed(limit=FAILED_SHOWN, tenant=viewer.scope)
        retried = request.query_params.get("retried", "")
        return self._page(
            request,
            "failed.html",
            letters=letters,
            retried=int(retried) if DIGITS.fullmatch(retried) else None,
            limit=FAILED_SHOWN,
        )

    async def retry_failed(self, request: Request) -> Response:
        _, form = await self._post(request)
        viewer = self._viewer(request)
        one = form.get("one") or []
        ids = one[:1] if one else form.get("ids", [])[:RETRY_MANY_MAX]
        ids = [i for i in ids if JOB_ID.fullmatch(i)]
        new = [await self._retry_one(job_id, viewer) for job_id in ids]
        if one and new:
            return self._redirect(request, f"/jobs/{new[0]}")
        return self._redirect(request, f"/failed?retried={len(new)}")

    # --- fleet -----------------------------------------------------------------------------

    async def _fleet(self, viewer: Viewer) -> dict[str, Any]:
        snapshot = await self.fleet.snapshot()
        return snapshot if viewer.operator else for_tenant(snapshot)

    async def fleet_page(self, request: Request) -> Response:
        fleet = await self._fleet(self._viewer(request))
        return self._page(request, "fleet.html", fleet=fleet, refresh_ms=int(REFRESH_S * 1000))

    async def fleet_json(self, request: Request) -> Response:
        return JSONResponse(await self._fleet(self._viewer(request)))

    # --- errors ----------------------------------------------------------------------------

    async def on_login_required(self, request: Request, exc: Exception) -> Response:
        if request.url.path.endswith(("/events", ".json")):  # read by a script: a redirect would only confuse it
            return PlainTextResponse("sign in at the console's login page first", status_code=401)
        return self._redirect(request, "/login")

    async def on_refused(self, request: Request, exc: Exception) -> Response:
        status = exc.status if isinstance(exc, Refused) else 500
        return self._page(request, "error.html", status, message=str(exc))

    def app(self) -> Starlette:
        routes = [
            Route("/", self.index, methods=["GET"]),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/jobs", self.jobs, methods=["GET"]),
            Route("/jobs/{job_id}", self.job, methods=["GET"]),
            Route("/jobs/{job_id}/events", self.job_events, methods=["GET"]),
            Route("/jobs/{job_id}/cancel", self.cancel, methods=["POST"]),
            Route("/jobs/{job_id}/retry", self.retry, methods=["POST"]),
            Route("/failed", self.failed, methods=["GET"]),
            Route("/failed/retry", self.retry_failed, methods=["POST"]),
            Route("/fleet", self.fleet_page, methods=["GET"]),
            Route("/fleet.json", self.fleet_json, methods=["GET"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        handlers = {LoginRequired: self.on_login_required, Refused: self.on_refused}
        return Starlette(routes=routes, exception_handlers=handlers)


def _request_shown(envelope: str) -> tuple[list[render.Message], str]:
    """A job's request for its page: the messages, and the body as (shortened) JSON."""
    try:
        body: dict[str, Any] = JobEnvelope.model_validate_json(envelope).request
    except ValueError:
        body = {}
    return render.messages(body), render.shorten_json(body)


def console_routes(
    client_of: Callable[[], AsyncClient], *, tenants: Tenants, keys: Keys, prices_file: str | None = None
) -> list[BaseRoute]:
    """The routes the gateway mounts: ``/console`` itself, and everything under it.

    ``tenants`` are the gateway's (``gateway_tenants``): the tokens the console admits, and whom each speaks for.
    """
    console = Console(client_of, tenants=tenants, keys=keys, prices_file=prices_file)
    guarded = ConsoleGuard(console.app())

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await console.open()
        await guarded(scope, receive, send)

    async def root(request: Request) -> Response:
        return RedirectResponse(str(request.scope.get("root_path", "")) + "/console/", status_code=307)

    return [Route("/console", root, methods=["GET"]), Mount("/console", app=app)]
