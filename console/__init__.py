"""The operator's console: the ``moonq`` command (submit, follow, status, result, cancel, failed,
retry, batch, top, gateway, simulate, demo) over the SDK and the core.
"""
