"""WADO-RS views (PS3.18 10.4): instances, metadata, frames, bulk data and rendered images.

Views negotiate the media type, call dicomweb.retrieve / frames / rendering, and stream the answer.
Whatever must be decoded is sized first (dicomweb.decoding): past ISTHMUS_MAX_DECODE_MB, 406.
"""

from __future__ import annotations

import json

from django.http import HttpResponse, StreamingHttpResponse

from dicomweb import accept, dicomjson, frames, multipart, rendering, retrieve
from dicomweb.base import DICOM_JSON, DicomWebError, DicomWebView, add_warnings, problem
from dicomweb.qido import base_url
from gateway import store

DICOM = "application/dicom"
THUMBNAIL_SIZE = (128, 128)


def _multipart_response(parts, part_type: str) -> StreamingHttpResponse:
    """Streamed; with a Content-Length when `parts` is a list whose sizes are all known."""
    boundary = multipart.new_boundary()
    response = StreamingHttpResponse(
        multipart.stream(parts, boundary), content_type=multipart.content_type(part_type, boundary)
    )
    size = multipart.length(parts, boundary) if isinstance(parts, list) else None
    if size is not None:
        response["Content-Length"] = str(size)
    return response


class WadoView(DicomWebView):
    """Turns DicomWebError into problem answers."""

    def get(self, request, **kwargs):
        try:
            return self.answer(request, **kwargs)
        except DicomWebError as exc:
            return problem(exc.status, exc.detail)

    def answer(self, request, **kwargs):
        raise NotImplementedError


class Retrieve(WadoView):
    """Study, series or instance as multipart/related; type="application/dicom" (PS3.18 10.4.1.1.1)."""

    def answer(self, request, study: str, series: str = "", instance: str = ""):
        syntaxes = accept.dicom_syntaxes(accept.parse_accept(request.headers.get("Accept")))
        if syntaxes is None:
            return problem(406, 'instances are served as multipart/related; type="application/dicom"')
        parts, missing = [], 0
        for row in retrieve.instances(study, series, instance):
            path = store.instance_path(row)
            size = retrieve.file_size(path)
            if size is None:
                missing += 1
                continue
            syntax = retrieve.target_syntax(row.transfer_syntax_uid, syntaxes)
            if syntax is None:
                return problem(406, f"{row.sop_instance_uid} is stored as {row.transfer_syntax_uid}; accept it or '*'")
            sent_as_stored = syntax == row.transfer_syntax_uid
            retrieve.check_transcode(row, syntax, path)
            parts.append(
                multipart.Part(
                    f"{DICOM}; transfer-syntax={syntax}",
                    retrieve.instance_chunks(row, syntax, path),
                    size=size if sent_as_stored else None,
                )
            )
        if not parts:
            return problem(404, "the instances' files are missing")
        warnings = [f"{missing} instance(s) are indexed but their files are missing"] if missing else []
        return add_warnings(_multipart_response(parts, DICOM), warnings)


class Metadata(WadoView):
    """Study, series or instance metadata as DICOM JSON with BulkDataURIs (PS3.18 10.4.1.1.2)."""

    def answer(self, request, study: str, series: str = "", instance: str = ""):
        ranges = accept.parse_accept(request.headers.get("Accept"))
        if not accept.accepts_any(ranges, DICOM_JSON, "application/json"):
            return problem(406, "metadata is served as application/dicom+json")
        rows = list(retrieve.instances(study, series, instance))
        return StreamingHttpResponse(_metadata_array(rows, base_url(request)), content_type=DICOM_JSON)


def _metadata_array(rows, root: str):
    """The JSON array written one instance at a time: a large study's metadata is never whole in memory."""
    yield b"["
    first = True
    for row in rows:
        url = dicomjson.retrieve_url(root, _row_uids(row), "IMAGE")
        try:
            with retrieve.read_header(row) as header:
                item = dicomjson.dataset_json(header, url, pixel_vr=retrieve.pixel_vr(row))
        except (OSError, DicomWebError):  # indexed but its file is gone (or will not inflate): leave it out
            continue
        yield (b"" if first else b",") + json.dumps(item).encode()
        first = False
    yield b"]"


def _row_uids(row) -> dict:
    return {
        "StudyInstanceUID": row.series.study.study_instance_uid,
        "SeriesInstanceUID": row.series.series_instance_uid,
        "SOPInstanceUID": row.sop_instance_uid,
    }


def _frame_plan(request, pixel_file: frames.PixelFile) -> tuple[str, bool]:
    """(part media type, decode?): the stored bitstream when its type is accepted, else native pixel bytes."""
    stored_media = pixel_file.media_type
    for media_type, syntax in accept.frame_types(accept.parse_accept(request.headers.get("Accept"))):
        if media_type == "*/*":
            return stored_media, False
        if media_type in (frames.OCTET_STREAM, "application/*"):
            if syntax == accept.ANY_SYNTAX:
                return stored_media, False
            return frames.OCTET_STREAM, pixel_file.needs_decoding
        compressed = stored_media != frames.OCTET_STREAM
        if (
            compressed
            and media_type in (stored_media, "image/*")
            and syntax in ("", accept.ANY_SYNTAX, pixel_file.syntax)
        ):
            return stored_media, False
    raise DicomWebError(406, f"frames are available as {stored_media} or application/octet-stream")


def _pixel_file(study: str, series: str, instance: str) -> frames.PixelFile:
    row = retrieve.instances(study, series, instance).first()
    try:
        return frames.PixelFile(retrieve.open_instance(row))
    except OSError:
        raise DicomWebError(404, "the instance's file is missing") from None


def _frames_response(request, pixel_file: frames.PixelFile, numbers: list[int]) -> StreamingHttpResponse:
    """Frames `numbers` as parts; the file stays open until the body is sent, and is closed on any refusal."""
    try:
        part_type, decode = _frame_plan(request, pixel_file)
        if decode and pixel_file.syntax.is_encapsulated and not retrieve.can_decode(pixel_file.syntax):
            raise DicomWebError(406, f"no decoder for {pixel_file.syntax}: accept {pixel_file.media_type}")
        if decode:
            pixel_file.check_decoding(f"frames of {pixel_file.dataset.get('SOPInstanceUID', 'the instance')}")
    except DicomWebError:
        pixel_file.fp.close()
        raise
    content_type = part_type
    if part_type != frames.OCTET_STREAM:
        content_type = f"{part_type}; transfer-syntax={pixel_file.syntax}"

    def parts():
        with pixel_file:
            for number in numbers:
                chunks = pixel_file.decoded_frame(number) if decode else pixel_file.stored_frame(number)
                yield multipart.Part(content_type, chunks)

    return _multipart_response(parts(), part_type)


class Frames(WadoView):
    """Frames as multipart/related parts (PS3.18 10.4.1.1.3)."""

    def answer(self, request, study: str, series: str, instance: str, frame_list: str):
        pixel_file = _pixel_file(study, series, instance)
        try:
            numbers = frames.frame_numbers(frame_list, pixel_file.count)
        except DicomWebError:
            pixel_file.fp.close()
            raise
        return _frames_response(request, pixel_file, numbers)


class BulkData(WadoView):
    """Bulk data by BulkDataURI (PS3.18 10.4.1.1.5): Pixel Data as its frames, other values whole."""

    def answer(self, request, study: str, series: str, instance: str, tag: str):
        if tag.upper() == dicomjson.tag_hex(dicomjson.PIXEL_DATA):
            pixel_file = _pixel_file(study, series, instance)
            return _frames_response(request, pixel_file, list(range(1, pixel_file.count + 1)))
        try:
            number = int(tag, 16)
        except ValueError:
            raise DicomWebError(400, "bulk data is named by an 8-digit hex tag") from None
        with retrieve.read_header(retrieve.instances(study, series, instance).first()) as header:
            if number not in header:
                raise DicomWebError(404, f"no {tag} in the instance")
            value = header[number].value
        if not isinstance(value, bytes):
            raise DicomWebError(404, f"{tag} is not bulk data")
        return _multipart_response([multipart.Part(frames.OCTET_STREAM, [value])], frames.OCTET_STREAM)


def _render_type(request) -> str:
    ranges = accept.parse_accept(request.headers.get("Accept"))
    for media_range in ranges:
        for kind in rendering.MEDIA_TYPES:
            if media_range.matches(kind):
                return kind
    raise DicomWebError(406, "rendered images are image/jpeg or image/png")


class Rendered(WadoView):
    """An instance (frame 1) or a frame rendered as image/jpeg or image/png (PS3.18 10.4.1.1.4)."""

    def answer(self, request, study: str, series: str, instance: str, frame_list: str = "1"):
        media_type = _render_type(request)
        try:
            number = int(frame_list.split(",")[0])
        except ValueError:
            raise DicomWebError(400, "frames must be a frame number") from None
        options = rendering.parse_options(request.GET)
        row = retrieve.instances(study, series, instance).first()
        with retrieve.open_instance(row) as source:
            image = rendering.render(source, number, media_type, options)
        if "," in frame_list:
            options.warnings.append("only the first frame of a list is rendered")
        return add_warnings(HttpResponse(image, content_type=media_type), options.warnings)


class Thumbnail(WadoView):
    """A small rendering of a study, series or instance (PS3.18 10.4.1.1.4): its middle image, frame 1."""

    def answer(self, request, study: str, series: str = "", instance: str = ""):
        media_type = _render_type(request)
        options = rendering.parse_options(request.GET, default_viewport=THUMBNAIL_SIZE)
        row = retrieve.representative(study, series, instance)
        with retrieve.open_instance(row) as source:
            image = rendering.render(source, 1, media_type, options)  # one frame, never the whole instance
        return add_warnings(HttpResponse(image, content_type=media_type), options.warnings)
