"""File endpoints of the REST API emulator: multipart upload and download.

Uploads are read part by part and chunk by chunk, so an oversized file is
refused (413) as soon as it crosses ``max_file_size`` instead of after it has
been buffered whole.
"""

from __future__ import annotations

import hashlib
import uuid
from urllib.parse import quote

from aiohttp import BodyPartReader, hdrs, web

from proxy.sandbox.errors import ApiError
from proxy.sandbox.inject import shaped_download
from proxy.sandbox.keys import COUNTRY, SANDBOX_SETTINGS, SANDBOX_STATE
from proxy.sandbox.restapi import CC
from proxy.sandbox.state import StoredFile

CHUNK_SIZE = 64 * 1024
DEFAULT_MIME_TYPE = "application/octet-stream"
DEFAULT_FILENAME = "file"


async def upload_file(request: web.Request) -> web.Response:
    """``POST /{cc}/webapi/records/{record_key}/files``: store the ``file`` part.

    404 when the record does not exist, 400 when the body is not multipart or
    lacks a ``file`` part, 413 when the file exceeds ``max_file_size``. The
    ``x-filename`` header, when present, overrides the part's filename. Returns
    201 ``{"file_id", "filename", "size", "mime_type", "sha256"}``.
    """
    country = request[COUNTRY]
    record_key = request.match_info["record_key"]
    state = request.app[SANDBOX_STATE]
    limit = request.app[SANDBOX_SETTINGS].max_file_size
    if record_key not in state.records.get(country, {}):
        raise ApiError(404, "record not found", "path.record_key")
    if request.content_type != "multipart/form-data":
        raise ApiError(400, "the body must be multipart/form-data", "headers")

    try:
        reader = await request.multipart()
        part: BodyPartReader | None = None
        async for candidate in reader:
            # Parts other than "file" are skipped; the reader drains them.
            if isinstance(candidate, BodyPartReader) and candidate.name == "file":
                part = candidate
                break
        if part is None:
            raise ApiError(400, "multipart field 'file' is missing", "body.file")

        hasher = hashlib.sha256()
        data = bytearray()
        while chunk := await part.read_chunk(CHUNK_SIZE):
            if len(data) + len(chunk) > limit:
                raise ApiError(413, f"the file exceeds the {limit} byte limit", "body.file")
            hasher.update(chunk)
            data.extend(chunk)
    except ValueError:
        # aiohttp's multipart reader signals malformed input with ValueError.
        raise ApiError(400, "malformed multipart body", "body") from None

    filename = request.headers.get("x-filename") or part.filename or DEFAULT_FILENAME
    mime_type = part.headers.get(hdrs.CONTENT_TYPE) or DEFAULT_MIME_TYPE
    # The record may have been deleted while the upload streamed in.
    if record_key not in state.records.get(country, {}):
        raise ApiError(404, "record not found", "path.record_key")
    stored = StoredFile(
        file_id=str(uuid.uuid4()),
        filename=filename,
        mime_type=mime_type,
        data=bytes(data),
        sha256=hasher.hexdigest(),
    )
    state.record_files(country, record_key)[stored.file_id] = stored
    state.writes += 1
    return web.json_response(stored.to_json(), status=201)


async def download_file(request: web.Request) -> web.StreamResponse:
    """``GET /{cc}/webapi/records/{record_key}/files/{file_id}``: the stored bytes.

    Served with the uploaded content type and ``Content-Disposition: attachment``;
    404 when the record or the file does not exist. While the REST API faults
    throttle or cut downloads, a GET streams the file accordingly
    (:func:`proxy.sandbox.inject.shaped_download`).
    """
    country = request[COUNTRY]
    state = request.app[SANDBOX_STATE]
    files = state.files.get(country, {}).get(request.match_info["record_key"])
    stored = (files or {}).get(request.match_info["file_id"])
    if stored is None:
        raise ApiError(404, "file not found", "path.file_id")
    faults = state.faults.restapi
    shaped = faults.shapes_downloads and request.method == hdrs.METH_GET
    response = web.StreamResponse() if shaped else web.Response(body=stored.data)
    response.headers[hdrs.CONTENT_TYPE] = stored.mime_type
    response.headers[hdrs.CONTENT_DISPOSITION] = content_disposition(stored.filename)
    response.headers["X-Content-Type-Options"] = "nosniff"
    if shaped:
        return await shaped_download(request, response, stored, faults)
    return response


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII ``filename`` fallback and an RFC 5987 ``filename*``."""
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def add_routes(app: web.Application) -> None:
    """Register the file endpoints (route names start with ``restapi.``)."""
    app.router.add_post(
        f"/{CC}/webapi/records/{{record_key}}/files", upload_file, name="restapi.files_upload"
    )
    app.router.add_get(
        f"/{CC}/webapi/records/{{record_key}}/files/{{file_id}}",
        download_file,
        name="restapi.files_download",
    )
