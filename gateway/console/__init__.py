"""The web console (``GET /console``): the fleet, the jobs, one job's answer streaming live, dead letters.

Served by the gateway in the same process, over the same ``AsyncClient`` and the same tokens:
an operator or a tenant signs in with a gateway token and gets a signed session cookie
(``session.py``) that sees what the token may see (a tenant's: its own jobs only).
Server-rendered pages (Jinja2, ``templates/``) with a little vanilla JavaScript (``static/``),
all shipped in the package: nothing is fetched from a network at install or run time. The
security model is in docs/console.md. Modules: ``routes.py`` (pages and actions), ``jobs.py``
(reading jobs), ``render.py`` (a request for display), ``fleet.py`` (the Fleet page's scrapes),
``web.py`` (headers and form checks), ``session.py``.
"""

from gateway.console.routes import console_routes

__all__ = ["console_routes"]
