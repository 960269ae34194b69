"""Security basics: https-only downloads, no pickle, Keras safe mode, no path escaping a data or results folder.

Downloads against a live (loopback) server, Content-Disposition and the download
destination are tested in tests/test_download.py; manifest and folder containment in
tests/test_local.py. This file holds the checks that need no server, and the static
scans of the library's source.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from kidney_seg.data import kits
from kidney_seg.data.sources import Case, fetch_image, fetch_label, list_cases, select
from kidney_seg.errors import CaseDataError
from tests.conftest import REPO, dotted_name, kits_affine, write_nifti

LIBRARY = REPO / "kidney_seg"
PHANTOM = {"n_cases": 3, "field_of_view_mm": [120, 125], "z_extent_mm": [80, 85], "slice_spacing_mm": [4.0, 5.0]}
PATH_LIKE_IDS = [
    "../../x",
    "case_00001/../../x",
    "/etc/passwd",
    "..",
    "case_00001/",
    "case_0000\u0661",
    "case_00001\n",
    "",
]


# ----------------------------------------------------------------------------- 1. https only


@pytest.mark.parametrize(
    "url, allow_http, problem",
    [
        ("https://huggingface.co/x/case_00001.nii.gz", False, None),
        ("HTTPS://Example.org/x", False, None),
        ("https://127.0.0.1:8443/x", False, None),
        ("http://127.0.0.1:8000/x", True, None),
        ("http://localhost/x", True, None),
        ("http://[::1]:8000/x", True, None),
        ("http://127.0.0.1:8000/x", False, "plain http refused"),
        ("http://example.com/x", False, "plain http refused"),
        ("http://example.com/x", True, "only to a loopback host"),
        ("http://127.0.0.1.example.com/x", True, "only to a loopback host"),
        ("http://127.0.0.1@example.com/x", True, "only to a loopback host"),
        ("http://10.0.0.1/x", True, "only to a loopback host"),
        ("file:///etc/passwd", True, "scheme 'file'"),
        ("ftp://127.0.0.1/x", True, "scheme 'ftp'"),
        ("127.0.0.1/x", True, "scheme ''"),
        ("https:///x", False, "without a host"),
    ],
)
def test_url_policy(url, allow_http, problem):
    found = kits.url_problem(url, allow_http)
    if problem is None:
        assert found is None
        kits.check_url(url, "case_00001", allow_http)
    else:
        assert problem in found
        with pytest.raises(CaseDataError, match=re.escape(problem)) as err:
            kits.check_url(url, "case_00001", allow_http)
        assert "case_00001" in str(err.value) and url in str(err.value)


@pytest.mark.parametrize(
    "source, target, allow_http, refused",
    [
        ("https://a.example/x", "https://cdn.example/y", False, None),
        ("https://a.example/x", "http://cdn.example/y", False, "plain http refused"),
        ("https://a.example/x", "http://cdn.example/y", True, "only to a loopback host"),
        ("https://a.example/x", "http://127.0.0.1/y", True, "redirect from https to plain http refused"),
        ("https://127.0.0.1/x", "http://localhost/y", True, "redirect from https to plain http refused"),
        ("http://127.0.0.1/x", "http://localhost:8000/y", True, None),
        ("http://127.0.0.1/x", "https://cdn.example/y", True, None),
        ("http://127.0.0.1/x", "http://example.invalid/y", True, "only to a loopback host"),
        ("https://a.example/x", "file:///etc/passwd", True, "scheme 'file'"),
    ],
)
def test_redirect_policy(source, target, allow_http, refused):
    if refused is None:
        kits.check_redirect(source, target, "case_00001", allow_http)
        return
    with pytest.raises(CaseDataError, match=re.escape(refused)) as err:
        kits.check_redirect(source, target, "case_00001", allow_http)
    assert "case_00001" in str(err.value) and source in str(err.value) and f"redirected to {target}" in str(err.value)


def test_the_downloaders_redirect_handler_checks_every_redirect():
    opener = kits._opener("case_00001", allow_http=True)
    redirects = [h for h in opener.handlers if isinstance(h, urllib.request.HTTPRedirectHandler)]
    assert len(redirects) == 1 and isinstance(redirects[0], kits._SafeRedirects)  # urllib's own handler replaced
    handler = redirects[0]
    fp = io.BytesIO(b"")
    request = urllib.request.Request("https://a.example/case_00001.nii.gz")
    with pytest.raises(
        CaseDataError, match=r"case_00001.*https://a\.example.*redirected to http://127\.0\.0\.1/y.*https to plain http"
    ):
        handler.redirect_request(request, fp, 302, "Found", {}, "http://127.0.0.1/y")
    assert fp.closed
    followed = handler.redirect_request(request, io.BytesIO(b""), 302, "Found", {}, "https://cdn.example/y")
    assert followed.full_url == "https://cdn.example/y"


def test_default_urls_of_every_source_are_https():
    for name in kits.SOURCES:
        for url in (kits.image_url("case_00001", {"source": name}), kits.label_url("case_00001", {"source": name})):
            assert kits.url_problem(url) is None, url
            assert url.startswith("https://"), url


def test_allow_http_is_read_from_the_config_not_a_param():
    """Toggling dataset.allow_http must not rerun (re-download) anything: no rule param, not in DOWNLOAD_SETTINGS."""
    rule = (REPO / "rules" / "download.smk").read_text()
    params = re.findall(r"params:\n((?:\s+\w+=.*\n)+)", rule)
    assert params and all("allow_http" not in p for p in params)
    fetch_keys = re.search(r"^DOWNLOAD_SETTINGS = .*$", (REPO / "rules" / "common.smk").read_text(), flags=re.M).group(
        0
    )
    assert "allow_http" not in fetch_keys
    script = (REPO / "workflow_scripts" / "download.py").read_text()
    assert 'snakemake.config["dataset"]["allow_http"]' in script and "allow_http=allow_http" in script


# ----------------------------------------------------------------------------- 2. no pickle


class _Payload:
    """An object whose unpickling would create a folder: proof that pickle code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _pickled_npy(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    return path


@pytest.mark.parametrize("mmap", [True, False])
def test_load_npy_refuses_a_pickled_array(tmp_path, mmap):
    from kidney_seg.atomic import load_npy

    marker = tmp_path / "pwned"
    path = _pickled_npy(tmp_path / "image.npy", marker)
    with pytest.raises(ValueError, match=r"(?i)pickle|python objects|object arrays|object dtype") as info:
        load_npy(path, mmap=mmap)
    assert str(path) in str(info.value)  # the error names the file
    assert not marker.exists()


def test_training_loader_refuses_a_pickled_slice_cache(tmp_path):
    from kidney_seg.sampling import load_case

    case_dir, marker = tmp_path / "preprocessed" / "case_00001", tmp_path / "pwned"
    case_dir.mkdir(parents=True)
    (case_dir / "meta.json").write_text(json.dumps({"case_id": "case_00001", "slices": {"foreground": [0]}}))
    np.save(case_dir / "label.npy", np.zeros((1, 4, 4), np.uint8), allow_pickle=False)
    _pickled_npy(case_dir / "image.npy", marker)
    with pytest.raises(ValueError, match=r"(?i)pickle|python objects|object arrays|object dtype"):
        load_case(case_dir)
    assert not marker.exists()
    np.save(
        case_dir / "image.npy", np.zeros((1, 4, 4), np.float32), allow_pickle=False
    )  # the same folder, without pickle, loads
    assert load_case(case_dir).image.shape == (1, 4, 4)


def _library_calls():
    """(file, call node, dotted callee name, names imported from numpy/keras) for every call in kidney_seg."""
    for path in sorted(LIBRARY.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        imported = {}  # local name -> module it came from, for `from X import name [as local]`
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                yield path, node, dotted_name(node.func), imported


def _keyword(call: ast.Call, name: str):
    """The constant value of a keyword argument, or a sentinel when absent or not a constant."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<not a constant>"
    return "<absent>"


def test_every_np_load_in_the_library_passes_allow_pickle_false():
    found, bad = [], []
    for path, call, name, imported in _library_calls():
        if name in ("np.load", "numpy.load") or imported.get(name) == "numpy.load":
            found.append(f"{path.name}:{call.lineno}")
            if _keyword(call, "allow_pickle") is not False:
                bad.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert found, "expected at least kidney_seg/atomic.py's load_npy"
    assert not bad, f"np.load without allow_pickle=False: {bad}"


def test_no_pickle_in_the_library():
    for path in LIBRARY.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve"} & {
                    str(n).split(".")[0] for n in names
                }, f"{path.relative_to(REPO)}:{node.lineno}"


# ----------------------------------------------------------------------------- 3. Keras safe mode


@pytest.fixture(scope="module")
def lambda_model(tmp_path_factory) -> Path:
    """A tiny saved model with a Lambda layer (arbitrary Python code in the file)."""
    import keras

    from kidney_seg.plan import write_plan
    from tests.test_inference import fake_plan

    inputs = keras.Input((8, 8, 1))
    outputs = keras.layers.Lambda(lambda x: x * 2.0, name="code")(keras.layers.Conv2D(2, 1)(inputs))
    folder = tmp_path_factory.mktemp("lambda_model")
    keras.Model(inputs, outputs).save(folder / "model.keras")
    write_plan(
        fake_plan({"target_spacing": [3.0, 1.5, 1.5], "clip": [-100, 300]}, patch_size=[8, 8]),
        folder / "inference.json",
    )  # a valid plan: only the model's Lambda layer is wrong
    return folder


def test_load_model_refuses_a_lambda_layer(lambda_model):
    import keras

    from kidney_seg.model import load_model

    with pytest.raises(ValueError, match=r"(?i)lambda.*safe_mode|safe_mode.*lambda"):
        load_model(lambda_model / "model.keras")
    with pytest.raises(ValueError, match="safe_mode"):
        load_model(lambda_model / "model.keras", compile=False)
    # the file itself is fine: only safe mode stops it (loading it unsafely runs its code)
    assert keras.models.load_model(lambda_model / "model.keras", safe_mode=False).get_layer("code") is not None


def test_load_predictor_refuses_a_lambda_layer(lambda_model):
    from kidney_seg.inference import load_predictor

    with pytest.raises(ValueError, match="safe_mode"):
        load_predictor(lambda_model)
    with pytest.raises(ValueError, match="safe_mode"):
        load_predictor([lambda_model])


def test_every_keras_load_model_call_passes_safe_mode_true():
    found, bad = [], []
    for path, call, name, imported in _library_calls():
        keras_call = (name.endswith(".load_model") and name.split(".")[0] in ("keras", "tf", "tensorflow")) or (
            imported.get(name, "").startswith(("keras", "tensorflow")) and name.endswith("load_model")
        )
        if keras_call:
            found.append(f"{path.name}:{call.lineno}")
            if _keyword(call, "safe_mode") is not True:
                bad.append(f"{path.relative_to(REPO)}:{call.lineno} ({name})")
    assert found, "expected at least kidney_seg/model.py's load_model"
    assert not bad, f"keras load_model without safe_mode=True: {bad}"


def test_the_library_never_turns_safe_mode_off():
    for path in LIBRARY.rglob("*.py"):
        text = path.read_text()
        assert "enable_unsafe_deserialization" not in text and "safe_mode=False" not in text, path


# ----------------------------------------------------------------------------- 4. no path escapes


def _configs(tmp_path) -> dict[str, dict]:
    """A config of every source; the local one with two real cases."""
    root = tmp_path / "local"
    for case in ("case_00000", "case_00001"):
        write_nifti(root / case / "imaging.nii.gz", np.zeros((2, 3, 4), np.int16), kits_affine())
        write_nifti(root / case / "segmentation.nii.gz", np.zeros((2, 3, 4), np.uint8), kits_affine())
    configs = {name: {"source": name, "root": str(tmp_path / name)} for name in kits.SOURCES}
    configs["phantom"] = {"source": "phantom", "root": str(tmp_path / "phantom"), "phantom": PHANTOM}
    configs["local"] = {"source": "local", "root": str(root)}
    return configs


def test_case_ids_of_every_source_are_plain_case_ids(tmp_path):
    for name, cfg in _configs(tmp_path).items():
        cases = list_cases(cfg)
        assert cases and all(kits.is_case_id(c.case_id) for c in cases), name
        assert all(Path(c.image).parent.name == c.case_id for c in cases), name


@pytest.mark.parametrize("case_id", PATH_LIKE_IDS)
def test_path_like_case_ids_are_refused_by_the_selection_of_every_source(tmp_path, case_id):
    """No case id with path characters can reach {results_dir}/.../{case}: select refuses it for every source."""
    for cfg in _configs(tmp_path).values():
        cases = list_cases(cfg)
        with pytest.raises(ValueError, match=r"dataset\.cases names invalid case ids"):
            select(cases, {**cfg, "cases": ["case_00000", case_id]})
        with pytest.raises(ValueError, match=r"dataset\.unlabelled_cases names invalid case ids"):
            select(cases, {**cfg, "unlabelled_cases": [case_id]})
        with pytest.raises(CaseDataError, match="invalid case id"):
            select(cases + [Case(case_id, "x.nii.gz", "y.nii.gz")], cfg)


@pytest.mark.parametrize("case_id", PATH_LIKE_IDS)
def test_path_like_case_ids_are_refused_by_fetching_for_every_source(tmp_path, case_id):
    for cfg in _configs(tmp_path).values():
        for fetch, file in [(fetch_image, "imaging.nii.gz"), (fetch_label, "segmentation.nii.gz")]:
            out = os.path.join(cfg["root"], case_id, file)
            with pytest.raises(CaseDataError, match="invalid case id"):
                fetch(case_id, {**cfg, "kits_imaging_url": "https://127.0.0.1:9/x"}, 0, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local"]  # nothing written anywhere else


def test_the_case_id_pattern_agrees_with_the_workflow_wildcard_constraint():
    common = (REPO / "rules" / "common.smk").read_text()
    constraint = re.search(r'^\s*case=r"([^"]+)"', common, flags=re.M).group(1)
    for good in ("case_00000", "case_00588", "case_99999"):
        assert kits.is_case_id(good) and re.fullmatch(constraint, good)
    for bad in ("../../x", "case_0000", "case_000001", "case_0000a", "case_00001/x", "x/case_00001"):
        assert not kits.is_case_id(bad) and not re.fullmatch(constraint, bad)
    assert not kits.is_case_id("case_0000\u0661")  # stricter than \d, which matches any Unicode digit


def test_download_destination_is_computed_inside_the_root(tmp_path):
    cfg = {"source": "kits19", "root": str(tmp_path / "root")}
    assert kits.destination("case_00007", cfg, "imaging.nii.gz") == tmp_path / "root" / "case_00007" / "imaging.nii.gz"
    for bad in PATH_LIKE_IDS:
        with pytest.raises(CaseDataError, match="invalid case id"):
            kits.destination(bad, cfg, "imaging.nii.gz")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "case_00007").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(CaseDataError, match=r"case_00007.*outside the dataset root"):
        kits.destination("case_00007", cfg, "imaging.nii.gz")
