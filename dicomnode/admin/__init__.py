"""The admin surface of a running node: HTTP API, web page, Prometheus metrics, audit log (docs/admin.md).

:mod:`.ops` holds the operations (the CLI calls them too), :mod:`.api` the FastAPI application, :mod:`.web`
the server-rendered page, :mod:`.metrics` the Prometheus collectors, :mod:`.auth` tokens and the audit log,
:mod:`.service` the uvicorn thread started with ``dicomnode serve``. The node's stages never import this
package: the server hands them an observer and runs the service as an add-on.
"""
