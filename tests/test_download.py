"""The downloader against a real HTTP server on 127.0.0.1 with scripted failures.

The server speaks plain http, so every download here passes ``allow_http=True`` (the
``dataset.allow_http`` override for a loopback test server); the https-only rules
themselves are tested in tests/test_security.py.
"""

import gzip
import re
import socket

import nibabel as nib
import numpy as np
import pytest

from kidney_seg.data.kits import download, partial_path
from kidney_seg.data.sources import fetch_image, fetch_label
from kidney_seg.errors import CaseDataError
from tests.conftest import kits_affine

pytestmark = pytest.mark.timeout(60)


def nifti_gz(array: np.ndarray, affine: np.ndarray | None = None) -> bytes:
    """The bytes of a gzip NIfTI file (large enough to span several reads)."""
    img = nib.Nifti1Image(array, kits_affine() if affine is None else affine)
    img.set_qform(img.affine, 1)
    img.set_sform(img.affine, 1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def noisy_image(shape=(4, 32, 32), seed=0) -> np.ndarray:
    """Incompressible int16 data, so the gzip file is tens of kB."""
    return np.random.default_rng(seed).integers(-1000, 1000, shape, dtype=np.int16)


def _leftovers(folder):
    """Partial or staging files left in a folder."""
    return [p.name for p in folder.iterdir() if p.name.endswith(".part") or p.name.startswith(".")]


def test_normal_download(server, tmp_path):
    base, h = server
    h.files["/img/case_00001.nii.gz"] = data = nifti_gz(noisy_image())
    dest = tmp_path / "case_00001" / "imaging.nii.gz"
    download(f"{base}/img/case_00001.nii.gz", dest, "case_00001", backoff=0.01, allow_http=True)
    assert dest.read_bytes() == data
    assert _leftovers(dest.parent) == []
    assert h.requests == [("/img/case_00001.nii.gz", None)]


def test_cut_connection_resumes_with_range(server, tmp_path):
    base, h = server
    h.files["/f.nii.gz"] = data = nifti_gz(noisy_image())
    h.scripts["/f.nii.gz"] = ["cut"]
    dest = tmp_path / "imaging.nii.gz"
    download(f"{base}/f.nii.gz", dest, "case_00002", backoff=0.01, allow_http=True)
    assert dest.read_bytes() == data and _leftovers(tmp_path) == []
    assert len(h.requests) == 2 and h.requests[0][1] is None
    offset = int(re.fullmatch(r"bytes=(\d+)-", h.requests[1][1]).group(1))
    assert 0 < offset < len(data)


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    base, h = server
    h.files["/f.nii.gz"] = data = nifti_gz(noisy_image())
    h.scripts["/f.nii.gz"] = ["cut", "ignore_range"]
    dest = tmp_path / "imaging.nii.gz"
    download(f"{base}/f.nii.gz", dest, "case_00002", backoff=0.01, allow_http=True)
    assert dest.read_bytes() == data
    assert h.requests[1][1] is not None  # asked to resume, got the whole file


def test_stale_partial_file_is_resumed(server, tmp_path):
    base, h = server
    h.files["/f.nii.gz"] = data = nifti_gz(noisy_image())
    dest = tmp_path / "imaging.nii.gz"
    partial_path(dest).write_bytes(data[:1000])
    download(f"{base}/f.nii.gz", dest, "case_00004", backoff=0.01, allow_http=True)
    assert dest.read_bytes() == data
    assert h.requests == [("/f.nii.gz", "bytes=1000-")]


def test_404_names_case_and_url(server, tmp_path):
    base, h = server
    url = f"{base}/img/case_00003.nii.gz"
    dest = tmp_path / "imaging.nii.gz"
    with pytest.raises(CaseDataError, match="HTTP 404") as err:
        download(url, dest, "case_00003", backoff=0.01, allow_http=True)
    assert "case_00003" in str(err.value) and url in str(err.value)
    assert not dest.exists() and _leftovers(tmp_path) == []
    assert len(h.requests) == 1  # not retried


def test_500_then_success_is_retried(server, tmp_path):
    base, h = server
    h.files["/f.nii.gz"] = data = nifti_gz(noisy_image())
    h.scripts["/f.nii.gz"] = ["500"]
    dest = tmp_path / "imaging.nii.gz"
    download(f"{base}/f.nii.gz", dest, "case_00005", backoff=0.01, allow_http=True)
    assert dest.read_bytes() == data and len(h.requests) == 2


def test_persistent_500_gives_up_after_retries(server, tmp_path):
    base, h = server
    h.files["/f.nii.gz"] = nifti_gz(noisy_image())
    h.scripts["/f.nii.gz"] = ["503"] * 10
    with pytest.raises(CaseDataError, match=r"case_00006.*after 2 retries.*HTTP 503"):
        download(
            f"{base}/f.nii.gz", tmp_path / "imaging.nii.gz", "case_00006", retries=2, backoff=0.01, allow_http=True
        )
    assert len(h.requests) == 3 and not (tmp_path / "imaging.nii.gz").exists()


def test_unreachable_server_retries_then_fails(tmp_path):
    with pytest.raises(CaseDataError, match=r"case_00008.*127\.0\.0\.1:9.*after 1 retries"):
        download(
            "http://127.0.0.1:9/f.nii.gz",
            tmp_path / "x.nii.gz",
            "case_00008",
            retries=1,
            backoff=0.01,
            timeout=2,
            allow_http=True,
        )


@pytest.mark.parametrize(
    "body, reason",
    [
        (nifti_gz(noisy_image())[:-5000], "gzip"),  # truncated, with a matching Content-Length
        (gzip.compress(b"<html>not a NIfTI file</html>" * 20, mtime=0), "NIfTI"),
        (b"<html>an error page served with 200</html>", "gzip"),
    ],
)
def test_corrupt_files_are_rejected(server, tmp_path, body, reason):
    base, h = server
    h.files["/bad.nii.gz"] = body
    url = f"{base}/bad.nii.gz"
    dest = tmp_path / "imaging.nii.gz"
    with pytest.raises(CaseDataError, match=reason) as err:
        download(url, dest, "case_00007", backoff=0.01, allow_http=True)
    assert "case_00007" in str(err.value) and url in str(err.value)
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_check_callable_failure_leaves_nothing(server, tmp_path):
    base, h = server
    h.files["/f.nii.gz"] = nifti_gz(noisy_image())

    def check(path):
        raise CaseDataError("case_00001", path, "custom check failed")

    with pytest.raises(CaseDataError, match="custom check failed"):
        download(f"{base}/f.nii.gz", tmp_path / "imaging.nii.gz", "case_00001", check=check, allow_http=True)
    assert list(tmp_path.iterdir()) == []


def test_second_run_downloads_nothing(server, tmp_path):
    base, h = server
    h.files["/f.nii.gz"] = nifti_gz(noisy_image())
    dest = tmp_path / "imaging.nii.gz"
    download(f"{base}/f.nii.gz", dest, "case_00001", backoff=0.01, allow_http=True)
    n = len(h.requests)
    download(f"{base}/f.nii.gz", dest, "case_00001", backoff=0.01, allow_http=True)
    assert len(h.requests) == n == 1


def test_non_http_scheme_is_refused(tmp_path):
    with pytest.raises(CaseDataError, match="scheme"):
        download("file:///etc/hostname", tmp_path / "x.nii.gz", "case_00001")


# ----------------------------------------------------------------------------- through the sources API


def _kits19(base, tmp_path):
    return {
        "source": "kits19",
        "root": str(tmp_path),
        "kits_imaging_url": f"{base}/img",
        "kits_labels_url": f"{base}/lab",
    }


def _serve_case(h, case, image, label):
    h.files[f"/img/{case}.nii.gz"] = nifti_gz(image)
    h.files[f"/lab/{case}/segmentation.nii.gz"] = nifti_gz(label)


def test_fetch_image_and_label_from_configured_urls(server, tmp_path):
    base, h = server
    cfg = _kits19(base, tmp_path)
    image = noisy_image()
    label = np.zeros(image.shape, np.uint8)
    label[1:3, 5:9, 5:9] = 1
    label[2, 6, 6] = 2
    _serve_case(h, "case_00012", image, label)
    img_out, lab_out = tmp_path / "case_00012" / "imaging.nii.gz", tmp_path / "case_00012" / "segmentation.nii.gz"
    fetch_image("case_00012", cfg, 0, str(img_out), allow_http=True)
    fetch_label("case_00012", cfg, 0, str(lab_out), allow_http=True)
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(img_out)).dataobj), image)
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(lab_out)).dataobj), label)
    assert sorted(p.name for p in img_out.parent.iterdir()) == ["imaging.nii.gz", "segmentation.nii.gz"]
    fetch_label("case_00012", cfg, 0, str(lab_out), allow_http=True)  # already there: no request
    assert [p for p, _ in h.requests] == ["/img/case_00012.nii.gz", "/lab/case_00012/segmentation.nii.gz"]


def test_fetch_label_grid_mismatch_leaves_no_label(server, tmp_path):
    base, h = server
    cfg = _kits19(base, tmp_path)
    _serve_case(h, "case_00013", noisy_image((4, 32, 32)), np.zeros((4, 32, 31), np.uint8))
    folder = tmp_path / "case_00013"
    fetch_image("case_00013", cfg, 0, str(folder / "imaging.nii.gz"), allow_http=True)
    with pytest.raises(CaseDataError, match=r"case_00013.*/lab/case_00013/segmentation\.nii\.gz.*grid mismatch"):
        fetch_label("case_00013", cfg, 0, str(folder / "segmentation.nii.gz"), allow_http=True)
    assert sorted(p.name for p in folder.iterdir()) == ["imaging.nii.gz"]


def test_fetch_image_affine_mismatch_with_existing_label(server, tmp_path):
    base, h = server
    cfg = _kits19(base, tmp_path)
    h.files["/img/case_00014.nii.gz"] = nifti_gz(noisy_image(), kits_affine((2.0, 0.8, 0.8)))
    h.files["/lab/case_00014/segmentation.nii.gz"] = nifti_gz(np.zeros((4, 32, 32), np.uint8))
    folder = tmp_path / "case_00014"
    fetch_label("case_00014", cfg, 0, str(folder / "segmentation.nii.gz"), allow_http=True)
    with pytest.raises(CaseDataError, match=r"case_00014.*/img/case_00014\.nii\.gz.*affine"):
        fetch_image("case_00014", cfg, 0, str(folder / "imaging.nii.gz"), allow_http=True)
    assert sorted(p.name for p in folder.iterdir()) == ["segmentation.nii.gz"]


def test_fetch_label_rejects_values_outside_the_source_labels(server, tmp_path):
    base, h = server
    cfg = _kits19(base, tmp_path)
    label = np.zeros((4, 32, 32), np.uint8)
    label[0, 0, 0] = 3  # a cyst label is not valid in KiTS19
    _serve_case(h, "case_00015", noisy_image(), label)
    with pytest.raises(CaseDataError, match=r"case_00015.*unexpected label values \[3\]"):
        fetch_label("case_00015", cfg, 0, str(tmp_path / "case_00015" / "segmentation.nii.gz"), allow_http=True)
    assert not (tmp_path / "case_00015").exists() or list((tmp_path / "case_00015").iterdir()) == []
    k23 = {**cfg, "source": "kits23", "root": str(tmp_path / "k23")}
    fetch_label("case_00015", k23, 0, str(tmp_path / "k23" / "case_00015" / "segmentation.nii.gz"), allow_http=True)


def test_progress_is_logged(server, tmp_path, caplog):
    base, h = server
    h.files["/f.nii.gz"] = nifti_gz(noisy_image())
    with caplog.at_level("INFO", logger="kidney_seg.data.kits"):
        download(f"{base}/f.nii.gz", tmp_path / "a.nii.gz", "case_00001", allow_http=True)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("case_00001" in r.getMessage() and "B/" in r.getMessage() for r in caplog.records)  # progress bar lines


# ----------------------------------------------------------------------------- security: https only, fixed destinations


@pytest.fixture
def no_remote_connections(monkeypatch):
    """Fail the test on any name lookup or connection to a host that is not loopback."""
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"attempted to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_http_is_refused_without_the_override(server, tmp_path):
    base, h = server
    h.files["/f.nii.gz"] = nifti_gz(noisy_image())
    url, dest = f"{base}/f.nii.gz", tmp_path / "case_00001" / "imaging.nii.gz"
    with pytest.raises(CaseDataError, match="plain http refused.*https") as err:
        download(url, dest, "case_00001")
    assert "case_00001" in str(err.value) and url in str(err.value)
    assert h.requests == [] and not dest.parent.exists()


def test_http_is_refused_through_the_sources_api_without_the_override(server, tmp_path):
    base, h = server
    _serve_case(h, "case_00012", noisy_image(), np.zeros((4, 32, 32), np.uint8))
    cfg = _kits19(base, tmp_path)
    with pytest.raises(
        CaseDataError, match=rf"case_00012.*{re.escape(base)}/img/case_00012\.nii\.gz.*plain http refused"
    ):
        fetch_image("case_00012", cfg, 0, str(tmp_path / "case_00012" / "imaging.nii.gz"))
    with pytest.raises(CaseDataError, match=r"case_00012.*/lab/case_00012/segmentation\.nii\.gz.*plain http refused"):
        fetch_label("case_00012", cfg, 0, str(tmp_path / "case_00012" / "segmentation.nii.gz"))
    assert h.requests == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/case_00001.nii.gz",
        "http://127.0.0.2/case_00001.nii.gz",
        "http://127.0.0.1.nip.io/case_00001.nii.gz",
        "http://localhost.example.com/case_00001.nii.gz",
        "http://127.0.0.1@example.com/case_00001.nii.gz",  # user info: the host is example.com
        "http://[::2]/case_00001.nii.gz",
    ],
)
def test_http_to_a_non_loopback_host_is_refused_even_with_the_override(tmp_path, no_remote_connections, url):
    with pytest.raises(CaseDataError, match="only to a loopback host") as err:
        download(url, tmp_path / "imaging.nii.gz", "case_00001", allow_http=True, retries=0)
    assert "case_00001" in str(err.value) and url in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "url", ["file:///etc/hostname", "ftp://127.0.0.1/f.nii.gz", "data:,hello", "//127.0.0.1/f.nii.gz"]
)
def test_other_schemes_are_refused_even_with_the_override(tmp_path, url):
    with pytest.raises(CaseDataError, match="scheme"):
        download(url, tmp_path / "x.nii.gz", "case_00001", allow_http=True)


def test_redirect_to_a_non_loopback_http_host_is_refused_before_connecting(server, tmp_path, no_remote_connections):
    base, h = server
    target = "http://example.invalid/case_00001.nii.gz"
    h.scripts["/f.nii.gz"] = [f"redirect:{target}"]
    url, dest = f"{base}/f.nii.gz", tmp_path / "imaging.nii.gz"
    with pytest.raises(
        CaseDataError, match=r"redirected to http://example\.invalid/case_00001\.nii\.gz: plain http.*loopback"
    ) as err:
        download(url, dest, "case_00001", allow_http=True, backoff=0.01)
    assert "case_00001" in str(err.value) and url in str(err.value)
    assert [p for p, _ in h.requests] == ["/f.nii.gz"]  # refused at once, not retried
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("location", ["file:///etc/hostname", "ftp://127.0.0.1/f.nii.gz"])
def test_redirect_to_another_scheme_is_refused(server, tmp_path, location):
    base, h = server
    h.scripts["/f.nii.gz"] = [f"redirect:{location}"]
    with pytest.raises(CaseDataError, match=r"case_00001.*/f\.nii\.gz"):
        download(f"{base}/f.nii.gz", tmp_path / "imaging.nii.gz", "case_00001", allow_http=True, backoff=0.01)
    assert len(h.requests) == 1 and list(tmp_path.iterdir()) == []


def test_redirect_within_the_loopback_server_is_followed(server, tmp_path):
    base, h = server
    h.files["/real/other-name.nii.gz"] = data = nifti_gz(noisy_image())
    h.scripts["/f.nii.gz"] = ["redirect:/real/other-name.nii.gz"]
    dest = tmp_path / "imaging.nii.gz"
    download(f"{base}/f.nii.gz", dest, "case_00001", allow_http=True, backoff=0.01)
    assert dest.read_bytes() == data and [p.name for p in tmp_path.iterdir()] == ["imaging.nii.gz"]
    assert [p for p, _ in h.requests] == ["/f.nii.gz", "/real/other-name.nii.gz"]


def test_server_names_do_not_change_where_the_file_lands(server, tmp_path):
    """A Content-Disposition with ../ and a redirect to another file name leave the local path alone."""
    base, h = server
    root = tmp_path / "deep" / "root"
    cfg = {**_kits19(base, root), "root": str(root)}
    h.files["/img/../../escaped/case_00099.nii.gz"] = b"never served"
    h.files["/real/escaped.nii.gz"] = data = nifti_gz(noisy_image())
    h.scripts["/img/case_00012.nii.gz"] = ["redirect:/real/escaped.nii.gz"]
    h.scripts["/real/escaped.nii.gz"] = ["disposition"]
    fetch_image("case_00012", cfg, 0, str(root / "case_00012" / "imaging.nii.gz"), allow_http=True)
    assert (root / "case_00012" / "imaging.nii.gz").read_bytes() == data
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "deep/root/case_00012/imaging.nii.gz"
    ]
    assert [p for p, _ in h.requests] == ["/img/case_00012.nii.gz", "/real/escaped.nii.gz"]


@pytest.mark.parametrize("case_id", ["../../x", "case_00001/../../x", "/etc/passwd", "case_0000\u0661", "case_00001\n"])
def test_invalid_case_ids_are_refused_before_any_request(server, tmp_path, case_id):
    base, h = server
    h.files["/f.nii.gz"] = nifti_gz(noisy_image())
    with pytest.raises(CaseDataError, match="invalid case id"):
        download(f"{base}/f.nii.gz", tmp_path / "imaging.nii.gz", case_id, allow_http=True)
    cfg = _kits19(base, tmp_path / "root")
    for fetch, name in [(fetch_image, "imaging.nii.gz"), (fetch_label, "segmentation.nii.gz")]:
        with pytest.raises(CaseDataError, match="invalid case id"):
            fetch(case_id, cfg, 0, str(tmp_path / "root" / case_id / name), allow_http=True)
    assert h.requests == [] and list(tmp_path.iterdir()) == []


def test_download_destination_is_the_case_folder_under_the_root(server, tmp_path):
    base, h = server
    _serve_case(h, "case_00012", noisy_image(), np.zeros((4, 32, 32), np.uint8))
    cfg = _kits19(base, tmp_path / "root")
    for out in [
        tmp_path / "elsewhere.nii.gz",
        tmp_path / "root" / "case_00013" / "imaging.nii.gz",
        tmp_path / "root" / "case_00012" / "segmentation.nii.gz",
        tmp_path / "case_00012" / "imaging.nii.gz",
    ]:
        with pytest.raises(
            CaseDataError, match=r"case_00012.*can only be written to .*root/case_00012/imaging\.nii\.gz"
        ):
            fetch_image("case_00012", cfg, 0, str(out), allow_http=True)
    assert h.requests == [] and list(tmp_path.iterdir()) == []


def test_case_folder_symlink_leading_out_of_the_root_is_refused(server, tmp_path):
    base, h = server
    _serve_case(h, "case_00012", noisy_image(), np.zeros((4, 32, 32), np.uint8))
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "case_00012").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CaseDataError, match=r"case_00012.*outside the dataset root"):
        fetch_image("case_00012", _kits19(base, root), 0, str(root / "case_00012" / "imaging.nii.gz"), allow_http=True)
    assert h.requests == [] and list(outside.iterdir()) == []


def test_relative_root_and_a_storage_prefix_are_accepted(server, tmp_path, monkeypatch):
    base, h = server
    _serve_case(h, "case_00012", noisy_image(), np.zeros((4, 32, 32), np.uint8))
    monkeypatch.chdir(tmp_path)
    cfg = {**_kits19(base, tmp_path), "root": "data/kits19"}
    fetch_image("case_00012", cfg, 0, "data/kits19/case_00012/imaging.nii.gz", allow_http=True)
    prefixed = tmp_path / ".snakemake" / "storage" / "fs" / "data" / "kits19" / "case_00012" / "segmentation.nii.gz"
    fetch_label("case_00012", cfg, 0, str(prefixed), allow_http=True)
    assert (tmp_path / "data" / "kits19" / "case_00012" / "imaging.nii.gz").is_file() and prefixed.is_file()
