"""The KiTS challenge sources (kits19, kits21, kits23) and a robust, resumable downloader.

Facts about each source live in :data:`SOURCES`, one small table per source: which case
numbers are labelled or imaging-only, the public hosts and the name of the label file in
the source's repository (label values and file names: :mod:`kidney_seg.vocabulary`).
Whatever the remote names, a case is stored locally as ``<root>/<case>/imaging.nii.gz``
and ``<root>/<case>/segmentation.nii.gz``.

Imaging of every source comes from the KiTS imaging dataset on Hugging Face
(``{imaging_url}/case_XXXXX.nii.gz``). It holds the KiTS19 imaging, cases 0-299, which
KiTS21 and KiTS23 reuse unchanged. The imaging of the KiTS23 cases 400-588 may live
elsewhere: point ``dataset.kits_imaging_url`` at a mirror (or a local server) holding
``case_XXXXX.nii.gz`` for them. Labels are fetched from
``{labels_url}/case_XXXXX/<label_file>``; ``dataset.kits_labels_url`` overrides the base.

Security: every download uses https, redirects included; ``dataset.allow_http`` admits
plain http to a loopback host only (a local test server), and a redirect never goes from
https back to http. The local path of a file is computed from the case id (which must be
``case_XXXXX``) and must resolve inside the dataset root; nothing the server sends
(headers, redirect targets, Content-Disposition) influences it.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from kidney_seg.atomic import OutputWriteError
from kidney_seg.errors import CaseDataError
from kidney_seg.vocabulary import IMAGE_NAME, LABEL_NAME, SOURCE_LABELS, case_id_of, is_case_id
from kidney_seg.volume import check_same_grid, read_geometry, read_image, read_label

log = logging.getLogger(__name__)

HF_IMAGING = "https://huggingface.co/datasets/neheller/KiTS-Challenge-Imaging/resolve/main/images"
CHUNK = 1 << 20
MAX_BACKOFF_S = 60.0
RETRY_HTTP = frozenset({408, 425, 429})  # 4xx codes that mean "try again later"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def check_case_id(case_id: object, where: object = "case id") -> None:
    """Raise unless ``case_id`` is a valid case id, so that it can never act as a path."""
    if not is_case_id(case_id):
        raise CaseDataError(None, where, f"invalid case id {case_id!r}: it must be case_XXXXX with five digits")


@dataclass(frozen=True)
class KitsSource:
    """What one KiTS edition offers and where its files live."""

    name: str
    labelled: tuple[int, ...]
    unlabelled: tuple[int, ...]
    imaging_url: str
    labels_url: str
    label_file: str

    def case_ids(self, numbers: tuple[int, ...]) -> list[str]:
        """Case ids ``case_XXXXX`` of some case numbers."""
        return [case_id_of(i) for i in numbers]

    @property
    def labels(self) -> tuple[int, ...]:
        """The label values of this source's segmentations."""
        return SOURCE_LABELS[self.name]


SOURCES: dict[str, KitsSource] = {
    "kits19": KitsSource(
        name="kits19",
        labelled=tuple(range(0, 210)),
        unlabelled=tuple(range(210, 300)),  # the 2019 test set: imaging only
        imaging_url=HF_IMAGING,
        labels_url="https://raw.githubusercontent.com/neheller/kits19/master/data",
        label_file="segmentation.nii.gz",
    ),
    "kits21": KitsSource(
        name="kits21",
        labelled=tuple(range(0, 300)),
        unlabelled=(),
        imaging_url=HF_IMAGING,
        labels_url="https://raw.githubusercontent.com/neheller/kits21/master/kits21/data",
        label_file="aggregated_MAJ_seg.nii.gz",
    ),
    "kits23": KitsSource(
        name="kits23",
        labelled=tuple(range(0, 300)) + tuple(range(400, 589)),
        unlabelled=(),
        imaging_url=HF_IMAGING,  # cases 400-588: set dataset.kits_imaging_url (see module docstring)
        labels_url="https://raw.githubusercontent.com/neheller/kits23/main/dataset",
        label_file="segmentation.nii.gz",
    ),
}


# ----------------------------------------------------------------------------- URLs


def raw_root(dataset_cfg: dict) -> str:
    """Folder that holds (or receives) the raw cases: ``dataset.root`` or ``data/<source>``."""
    return dataset_cfg.get("root") or os.path.join("data", dataset_cfg["source"])


def destination(case_id: str, dataset_cfg: dict, name: str, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<case>/<name>``, computed from the case id alone; raise unless it resolves inside the root.

    ``root`` defaults to the dataset root (:func:`raw_root`). A case folder (or file) that is
    a symlink leading out of the root is refused.
    """
    check_case_id(case_id)
    root = Path(raw_root(dataset_cfg) if root is None else root)
    dest = root / case_id / name
    real_root, real = root.resolve(), dest.resolve()
    if not real.is_relative_to(real_root) or real == real_root:
        raise CaseDataError(case_id, dest, f"resolves to {real}, outside the dataset root {real_root}: refused")
    return dest


def _checked_out(case_id: str, dataset_cfg: dict, name: str, out: str | os.PathLike) -> Path:
    """The download destination of a case's file; raise when the requested ``out`` is any other path.

    ``out`` must be ``<root>/<case>/<name>``; with a relative root, a prefix before it is
    accepted (Snakemake storage plugins run jobs under a local copy of the root).
    """
    root = raw_root(dataset_cfg)
    expected = os.path.normpath(os.path.join(root, case_id, name))
    actual = os.path.abspath(out)
    if actual == os.path.abspath(expected) or (not os.path.isabs(root) and actual.endswith(os.sep + expected)):
        return destination(case_id, dataset_cfg, name, root=Path(actual).parent.parent)
    raise CaseDataError(
        case_id, out, f"a downloaded {name} can only be written to {expected} (dataset root / case / file)"
    )


def source_of(dataset_cfg: dict) -> KitsSource:
    """The KiTS table of ``dataset.source``."""
    return SOURCES[dataset_cfg["source"]]


def image_url(case_id: str, dataset_cfg: dict) -> str:
    """Where a case's imaging is downloaded from."""
    base = dataset_cfg.get("kits_imaging_url") or source_of(dataset_cfg).imaging_url
    return f"{base.rstrip('/')}/{case_id}.nii.gz"


def label_url(case_id: str, dataset_cfg: dict) -> str:
    """Where a case's label file is downloaded from."""
    src = source_of(dataset_cfg)
    base = dataset_cfg.get("kits_labels_url") or src.labels_url
    return f"{base.rstrip('/')}/{case_id}/{src.label_file}"


# ----------------------------------------------------------------------------- fetching


def _require_case(case_id: str, src: KitsSource, labelled: bool) -> None:
    """Raise unless the source offers this case (with a label when ``labelled``)."""
    numbers = src.labelled if labelled else src.labelled + src.unlabelled
    if case_id in src.case_ids(numbers):
        return
    if labelled and case_id in src.case_ids(src.unlabelled):
        raise CaseDataError(case_id, src.name, f"imaging-only case: {src.name} publishes no label for it")
    raise CaseDataError(case_id, src.name, f"not a case of {src.name}")


def _target(case_id: str, dataset_cfg: dict, name: str, out: str | os.PathLike, labelled: bool):
    """(source, checked destination) of one file to fetch: a valid case id the source offers, a path inside the root."""
    src = source_of(dataset_cfg)
    check_case_id(case_id)
    _require_case(case_id, src, labelled=labelled)
    return src, _checked_out(case_id, dataset_cfg, name, out)


def fetch_kits_image(case_id: str, dataset_cfg: dict, out: str | os.PathLike, allow_http: bool = False) -> None:
    """Download one imaging file to ``<root>/<case>/imaging.nii.gz`` (``out`` must be that path).

    The grid is checked against the label when that exists. ``allow_http`` admits plain
    http to a loopback host (``dataset.allow_http``).
    """
    _, out = _target(case_id, dataset_cfg, IMAGE_NAME, out, labelled=False)
    label = out.with_name(LABEL_NAME)

    def check(path: Path) -> None:
        _, geometry = read_image(path, case_id)
        if label.is_file():
            check_same_grid(geometry, read_geometry(label, case_id), case_id, label)

    download(image_url(case_id, dataset_cfg), out, case_id, check=check, allow_http=allow_http)


def fetch_kits_label(case_id: str, dataset_cfg: dict, out: str | os.PathLike, allow_http: bool = False) -> None:
    """Download one label file to ``<root>/<case>/segmentation.nii.gz`` (``out`` must be that path).

    Its values are checked, and its grid against the image when that exists.
    """
    src, out = _target(case_id, dataset_cfg, LABEL_NAME, out, labelled=True)
    image = out.with_name(IMAGE_NAME)

    def check(path: Path) -> None:
        read_label(path, case_id, src.labels, read_geometry(image, case_id) if image.is_file() else None)

    download(label_url(case_id, dataset_cfg), out, case_id, check=check, allow_http=allow_http)


# ----------------------------------------------------------------------------- download


class _Retry(Exception):
    """A transient failure: try again (resuming where possible)."""


class _LogStream:
    """A file-like sink for tqdm that sends each progress line to the module logger."""

    def write(self, text: str) -> None:
        """Log the non-empty part of a tqdm refresh."""
        text = text.strip("\r\n ")
        if text:
            log.info("%s", text)

    def flush(self) -> None:
        """Nothing to flush."""


def partial_path(dest: str | os.PathLike) -> Path:
    """The partial file a download streams into (kept between runs for resuming)."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


def _verify_path(dest: Path) -> Path:
    """A hidden name with the destination's extension, under which a complete download is checked."""
    return dest.with_name(f".verify.{dest.name}")


def download(
    url: str,
    dest: str | os.PathLike,
    case_id: str,
    *,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    check: Callable[[Path], None] | None = None,
    allow_http: bool = False,
) -> None:
    """Download ``url`` to ``dest`` with retries, resume and an integrity check; atomic.

    ``url`` must be https, or plain http to a loopback host when ``allow_http``; so must
    every redirect target, and a redirect never downgrades https to http. ``case_id`` must
    be a valid case id. Both are checked before any connection. ``dest`` is the caller's:
    nothing the server sends changes it.
    """
    check_case_id(case_id, url)
    check_url(url, case_id, allow_http)
    dest = Path(dest)
    if dest.exists():
        log.info("%s: %s already present; nothing to download", case_id, dest)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    _verify_path(dest).unlink(missing_ok=True)  # left by a run killed while checking
    _transfer(url, partial_path(dest), case_id, retries, backoff, timeout, allow_http)
    _verify_and_place(url, dest, case_id, check)
    log.info("%s: saved %s (%d bytes)", case_id, dest, dest.stat().st_size)


def url_problem(url: str, allow_http: bool = False, redirected_from: str | None = None) -> str | None:
    """Why ``url`` may not be fetched (None when it may): https only, or http to loopback with ``allow_http``.

    ``redirected_from``: the URL that redirected here; a redirect from https to http is
    refused even to a loopback host.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        return f"malformed URL ({exc})"
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return f"unsupported URL scheme {scheme!r}: downloads must use https"
    if not host:
        return "URL without a host"
    if scheme == "https":
        return None
    if not allow_http:
        return (
            "plain http refused: downloads must use https (dataset.allow_http admits http to a loopback "
            "test server only)"
        )
    if host not in LOOPBACK:
        return (
            f"plain http to {host!r} refused: dataset.allow_http admits http only to a loopback host "
            "(127.0.0.1, ::1, localhost)"
        )
    if redirected_from is not None and urllib.parse.urlsplit(redirected_from).scheme.lower() != "http":
        return "redirect from https to plain http refused"
    return None


def check_url(url: str, case_id: str, allow_http: bool = False) -> None:
    """Raise a CaseDataError naming the case and the URL unless ``url`` may be fetched (see :func:`url_problem`)."""
    problem = url_problem(url, allow_http)
    if problem:
        raise CaseDataError(case_id, url, problem)


def check_redirect(source: str, target: str, case_id: str, allow_http: bool = False) -> None:
    """Raise a CaseDataError naming the case, the URL and the redirect target unless the redirect may be followed."""
    problem = url_problem(target, allow_http, redirected_from=source)
    if problem:
        raise CaseDataError(case_id, source, f"redirected to {target}: {problem}")


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL that :func:`check_redirect` accepts; checked before connecting."""

    def __init__(self, case_id: str, allow_http: bool):
        self.case_id, self.allow_http = case_id, allow_http

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        """Refuse a redirect to a URL that is not allowed (``newurl`` is already absolute)."""
        try:
            check_redirect(req.full_url, newurl, self.case_id, self.allow_http)
        except CaseDataError:
            fp.close()
            raise
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(case_id: str, allow_http: bool) -> urllib.request.OpenerDirector:
    """A URL opener whose redirects are checked."""
    return urllib.request.build_opener(_SafeRedirects(case_id, allow_http))


def _transfer(
    url: str, part: Path, case_id: str, retries: int, backoff: float, timeout: float, allow_http: bool = False
) -> None:
    """Fill ``part`` with the whole body, retrying transient failures; attempts that progress are free."""
    failures = 0
    while True:
        before = _size(part)
        try:
            _attempt(url, part, case_id, timeout, allow_http)
            return
        except _Retry as exc:
            failures = 0 if _size(part) > before else failures + 1
            if failures > retries:
                raise CaseDataError(
                    case_id, url, f"download failed after {retries} retries ({exc}); partial data kept in {part}"
                ) from exc
            delay = min(backoff * 2 ** max(failures - 1, 0), MAX_BACKOFF_S)
            log.warning("%s: %s; retrying %s in %.1f s", case_id, exc, url, delay)
            time.sleep(delay)


def _size(path: Path) -> int:
    """Size of a file, 0 when absent."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _attempt(url: str, part: Path, case_id: str, timeout: float, allow_http: bool = False) -> None:
    """One HTTP request: resume or restart ``part``; raise _Retry on transient failures.

    Redirects are checked before they are followed, and the final URL once more.
    """
    offset = _size(part)
    request = urllib.request.Request(url, headers={"User-Agent": "kidney-seg", "Accept-Encoding": "identity"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        with _opener(case_id, allow_http).open(request, timeout=timeout) as resp:
            final = resp.geturl()
            if final != url:
                check_redirect(url, final, case_id, allow_http)
            _receive(resp, part, offset, case_id)
    except urllib.error.HTTPError as exc:
        _http_error(exc, url, part, case_id)
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise CaseDataError(case_id, url, f"TLS certificate not trusted ({exc.reason})") from exc
        raise _Retry(f"URLError: {exc.reason}") from exc
    except (http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError) as exc:
        raise _Retry(f"{type(exc).__name__}: {exc}") from exc


def _http_error(exc: urllib.error.HTTPError, url: str, part: Path, case_id: str) -> None:
    """Turn an HTTP error status into a retry (5xx, 408, 429, 416) or a final CaseDataError."""
    if exc.code >= 500 or exc.code in RETRY_HTTP:
        raise _Retry(f"HTTP {exc.code} {exc.reason}") from exc
    if exc.code == 416:  # our Range is past the end: the partial file is stale
        part.unlink(missing_ok=True)
        raise _Retry("HTTP 416 (range not satisfiable); restarting from zero") from exc
    part.unlink(missing_ok=True)
    raise CaseDataError(case_id, url, f"HTTP {exc.code} {exc.reason}: download refused") from exc


def _receive(resp: http.client.HTTPResponse, part: Path, offset: int, case_id: str) -> None:
    """Write a response body into ``part`` (appending on 206); raise _Retry when it is short."""
    if resp.status == 206:
        start, total = _content_range(resp.headers.get("Content-Range"))
        if start != offset:
            part.unlink(missing_ok=True)
            raise _Retry(f"server resumed at byte {start}, not {offset}; restarting from zero")
        mode = "ab"
    else:
        if offset:
            log.info("%s: server ignored the Range request; restarting from zero", case_id)
        offset, mode, total = 0, "wb", None
    length = _int_or_none(resp.headers.get("Content-Length"))
    total = total if total is not None else (offset + length if length is not None else None)
    received = _copy(resp, part, mode, offset, total, case_id)
    if length is not None and received < length:
        raise _Retry(f"incomplete read: {offset + received} of {offset + length} bytes")


def _copy(resp, part: Path, mode: str, offset: int, total: int | None, case_id: str) -> int:
    """Stream the body in 1 MiB chunks with a progress bar; return the bytes written."""
    received = 0
    bar = tqdm(
        total=total,
        initial=offset,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"{case_id} {part.name.removesuffix('.part')}",
        file=_LogStream(),
        mininterval=10.0,
        ascii=True,
    )
    try:
        with bar, open(part, mode) as fh:
            while chunk := resp.read(CHUNK):
                fh.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    except OSError as exc:
        if isinstance(exc, (ConnectionError, TimeoutError)) or exc.errno is None:
            raise  # a network problem: retried by the caller
        # disk full, quota, read-only: name the file; the .part stays for a resume once there is room
        raise OutputWriteError(
            part.with_name(part.name.removesuffix(".part")), exc, f"downloading into {part.name}"
        ) from exc
    return received


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


def _content_range(value: str | None) -> tuple[int, int | None]:
    """(first byte, total size or None) of a Content-Range header; raise _Retry when malformed."""
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        raise _Retry(f"206 response with a malformed Content-Range {value!r}")
    total = match.group(3)
    return int(match.group(1)), None if total == "*" else int(total)


def _int_or_none(value: str | None) -> int | None:
    """An integer header value, or None when absent or malformed."""
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _verify_and_place(url: str, dest: Path, case_id: str, check: Callable[[Path], None] | None) -> None:
    """Read the staged file with ``check`` (default: :func:`kidney_seg.volume.read_image`); then rename into place."""
    staged = _verify_path(dest)
    os.replace(partial_path(dest), staged)
    try:
        if check is None:
            read_image(staged, case_id)
        else:
            check(staged)
    except ValueError as exc:  # CaseDataError included
        staged.unlink(missing_ok=True)
        raise CaseDataError(case_id, url, f"downloaded file failed its check: {_reason(exc, staged)}") from exc
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    os.replace(staged, dest)


def _reason(exc: ValueError, staged: Path) -> str:
    """The reason of a failed check, naming the other file involved when there is one."""
    if not isinstance(exc, CaseDataError):
        return str(exc)
    return exc.reason if exc.path == str(staged) else f"{exc.reason} ({exc.path})"
