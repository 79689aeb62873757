"""moonq's worker side: ``celery -A worker worker`` starts a node.

The app is built from the environment when this package is imported, which is what the
``celery -A worker`` entry point does; tests and embedders call ``create_app(settings)``.
"""

from worker.app import create_app

app = create_app()

__all__ = ["app", "create_app"]
