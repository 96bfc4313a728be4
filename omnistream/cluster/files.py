"""Artifacts from any node: an internal route signed with the cluster secret.

An output stays in the artifacts directory of the node that wrote it; Redis records which
node that was. ``GET /v1/files/{id}`` on another node streams the file from the holder's
``/internal/cluster/files/{id}``. That route answers only requests signed with
``OMNISTREAM_CLUSTER_SECRET`` (HMAC-SHA256 over a timestamp and the path, valid for
:data:`SIGNATURE_WINDOW_S`), so nothing there is reachable without the secret; ids are
checked against the artifact id pattern before any file-system lookup. When every node
mounts one directory (``cluster_shared_artifacts``) the local lookup finds every file and
no node-to-node call happens.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable

import httpx
from fastapi import APIRouter, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from omnistream.jobs.artifacts import FILE_ID_RE
from omnistream.jobs.service import JobService
from omnistream.transports.state import get_state

AUTH_HEADER = "x-omnistream-cluster-auth"
OWNER_HEADER = "x-omnistream-owner"
SIGNATURE_WINDOW_S = 60.0
INTERNAL_PREFIX = "/internal/cluster"
FETCH_TIMEOUT_S = 30.0
PASSED_HEADERS = ("content-type", "content-length", "content-disposition", "last-modified")

router = APIRouter()


def _mac(secret: str, stamp: str, path: str, owner: str | None) -> str:
    message = f"{stamp}\n{path}\n{owner or ''}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secret: str, path: str, now: float | None = None, owner: str | None = None) -> str:
    """The auth header value for an internal request to ``path`` on behalf of ``owner``
    (``None``: an admin caller, who may see every owner's files)."""
    stamp = str(int(now if now is not None else time.time()))
    return f"{stamp}.{_mac(secret, stamp, path, owner)}"


def verify(secret: str | None, path: str, header: str | None, owner: str | None = None) -> bool:
    """Whether ``header`` signs ``path`` (and ``owner``) with ``secret`` recently enough."""
    if not secret or not header or "." not in header:
        return False
    stamp, _, mac = header.partition(".")
    if not stamp.isdigit() or abs(time.time() - int(stamp)) > SIGNATURE_WINDOW_S:
        return False
    return hmac.compare_digest(_mac(secret, stamp, path, owner), mac)


def _unauthorized() -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "code": "cluster_auth_required",
                "message": "Internal cluster route: a request signed with the cluster secret "
                "is required.",
                "type": "authentication_error",
            }
        },
        status_code=401,
    )


@router.get(INTERNAL_PREFIX + "/files/{file_id}")
async def internal_file(request: Request, file_id: str) -> Response:
    """Serve a local artifact to another node (401 without a valid signature)."""
    state = get_state(request)
    signature = request.headers.get(AUTH_HEADER)
    owner = request.headers.get(OWNER_HEADER)  # signed too: the caller's key's owner id
    if not verify(state.settings.cluster_secret, request.url.path, signature, owner):
        return _unauthorized()
    service = JobService.of(state)
    path = await asyncio.to_thread(service.artifacts.find, file_id, owner)
    if path is None:
        return JSONResponse(
            {"error": {"code": "file_not_found", "message": f"No file with id '{file_id}'.",
                       "type": "not_found_error"}},
            status_code=404,
        )
    return FileResponse(path, media_type=service.artifacts.mime_of(path), filename=path.name)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "type": "service_unavailable"}},
        status_code=status,
    )


class _Relayed(StreamingResponse):
    """Another node's answer streamed on; its connection is closed however the response
    ends, also when the client went away before the first chunk (a body generator that
    never started would never run its ``finally``)."""

    def __init__(self, upstream: httpx.Response, headers: dict[str, str]) -> None:
        super().__init__(upstream.aiter_bytes(), headers=headers)
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self.upstream.aclose())


class RemoteFiles:
    """Fetches artifacts from the node that holds them.

    Args:
        node_id: this node's id.
        secret: the cluster secret (``None``: other nodes' files cannot be fetched).
        file_node: which node wrote a file id (from Redis).
        node_url: a node's advertised URL (from the registry), ``None`` when it is gone.
    """

    def __init__(
        self,
        node_id: str,
        secret: str | None,
        file_node: Callable[[str], Awaitable[str | None]],
        node_url: Callable[[str], Awaitable[str | None]],
    ) -> None:
        self.node_id = node_id
        self.secret = secret
        self.file_node = file_node
        self.node_url = node_url
        self.client = httpx.AsyncClient(timeout=FETCH_TIMEOUT_S)

    async def __call__(self, file_id: str, owner: str | None = None) -> Response | None:
        """A streaming response with the file, an error response, or ``None`` (404).

        ``owner``: the caller's owner id (``None`` for an admin); another owner's file
        answers 404 on the node that holds it, exactly as it would locally.
        """
        if not FILE_ID_RE.match(file_id):
            return None
        holder = await self.file_node(file_id)
        if holder is None or holder == self.node_id:
            return None
        url = await self.node_url(holder)
        if url is None:
            return _error(
                503, "file_unavailable", f"File '{file_id}' is on node {holder}, which is down."
            )
        if not self.secret:
            return _error(
                503,
                "file_unavailable",
                f"File '{file_id}' is on node {holder}; set OMNISTREAM_CLUSTER_SECRET on every "
                "node (or share artifacts_dir) to fetch it from here.",
            )
        path = f"{INTERNAL_PREFIX}/files/{file_id}"
        headers = {AUTH_HEADER: sign(self.secret, path, owner=owner)}
        if owner is not None:
            headers[OWNER_HEADER] = owner
        request = self.client.build_request("GET", url.rstrip("/") + path, headers=headers)
        try:
            upstream = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            return _error(503, "file_unavailable", f"Node {holder} did not answer: {exc}")
        if upstream.status_code != 200:
            await upstream.aclose()
            if upstream.status_code == 404:
                return None
            return _error(
                502, "file_unavailable", f"Node {holder} answered {upstream.status_code}."
            )
        headers = {k: v for k, v in upstream.headers.items() if k.lower() in PASSED_HEADERS}
        return _Relayed(upstream, headers)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.client.aclose()
