"""No half-written files (issue "Faults"): every writer is atomic, and a static audit keeps it so.

(a) Each library writer is run with its serialiser (``Path.write_text``, ``np.save``,
``nib.save``, ``DataFrame.to_csv``, ``Figure.savefig``, ``shutil.copyfile``, a model's
``save``) patched so that one call writes a few bytes to its destination and then fails
with ENOSPC, as a full disk would. Whatever the writer, the output being written must not
exist afterwards (or must still hold its previous complete content), no temporary file may
be left in the folder, and the error must name the output. Every output of a writer with
several outputs is a case of its own, once into an empty folder ("fresh") and once over
the outputs of an earlier successful run ("existing"). JSON writers serialise with
``json.dumps`` and write with ``Path.write_text``, so the failure is injected there.

(b) A static audit walks the library (and the thin Snakemake scripts) with :mod:`ast` and
fails on any call that writes a file outside a ``with atomic_path(...) as tmp`` block that
writes to ``tmp``; the few justified exceptions are listed, with reasons, in ALLOWED.
"""

from __future__ import annotations

import ast
import errno
import functools
import pathlib
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from kidney_seg.atomic import OutputWriteError
from tests.conftest import REPO, dotted_name, kits_affine, write_nifti

MARK = b"PARTIAL-WRITE-"  # what a failing serialiser leaves in the file it was writing


# ----------------------------------------------------------------------------- fault injection


def simulated_enospc() -> OSError:
    """The error a full disk gives."""
    return OSError(errno.ENOSPC, "No space left on device (simulated)")


def write_partial(dest) -> None:
    """Put a few bytes into ``dest`` (a path or an open file), as a serialiser cut short would."""
    if hasattr(dest, "write"):
        try:
            dest.write(MARK)
        except TypeError:  # a text-mode handle
            dest.write(MARK.decode())
        dest.flush()
        return
    with open(dest, "ab") as fh:
        fh.write(MARK)


class FakeModel:
    """Stands in for a Keras model in the checkpoint callbacks: ``save`` writes a small file."""

    class optimizer:  # noqa: N801 - the attribute a Keras model has
        learning_rate = 0.001

    def save(self, filepath, *args, **kwargs):  # a .keras file is a zip archive
        import zipfile

        with zipfile.ZipFile(filepath, "w") as archive:
            archive.writestr("config.json", '{"a complete": "model"}')


def _serialisers() -> dict[str, tuple[object, str, Callable]]:
    """Serialiser name -> (object holding it, attribute, function giving the destination from the call's arguments)."""
    import zipfile

    import matplotlib.figure

    return {
        "Path.write_text": (pathlib.Path, "write_text", lambda self, *a, **k: self),
        "Path.write_bytes": (pathlib.Path, "write_bytes", lambda self, *a, **k: self),
        "np.save": (np, "save", lambda file, *a, **k: file),
        "nib.save": (nib, "save", lambda img, filename, *a, **k: filename),
        "DataFrame.to_csv": (pd.DataFrame, "to_csv", lambda self, path_or_buf=None, *a, **k: path_or_buf),
        "Figure.savefig": (matplotlib.figure.Figure, "savefig", lambda self, fname, *a, **k: fname),
        "shutil.copyfile": (shutil, "copyfile", lambda src, dst, *a, **k: dst),
        "model.save": (FakeModel, "save", lambda self, filepath, *a, **k: filepath),
        "ZipFile.writestr": (zipfile.ZipFile, "writestr", lambda self, *a, **k: self.fp),
    }


class FailingSerialiser:
    """Patch serialiser ``name`` so that its ``nth`` call writes a few bytes to its destination, then raises."""

    def __init__(self, monkeypatch, name: str, nth: int = 1, make_error: Callable[[], OSError] = simulated_enospc):
        owner, attr, dest_of = _serialisers()[name]
        real = getattr(owner, attr)
        self.calls = 0
        self.raised: OSError | None = None
        self.dest = None

        @functools.wraps(real)
        def fake(*args, **kwargs):
            self.calls += 1
            if self.calls != nth:
                return real(*args, **kwargs)
            self.dest = dest_of(*args, **kwargs)
            write_partial(self.dest)
            self.raised = make_error()
            raise self.raised

        monkeypatch.setattr(owner, attr, fake)


# ----------------------------------------------------------------------------- the writers


def _label(shape=(6, 24, 24)) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[2:5, 6:14, 6:14] = 1
    label[3:4, 8:11, 8:11] = 2
    return label


def _case_files(root: Path, case_id: str = "case_00000") -> tuple[Path, Path]:
    """A small labelled case (image, label) on the KiTS grid."""
    label = _label()
    image = np.random.default_rng(0).normal(40, 20, label.shape).astype(np.int16) + 200 * (label > 0).astype(np.int16)
    img = write_nifti(root / case_id / "imaging.nii.gz", image, kits_affine())
    lab = write_nifti(root / case_id / "segmentation.nii.gz", label, kits_affine())
    return img, lab


def _history() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "epoch": [1, 2],
            "lr": [1e-3, 1e-3],
            "loss": [0.9, 0.7],
            "val_loss": [0.8, 0.6],
            "seconds": [1.0, 1.1],
            "val_dice_kidney": [0.2, 0.4],
            "val_dice_tumor": [0.1, 0.2],
        }
    )


@dataclass(frozen=True)
class Writer:
    """A library writer: ``setup(tmp_path)`` prepares its inputs and returns the call that writes.

    ``outputs``: (path relative to tmp_path, serialiser, which call of that serialiser
    writes it), in the order the writer writes them.
    """

    name: str
    setup: Callable[[Path], Callable[[], object]]
    outputs: tuple[tuple[str, str, int], ...]


def _setup_atomic_path(tmp):
    from kidney_seg.atomic import atomic_path

    def run():
        with atomic_path(tmp / "out" / "blob.bin") as t:
            t.write_bytes(b"complete content")

    return run


def _setup_write_text(tmp):
    from kidney_seg.atomic import write_text_atomic

    return lambda: write_text_atomic(tmp / "out" / "notes.txt", "complete text\n" * 50)


def _setup_write_json(tmp):
    from kidney_seg.atomic import write_json_atomic

    return lambda: write_json_atomic(tmp / "out" / "obj.json", {"a": list(range(100))})


def _setup_save_npy(tmp):
    from kidney_seg.atomic import save_npy_atomic

    return lambda: save_npy_atomic(tmp / "out" / "arr.npy", np.arange(1000, dtype=np.float32))


def _setup_save_nifti(tmp):
    from kidney_seg.volume import save_nifti

    return lambda: save_nifti(tmp / "out" / "vol.nii.gz", _label(), kits_affine())


def _setup_save_like(tmp):
    from kidney_seg.volume import save_like

    ref = write_nifti(tmp / "in" / "ref.nii.gz", np.zeros((6, 24, 24), np.int16), kits_affine())
    return lambda: save_like(tmp / "out" / "pred.nii.gz", _label(), ref)


def _setup_write_split(tmp):
    from kidney_seg.split import make_split, write_split

    df = make_split([f"case_{i:05d}" for i in range(10)])
    return lambda: write_split(df, tmp / "out" / "split.csv")


def _setup_evaluate_case(tmp):
    from kidney_seg.evaluation import evaluate_case

    _, lab = _case_files(tmp / "in")
    return lambda: evaluate_case("case_00000", lab, lab, tmp / "out" / "case_00000.json")


def _setup_summarize(tmp):
    from kidney_seg.evaluation import evaluate_case, summarize

    _, lab = _case_files(tmp / "in")
    jsons = [tmp / "in" / f"case_0000{i}.json" for i in range(2)]
    for i, j in enumerate(jsons):
        evaluate_case(f"case_0000{i}", lab, lab, j)
    return lambda: summarize(jsons, tmp / "out" / "per_case.csv", tmp / "out" / "summary.csv")


def _setup_decide(tmp):
    from kidney_seg.postprocessing import decide_from_files

    _, lab = _case_files(tmp / "in")
    return lambda: decide_from_files(
        ["case_00000"], [lab], [lab], {"enabled": True}, tmp / "out" / "postprocessing.json"
    )


def _setup_postprocess_file(tmp):
    from kidney_seg.postprocessing import decide_from_files, postprocess_file

    _, lab = _case_files(tmp / "in")
    decision = decide_from_files([], [], [], {"enabled": False}, tmp / "in" / "decision.json")
    return lambda: postprocess_file("case_00000", lab, tmp / "out" / "case_00000.nii.gz", decision)


def _setup_preprocess_case(tmp):
    from kidney_seg.preprocessing import preprocess_case, resolve_preprocessing

    img, lab = _case_files(tmp / "in")
    settings = resolve_preprocessing(
        {"target_spacing": None, "clip": [-75.0, 349.0], "normalization": "zscore_slice", "crop_to_body": False}, None
    )
    return lambda: preprocess_case("case_00000", img, lab, tmp / "out" / "case_00000", settings, (0, 1, 2))


def _setup_compute_fingerprint(tmp):
    from kidney_seg.preprocessing import compute_fingerprint

    img, lab = _case_files(tmp / "in")
    return lambda: compute_fingerprint([("case_00000", str(img), str(lab))], tmp / "out" / "fingerprint.json")


def _setup_build_report(tmp):
    from kidney_seg.report.html import build_report

    _history().to_csv(tmp / "in.csv", index=False)
    return lambda: build_report(
        tmp / "out" / "report.html",
        tmp / "missing.csv",
        tmp / "missing2.csv",
        tmp / "in.csv",
        None,
        {"results_dir": "x"},
    )


def _setup_write_overlay_png(tmp):
    import base64

    from kidney_seg.report.overlays import write_overlay_png

    png = base64.b64encode(b"\x89PNG\r\n\x1a\n a complete png").decode()
    page = tmp / "in" / "report.html"
    page.parent.mkdir(parents=True)
    page.write_text(f'<figure class="overlay" data-roles="median"><img src="data:image/png;base64,{png}"></figure>')
    return lambda: write_overlay_png(page, tmp / "out" / "overlay.png")


def _setup_publish(tmp, monkeypatch):
    from kidney_seg import environment
    from kidney_seg.training import publish

    monkeypatch.setattr(environment, "accelerator_devices", lambda backend=None: [])  # no framework probe
    state = tmp / "in" / "state"
    state.mkdir(parents=True)
    (state / "best.keras").write_bytes(b"the best model")
    _history().to_csv(state / "history.csv", index=False)
    return lambda: publish(state, tmp / "out" / "fold_0", {"patch_size": [32, 32]})


def _setup_checkpointer(tmp):
    from kidney_seg.checkpoint import make_checkpointer

    state = tmp / "out" / "state"
    state.mkdir(parents=True)

    def run():
        cb = make_checkpointer(state, _history().iloc[:0])
        cb.set_model(FakeModel())
        cb.on_epoch_begin(0)
        cb.on_epoch_end(0, {"loss": 0.5, "val_loss": 0.4, "val_dice_kidney": 0.3})

    return run


def _setup_save_checkpoint(tmp):
    from kidney_seg.checkpoint import save_checkpoint

    return lambda: save_checkpoint(FakeModel(), tmp / "out" / "state" / "last.keras", 3)


def _setup_reset_stale_state(tmp):
    from kidney_seg.checkpoint import reset_stale_state

    return lambda: reset_stale_state(tmp / "out" / "state", {"seed": 1})


def _setup_write_environment(tmp):
    from kidney_seg.environment import write_environment

    return lambda: write_environment(tmp / "out" / "environment.json", accelerators=False)


def _setup_run_check(tmp):
    from kidney_seg.data.checks import run_check

    img, lab = _case_files(tmp / "in")
    return lambda: run_check("case_00000", img, lab, (0, 1, 2), tmp / "out" / "case_00000.json", None, "skip")


def _setup_collect_checks(tmp):
    from kidney_seg.atomic import write_json_atomic
    from kidney_seg.data.checks import collect_checks

    records = [
        {"case_id": "case_00000", "ok": True, "stage": "check", "file": "", "reason": "", "log": ""},
        {"case_id": "case_00001", "ok": False, "stage": "check", "file": "x.nii.gz", "reason": "truncated", "log": ""},
    ]
    paths = []
    for r in records:
        paths.append(tmp / "in" / f"{r['case_id']}.json")
        write_json_atomic(paths[-1], r)
    return lambda: collect_checks(paths, tmp / "out" / "checks.csv", tmp / "out" / "failures.csv")


def _setup_phantom_write_case(tmp):
    from kidney_seg.data.phantom import PhantomCase, write_case

    label = _label()
    case = PhantomCase(
        image=(label * 100).astype(np.float32), label=label, spacing=(3.0, 0.8, 0.8), affine=kits_affine()
    )
    return lambda: write_case(tmp / "out" / "case_00000", case)


WRITERS = [
    Writer("io.atomic_path", _setup_atomic_path, (("out/blob.bin", "Path.write_bytes", 1),)),
    Writer("io.write_text_atomic", _setup_write_text, (("out/notes.txt", "Path.write_text", 1),)),
    Writer("io.write_json_atomic", _setup_write_json, (("out/obj.json", "Path.write_text", 1),)),
    Writer("io.save_npy_atomic", _setup_save_npy, (("out/arr.npy", "np.save", 1),)),
    Writer("io.save_nifti", _setup_save_nifti, (("out/vol.nii.gz", "nib.save", 1),)),
    Writer("io.save_like", _setup_save_like, (("out/pred.nii.gz", "nib.save", 1),)),
    Writer("split.write_split", _setup_write_split, (("out/split.csv", "DataFrame.to_csv", 1),)),
    Writer("evaluation.evaluate_case", _setup_evaluate_case, (("out/case_00000.json", "Path.write_text", 1),)),
    Writer(
        "evaluation.summarize",
        _setup_summarize,
        (("out/per_case.csv", "DataFrame.to_csv", 1), ("out/summary.csv", "DataFrame.to_csv", 2)),
    ),
    Writer("postprocessing.decide_from_files", _setup_decide, (("out/postprocessing.json", "Path.write_text", 1),)),
    Writer("postprocessing.postprocess_file", _setup_postprocess_file, (("out/case_00000.nii.gz", "nib.save", 1),)),
    Writer(
        "preprocessing.preprocess_case",
        _setup_preprocess_case,
        (
            ("out/case_00000/image.npy", "np.save", 1),
            ("out/case_00000/label.npy", "np.save", 2),
            ("out/case_00000/meta.json", "Path.write_text", 1),
        ),
    ),
    Writer(
        "preprocessing.compute_fingerprint",
        _setup_compute_fingerprint,
        (("out/fingerprint.json", "Path.write_text", 1),),
    ),
    Writer("report.build_report", _setup_build_report, (("out/report.html", "Path.write_text", 1),)),
    Writer("report.write_overlay_png", _setup_write_overlay_png, (("out/overlay.png", "Path.write_bytes", 1),)),
    Writer(
        "training.publish",
        _setup_publish,
        (
            ("out/fold_0/model.keras", "shutil.copyfile", 1),
            ("out/fold_0/history.csv", "DataFrame.to_csv", 1),
            ("out/fold_0/curves.png", "Figure.savefig", 1),
            ("out/fold_0/inference.json", "Path.write_text", 1),
            ("out/fold_0/environment.json", "Path.write_text", 2),
        ),
    ),
    # each epoch: history.csv, then last.keras (the model, then the epoch record appended to the archive),
    # then best.keras
    Writer(
        "training.checkpointer",
        _setup_checkpointer,
        (
            ("out/state/history.csv", "DataFrame.to_csv", 1),
            ("out/state/last.keras", "model.save", 1),
            ("out/state/best.keras", "shutil.copyfile", 1),
        ),
    ),
    Writer("checkpoint.save_checkpoint", _setup_save_checkpoint, (("out/state/last.keras", "ZipFile.writestr", 1),)),
    Writer(
        "checkpoint.reset_stale_state", _setup_reset_stale_state, (("out/state/resume_key.json", "Path.write_text", 1),)
    ),
    Writer(
        "environment.write_environment", _setup_write_environment, (("out/environment.json", "Path.write_text", 1),)
    ),
    Writer("checks.run_check", _setup_run_check, (("out/case_00000.json", "Path.write_text", 1),)),
    Writer(
        "checks.collect_checks",
        _setup_collect_checks,
        (("out/checks.csv", "DataFrame.to_csv", 1), ("out/failures.csv", "DataFrame.to_csv", 2)),
    ),
    Writer(
        "phantom.write_case",
        _setup_phantom_write_case,
        (("out/case_00000/imaging.nii.gz", "nib.save", 1), ("out/case_00000/segmentation.nii.gz", "nib.save", 2)),
    ),
]


def _cases():
    for w in WRITERS:
        for k, (rel, _, _) in enumerate(w.outputs):
            for previous in ("fresh", "existing"):
                yield pytest.param(w, k, previous, id=f"{w.name}[{Path(rel).name}]-{previous}")


def _tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (relative path -> content)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("writer, k, previous", list(_cases()))
def test_a_failure_mid_write_leaves_no_partial_or_temporary_file(tmp_path, monkeypatch, writer, k, previous):
    import inspect

    work = tmp_path / "w"
    work.mkdir()
    params = inspect.signature(writer.setup).parameters
    run = writer.setup(work, monkeypatch) if "monkeypatch" in params else writer.setup(work)
    if previous == "existing":
        run()  # an earlier complete run left every output in place
    before = _tree(work)
    rel, serialiser, nth = writer.outputs[k]
    target = work / rel
    fault = FailingSerialiser(monkeypatch, serialiser, nth)

    with pytest.raises(OSError) as info:
        run()

    assert fault.raised is not None, (
        f"{serialiser} call #{nth} never happened: {writer.name} no longer writes {rel} that way"
    )
    err = info.value
    assert err.errno == errno.ENOSPC
    assert isinstance(err, OutputWriteError) and err.__cause__ is fault.raised
    assert str(target) in str(err), f"the error does not name {target}: {err}"
    written = Path(fault.dest if isinstance(fault.dest, (str, Path)) else fault.dest.name)
    assert written != target and written.parent == target.parent, (
        f"wrote {written}, not a temporary file beside {target}"
    )
    after = _tree(work)
    partial = [p for p, data in after.items() if MARK in data]
    assert not partial, f"partial files left: {partial}"
    if previous == "existing":
        assert after[rel] == before[rel], f"{rel} lost its previous complete content"
        assert set(after) == set(before), f"left behind: {sorted(set(after) - set(before))}"
    else:
        assert not target.exists()
        expected = set(before) | {r for r, _, _ in writer.outputs[:k]}  # the outputs completed before the failure
        assert set(after) == expected, f"unexpected files: {sorted(set(after) ^ expected)}"


# ----------------------------------------------------------------------------- the download (.part -> rename)


@pytest.fixture
def http_files(server):
    """The shared loopback server (tests/http_server.py); yields (base URL, files: url path -> bytes)."""
    base, handler = server
    return base, handler.files


def _nifti_gz_bytes() -> bytes:
    import gzip

    img = nib.Nifti1Image(np.random.default_rng(0).integers(-1000, 1000, (4, 64, 64), dtype=np.int16), kits_affine())
    img.set_qform(img.affine, 1)
    img.set_sform(img.affine, 1)
    return gzip.compress(img.to_bytes(), compresslevel=1)


def _download(url, dest, case_id):
    """kits.download against the loopback test server, failing at once instead of retrying."""
    import inspect

    from kidney_seg.data import kits

    extra = {"allow_http": True} if "allow_http" in inspect.signature(kits.download).parameters else {}
    kits.download(url, dest, case_id, retries=0, backoff=0.01, **extra)


def test_download_failing_mid_write_never_reaches_the_final_path(tmp_path, monkeypatch, http_files):
    """ENOSPC while streaming: the final file is absent; only the resumable .part is kept, and a rerun completes."""
    import builtins

    from kidney_seg.data import kits

    base, files = http_files
    files["/case.nii.gz"] = data = _nifti_gz_bytes()
    dest = tmp_path / "case_00000" / "imaging.nii.gz"
    real_open = builtins.open

    class HalfFullDisk:
        def __init__(self, fh):
            self.fh = fh

        def write(self, chunk):
            self.fh.write(chunk[: len(chunk) // 2])
            raise simulated_enospc()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(kits, "open", lambda *a, **k: HalfFullDisk(real_open(*a, **k)), raising=False)
    with pytest.raises(OSError) as info:
        _download(f"{base}/case.nii.gz", dest, "case_00000")
    assert info.value.errno == errno.ENOSPC
    assert not dest.exists()
    # by design (kits.py, partial_path) the .part is kept so that the next run resumes with a Range request
    assert sorted(p.name for p in dest.parent.iterdir()) == ["imaging.nii.gz.part"]
    monkeypatch.undo()
    _download(f"{base}/case.nii.gz", dest, "case_00000")
    assert dest.read_bytes() == data
    assert sorted(p.name for p in dest.parent.iterdir()) == ["imaging.nii.gz"]


def test_download_failing_its_check_leaves_nothing(tmp_path, http_files):
    """A complete but corrupt body: the staged copy is removed and the final path never appears."""
    from kidney_seg.errors import CaseDataError

    base, files = http_files
    data = _nifti_gz_bytes()
    files["/bad.nii.gz"] = data[: len(data) // 2]  # a truncated gzip stream, served as if complete
    dest = tmp_path / "case_00001" / "imaging.nii.gz"
    with pytest.raises(CaseDataError, match="truncated"):
        _download(f"{base}/bad.nii.gz", dest, "case_00001")
    assert list(dest.parent.iterdir()) == []


def test_download_disk_full_error_names_the_file(tmp_path, monkeypatch, http_files):
    import builtins

    from kidney_seg.data import kits

    base, files = http_files
    files["/case.nii.gz"] = _nifti_gz_bytes()
    dest = tmp_path / "imaging.nii.gz"
    real_open = builtins.open

    def failing_open(file, mode="r", *a, **k):
        fh = real_open(file, mode, *a, **k)
        fh.close()
        raise simulated_enospc()

    monkeypatch.setattr(kits, "open", failing_open, raising=False)
    with pytest.raises(OSError) as info:
        _download(f"{base}/case.nii.gz", dest, "case_00000")
    assert "imaging.nii.gz" in str(info.value)


# ----------------------------------------------------------------------------- (b) static audit

AUDITED = [REPO / "kidney_seg", REPO / "workflow_scripts"]

#: Justified writes outside atomic_path: (file, enclosing function, kind) -> reason. Matched by function, not
#: line, so that edits elsewhere in a file do not break it; an entry that no longer matches anything fails.
ALLOWED: dict[tuple[str, str, str], str] = {
    # The downloader streams the body into "<dest>.part", appending across attempts and runs so that an
    # interrupted download resumes with an HTTP Range request. The .part is never a final output: only
    # _verify_and_place moves it (os.replace) to a hidden staging name, checks the whole gzip stream and the
    # NIfTI header there, and then os.replace()s it onto the final path.
    (
        "kidney_seg/data/kits.py",
        "_copy",
        "open",
    ): "download .part file, kept for resume, renamed into place only after validation",
    # A rule's log must be readable while the job runs and must survive the job's failure (it holds the
    # traceback Snakemake points to); written to a temporary file and renamed at the end, a crashed job
    # would leave no log at all. Logs are not data outputs that a later rule reads.
    ("kidney_seg/logs.py", "log_to", "FileHandler"): "Snakemake log file, streamed so it survives a crash",
}

_PANDAS_WRITERS = {
    "to_csv",
    "to_json",
    "to_parquet",
    "to_pickle",
    "to_excel",
    "to_html",
    "to_feather",
    "to_hdf",
    "to_string",
    "to_markdown",
    "to_latex",
    "to_xml",
    "to_stata",
}
_MODULE_OPENERS = {"io", "gzip", "bz2", "lzma", "codecs", "builtins"}
_WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC"}
_BUFFERS = {"BytesIO", "StringIO"}


def _arg(call: ast.Call, pos: int, *names: str) -> ast.AST | None:
    """Positional argument ``pos`` or the first of keyword ``names``."""
    if len(call.args) > pos and not any(isinstance(a, ast.Starred) for a in call.args[: pos + 1]):
        return call.args[pos]
    for kw in call.keywords:
        if kw.arg in names:
            return kw.value
    return None


def _is_write_mode(node: ast.AST | None, default_write: bool = False) -> bool | None:
    """True for a constant write/append mode, False for a read mode, None when it cannot be told."""
    if node is None:
        return default_write
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return any(c in node.value for c in "wax+")
    return None


def classify_write(call: ast.Call) -> tuple[str, ast.AST | None] | None:
    """(kind, destination expression) when ``call`` writes a file, else None.

    The destination is what must refer to the temporary path of an enclosing atomic_path;
    None when the call writes but its destination cannot be told.
    """
    func = call.func
    name = dotted_name(func)
    attr = func.attr if isinstance(func, ast.Attribute) else None
    owner = dotted_name(func.value) if isinstance(func, ast.Attribute) else ""
    if name == "open" or (attr == "open" and owner in _MODULE_OPENERS):
        mode = _is_write_mode(_arg(call, 1, "mode"))
        return ("open", _arg(call, 0, "file", "filename")) if mode is not False else None
    if name == "os.open":
        flags = {n.attr for a in call.args[1:2] for n in ast.walk(a) if isinstance(n, ast.Attribute)}
        return ("os.open", _arg(call, 0, "path")) if flags & _WRITE_FLAGS else None
    if owner == "tarfile" and attr == "open":
        mode = _is_write_mode(_arg(call, 1, "mode"))
        return ("archive", _arg(call, 0, "name")) if mode is not False else None
    if attr == "open":  # Path.open(mode) and the like: only a constant write mode counts
        mode = _arg(call, 0, "mode")
        return ("open", func.value) if _is_write_mode(mode) is True else None
    if owner in ("np", "numpy") and attr in ("save", "savez", "savez_compressed", "savetxt"):
        return f"np.{attr}", _arg(call, 0, "file", "fname")
    if attr == "tofile":
        return "tofile", _arg(call, 0, "fid", "file")
    if owner in ("nib", "nibabel") and attr == "save":
        return "nib.save", _arg(call, 1, "filename")
    if attr in ("to_filename", "to_file_map"):
        return attr, _arg(call, 0, "filename", "file_map")
    if attr in _PANDAS_WRITERS:
        dest = _arg(call, 0, "path_or_buf", "path", "buf", "excel_writer", "fname")
        return (attr, dest) if dest is not None else None  # without a destination it returns a string
    if attr == "savefig":
        return "savefig", _arg(call, 0, "fname")
    if attr == "save" and (call.args or call.keywords):  # a model, an image, ...
        return "save", _arg(call, 0, "filepath", "fp", "path", "filename")
    if owner == "shutil" and attr in ("copy", "copy2", "copyfile", "copytree", "move", "copyfileobj"):
        return f"shutil.{attr}", _arg(call, 1, "dst", "fdst")
    if attr in ("write_text", "write_bytes"):
        return attr, func.value
    if owner in ("json", "pickle", "yaml", "marshal", "tomli_w") and attr in ("dump", "safe_dump", "dump_all"):
        dest = _arg(call, 1, "fp", "file", "stream")
        return (f"{owner}.{attr}", dest) if dest is not None or owner == "json" else None
    if (attr or name).endswith("FileHandler"):
        return "FileHandler", _arg(call, 0, "filename")
    if name.split(".")[-1] in ("ZipFile", "TarFile") or (owner == "tarfile" and attr == "open"):
        mode = _is_write_mode(_arg(call, 1, "mode"))
        return ("archive", _arg(call, 0, "file", "name")) if mode is not False else None
    if attr == "urlretrieve" or name == "urlretrieve":
        return "urlretrieve", _arg(call, 1, "filename")
    return None


def _names(node: ast.AST | None) -> set[str]:
    """Names an expression refers to."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} if node is not None else set()


@dataclass
class Finding:
    path: str
    line: int
    function: str
    kind: str
    source: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind} in {self.function}(): `{self.source}` {self.why}"


class _Auditor(ast.NodeVisitor):
    """Finds file-writing calls and whether each writes to the temporary path of an enclosing atomic_path."""

    def __init__(self, rel: str, source: str):
        self.rel, self.source = rel, source
        self.findings: list[Finding] = []
        self.functions: list[str] = []
        self.safe: list[set[str]] = [set()]  # names bound to an atomic_path temp (or a file opened on one)
        self.buffers: list[set[str]] = [set()]  # names bound to io.BytesIO()/StringIO() in this function

    def _function(self, node):
        self.functions.append(node.name)
        buffers = {
            t.id
            for n in ast.walk(node)
            if isinstance(n, ast.Assign)
            and isinstance(n.value, ast.Call)
            and dotted_name(n.value.func).split(".")[-1] in _BUFFERS
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        self.buffers.append(buffers)
        self.safe.append(set(self.safe[-1]))
        self.generic_visit(node)
        self.safe.pop()
        self.buffers.pop()
        self.functions.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_With(self, node):
        added = set()
        for item in node.items:  # `with atomic_path(p) as tmp, open(tmp, "wb") as fh:` binds left to right
            self.safe.append(self.safe[-1] | added)
            self.visit(item.context_expr)
            self.safe.pop()
            call = item.context_expr
            var = item.optional_vars
            if not (isinstance(call, ast.Call) and isinstance(var, ast.Name)):
                continue
            if dotted_name(call.func).split(".")[-1] == "atomic_path":
                added.add(var.id)
            else:
                write = classify_write(call)
                if write and write[1] is not None and _names(write[1]) & (self.safe[-1] | added):
                    added.add(var.id)  # a handle opened on the temporary path
        self.safe.append(self.safe[-1] | added)
        for stmt in node.body:
            self.visit(stmt)
        self.safe.pop()

    visit_AsyncWith = visit_With

    def visit_Call(self, node):
        write = classify_write(node)
        if write is not None:
            kind, dest = write
            names = _names(dest)
            if dest is None:
                why = "writes to a destination the audit cannot tell"
            elif names & self.safe[-1]:
                why = None
            elif isinstance(dest, ast.Name) and dest.id in self.buffers[-1]:
                why = None  # an in-memory buffer (io.BytesIO / StringIO)
            elif self.safe[-1]:
                why = "is inside `with atomic_path(...)` but does not write to its temporary path"
            else:
                why = "writes a file outside `with atomic_path(...)`"
            if why:
                function = ".".join(self.functions) or "<module>"
                segment = (ast.get_source_segment(self.source, node) or kind).split("\n")[0][:100]
                self.findings.append(Finding(self.rel, node.lineno, function, kind, segment, why))
        self.generic_visit(node)


def audit_source(source: str, rel: str = "<snippet>") -> list[Finding]:
    """Non-atomic writes in one module's source."""
    auditor = _Auditor(rel, source)
    auditor.visit(ast.parse(source))
    return auditor.findings


def audit_tree() -> list[Finding]:
    found = []
    for root in AUDITED:
        for path in sorted(root.rglob("*.py")):
            found += audit_source(path.read_text(), str(path.relative_to(REPO)))
    return found


def test_static_audit_every_library_write_goes_through_atomic_path():
    findings = audit_tree()
    used = set()
    bad = []
    for f in findings:
        key = (f.path, f.function.split(".")[-1], f.kind)
        if key in ALLOWED:
            used.add(key)
        else:
            bad.append(f)
    assert not bad, (
        "file writes outside `with atomic_path(...) as tmp` (write to tmp, or use "
        "kidney_seg.atomic.write_text_atomic / write_json_atomic / save_npy_atomic, "
        "kidney_seg.volume.save_nifti / save_like; "
        "a justified exception goes into ALLOWED in tests/test_atomic.py with its reason):\n" + "\n".join(map(str, bad))
    )
    stale = set(ALLOWED) - used
    assert not stale, f"ALLOWED entries that match no write any more (remove them): {sorted(stale)}"


def test_static_audit_sees_the_known_writers():
    """The audit is not vacuous: it finds the atomic writes of the library and accepts them."""
    srcs = [(REPO / "kidney_seg" / name).read_text() for name in ("training.py", "checkpoint.py", "curves.py")]
    calls = [classify_write(n) for src in srcs for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call)]
    kinds = {c[0] for c in calls if c}
    assert {"to_csv", "savefig", "save", "shutil.copyfile"} <= kinds, kinds


FLAGGED = {
    "open_w": "open(p, 'w').write('x')",
    "open_mode_var": "def f(p, mode):\n    with open(p, mode) as fh:\n        fh.write(b'x')",
    "np_save": "np.save(p, a)",
    "np_savez": "numpy.savez(p, a=a)",
    "nib_save": "nib.save(img, str(p))",
    "to_csv": "df.to_csv(p, index=False)",
    "savefig": "fig.savefig(p, dpi=100)",
    "model_save": "model.save(p)",
    "copyfile": "shutil.copyfile(a, b)",
    "write_text": "Path(p).write_text('x')",
    "write_bytes": "p.write_bytes(b'x')",
    "json_dump": "with open(p, 'w') as fh:\n    json.dump(o, fh)",
    "gzip_open": "gzip.open(p, 'wb')",
    "path_open": "p.open('a')",
    "filehandler": "logging.FileHandler(p, mode='w')",
    "zip_append": "with zipfile.ZipFile(p, 'a') as z:\n    z.writestr('m', 'x')",
    "wrong_target": "with atomic_path(p) as tmp:\n    df.to_csv(other)",
    "after_block": "with atomic_path(p) as tmp:\n    pass\ndf.to_csv(tmp2)",
}

CLEAN = {
    "to_tmp": "with atomic_path(p) as tmp:\n    df.to_csv(tmp, index=False)",
    "handle_on_tmp": "with atomic_path(p) as tmp:\n    with open(tmp, 'wb') as fh:\n        np.save(fh, a)",
    "same_with": "with atomic_path(p) as tmp, open(tmp, 'wb') as fh:\n    np.save(fh, a)",
    "str_tmp": "with kio.atomic_path(p) as tmp:\n    nib.save(img, str(tmp))",
    "nested": "with atomic_path(a) as t1:\n    with atomic_path(b) as t2:\n        shutil.copyfile(src, t2)\n"
    "        t1.write_text('x')",
    "buffer": "def f(fig):\n    buf = io.BytesIO()\n    fig.savefig(buf, format='png')\n    return buf.getvalue()",
    "reads": "open(p)\nopen(p, 'rb')\ngzip.open(p, 'rb')\nImage.open(buf)\ngrid.open(box)\nos.open(p, os.O_RDONLY)",
    "to_string": "s = df.to_csv(index=False)",
    "zip_on_tmp": "with atomic_path(p) as tmp:\n    model.save(tmp)\n    with zipfile.ZipFile(tmp, 'a') as z:\n"
    "        z.writestr('m', 'x')",
    "zip_read": "with zipfile.ZipFile(p) as z:\n    z.read('m')",
}


@pytest.mark.parametrize("snippet", FLAGGED.values(), ids=FLAGGED.keys())
def test_audit_flags_a_non_atomic_write(snippet):
    findings = audit_source(textwrap.dedent(snippet), "x.py")
    assert findings, snippet
    assert all(str(f).startswith(f"x.py:{f.line}: ") for f in findings)


@pytest.mark.parametrize("snippet", CLEAN.values(), ids=CLEAN.keys())
def test_audit_accepts_an_atomic_write(snippet):
    assert audit_source(textwrap.dedent(snippet), "x.py") == []


def test_audit_message_names_file_and_line():
    (f,) = audit_source("import pandas\n\n\ndef save(df, p):\n    df.to_csv(p)\n", "kidney_seg/x.py")
    assert str(f).startswith("kidney_seg/x.py:5: to_csv in save(): `df.to_csv(p)`")
