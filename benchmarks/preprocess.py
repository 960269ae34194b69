"""Speed and peak memory of preprocessing one big case, against a plain nnU-Net-style reference.

    .venv/bin/python benchmarks/preprocess.py [--case PATH] [--out results/benchmarks/preprocess.json]
                                              [--dtype int16|float32]

Input: the real KiTS19 label case_00000 (611 x 512 x 512, 0.5 x 0.92 x 0.92 mm; a synthetic
label of that shape if the file is absent), with CT intensities synthesised inside it
(air, a body ellipse at ~40 HU with a fat rim, kidney 150 HU, tumour 60 HU, noise, and a
CT table below the body), written to a temporary .nii.gz in the KiTS layout.

Each measurement runs in a fresh subprocess and reports its own peak RSS (VmHWM):
  ours       kidney_seg.preprocessing.preprocess_case, default settings (paper spacing
             3.0 x 0.7816 x 0.7816 mm, clip [-75.76, 349.49], per-slice z-score, crop to
             body), end to end: load image and label, crop, resample both, write the cache;
  ours_core  the same image: load (lean reader), then time preprocess_image alone;
  reference  load with nibabel's get_fdata (float32), reoriented, clip, scikit-image resize
             order 3 of every slice in-plane (anti_aliasing=False, preserve_range=True),
             then nearest neighbour along the slice axis.
Targets: ours / reference wall time <= 0.5; our peak RSS <= 2.5 x the float32 size of the
input volume. scikit-image is used here only, as the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_CASE = ROOT.parent / "shared" / "data" / "kits19-labels" / "case_00000" / "segmentation.nii.gz"
PAPER_CFG = {
    "target_spacing": [3.0, 0.7816, 0.7816],
    "clip": [-75.76, 349.49],
    "normalization": "zscore_slice",
    "crop_to_body": True,
}
SYNTHETIC_SHAPE = (611, 512, 512)
SYNTHETIC_SPACING = (0.5, 0.9199219, 0.9199219)
TARGET_TIME_RATIO = 0.5
TARGET_RSS_RATIO = 2.5


# ----------------------------------------------------------------------------- child side


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def child_ours(image: str, label: str, out_dir: str) -> dict:
    from kidney_seg.preprocessing import preprocess_case, resolve_preprocessing

    baseline = peak_rss_bytes()
    settings = resolve_preprocessing(PAPER_CFG, None)
    t0 = time.perf_counter()
    meta = preprocess_case("case_00000", image, label, out_dir, settings, (0, 1, 2))
    return {
        "wall_s": time.perf_counter() - t0,
        "peak_rss": peak_rss_bytes(),
        "baseline_rss": baseline,
        "out_shape": meta["shape"],
        "crop_box": meta["crop_box"],
    }


def child_ours_core(image: str) -> dict:
    from kidney_seg.preprocessing import preprocess_image, resolve_preprocessing
    from kidney_seg.volume import read_image

    baseline = peak_rss_bytes()
    settings = resolve_preprocessing(PAPER_CFG, None)
    t0 = time.perf_counter()
    volume, geometry = read_image(image, "case_00000")
    t1 = time.perf_counter()
    out, box = preprocess_image(volume, geometry.spacing, settings)
    t2 = time.perf_counter()
    return {
        "load_s": t1 - t0,
        "wall_s": t2 - t1,
        "peak_rss": peak_rss_bytes(),
        "baseline_rss": baseline,
        "out_shape": list(out.shape),
        "input_dtype": str(volume.dtype),
    }


def child_reference(image: str) -> dict:
    import nibabel as nib
    import numpy as np
    from skimage.transform import resize

    from kidney_seg.preprocessing import nearest_indices, resampled_shape
    from kidney_seg.volume import read_geometry, to_internal

    baseline = peak_rss_bytes()
    t0 = time.perf_counter()
    geometry = read_geometry(image, "case_00000")
    data = np.ascontiguousarray(to_internal(nib.load(image).get_fdata(dtype=np.float32), geometry))
    t1 = time.perf_counter()
    np.clip(data, *PAPER_CFG["clip"], out=data)
    shape = resampled_shape(data.shape, geometry.spacing, PAPER_CFG["target_spacing"])
    inplane = np.empty((data.shape[0],) + tuple(shape[1:]), dtype=np.float32)
    for k in range(data.shape[0]):
        inplane[k] = resize(data[k], shape[1:], order=3, mode="edge", anti_aliasing=False, preserve_range=True)
    out = inplane[nearest_indices(data.shape[0], shape[0])]
    t2 = time.perf_counter()
    return {
        "load_s": t1 - t0,
        "wall_s": t2 - t1,
        "total_s": t2 - t0,
        "peak_rss": peak_rss_bytes(),
        "baseline_rss": baseline,
        "out_shape": list(out.shape),
    }


# ----------------------------------------------------------------------------- parent side


def synthetic_label():
    """A KiTS-like label volume of case_00000's shape: two kidneys, one with a tumour."""
    import numpy as np

    z, y, x = np.ogrid[: SYNTHETIC_SHAPE[0], : SYNTHETIC_SHAPE[1], : SYNTHETIC_SHAPE[2]]
    label = np.zeros(SYNTHETIC_SHAPE, np.uint8)
    for cx in (180, 330):
        label[((z - 250) / 120.0) ** 2 + ((y - 320) / 45.0) ** 2 + ((x - cx) / 35.0) ** 2 <= 1] = 1
    label[((z - 280) / 40.0) ** 2 + ((y - 320) / 25.0) ** 2 + ((x - 180) / 25.0) ** 2 <= 1] = 2
    return label


def make_case(case: Path | None, tmp: Path, dtype: str) -> tuple[Path, Path, str]:
    """Write the synthetic CT (and, without a real label, the label) into ``tmp``; return paths and a note."""
    import nibabel as nib
    import numpy as np

    if case is not None and case.is_file():
        lab_img = nib.load(str(case))
        label = np.asarray(lab_img.dataobj, dtype=np.uint8)
        affine, label_path, note = lab_img.affine, case, f"real label {case}"
    else:
        print(f"NOTE: {case} not found; using a synthetic label volume of shape {SYNTHETIC_SHAPE} instead", flush=True)
        s0, s1, s2 = SYNTHETIC_SPACING
        affine = np.array([[0, 0, -s2, 0], [0, -s1, 0, 0], [-s0, 0, 0, 0], [0, 0, 0, 1]], float)  # KiTS (I, P, L)
        label = synthetic_label()
        label_path, note = tmp / "segmentation.nii.gz", "synthetic label (real case_00000 absent)"
        img = nib.Nifti1Image(label, affine)
        img.set_qform(affine, 1)
        img.set_sform(affine, 1)
        nib.save(img, str(label_path))
    if nib.aff2axcodes(affine) != ("I", "P", "L"):
        raise SystemExit(f"{case}: expected a KiTS-layout (I, P, L) label, got {nib.aff2axcodes(affine)}")
    nz, ny, nx = label.shape
    yy, xx = np.mgrid[:ny, :nx]
    cy, cx, ry, rx = 0.49 * ny, 0.5 * nx, 0.33 * ny, 0.46 * nx
    fg = label.reshape(nz, -1).any(0).reshape(ny, nx) if label.any() else np.zeros((ny, nx), bool)
    r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    if fg.any() and r[fg].max() > 0.8:  # keep every labelled voxel well inside the body
        ry, rx = ry * np.sqrt(r[fg].max() / 0.8), rx * np.sqrt(r[fg].max() / 0.8)
        r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    base = np.full((ny, nx), -1000.0, np.float32)
    base[r <= 1] = -100  # fat rim
    base[r <= 0.85] = 40  # soft tissue
    table_top = int(min(cy + ry + 0.03 * ny, ny - 0.06 * ny))
    base[table_top : table_top + int(0.03 * ny), int(0.05 * nx) : int(0.95 * nx)] = 120  # CT table, air gap above
    rng = np.random.default_rng(0)
    out_dtype = np.dtype(dtype)
    image = np.empty(label.shape, out_dtype)
    for k in range(nz):
        sl = base + rng.normal(0, 15, (ny, nx)).astype(np.float32)
        sl[label[k] == 1] = 150 + rng.normal(0, 15, int((label[k] == 1).sum()))
        sl[label[k] == 2] = 60 + rng.normal(0, 15, int((label[k] == 2).sum()))
        image[k] = np.rint(sl) if out_dtype.kind == "i" else sl
    image_path = tmp / "imaging.nii.gz"
    img = nib.Nifti1Image(image, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, str(image_path))
    return image_path, Path(label_path), note


def run_child(mode: str, *args: str) -> dict:
    """Run one measurement in a fresh interpreter; return its JSON report."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", mode, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child {mode} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--case", type=Path, default=DEFAULT_CASE, help="a KiTS-layout label file (segmentation.nii.gz)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "preprocess.json")
    parser.add_argument(
        "--dtype", choices=("int16", "float32"), default="int16", help="voxel type of the synthetic CT file"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        mode, *rest = args.child
        result = {"ours": child_ours, "ours_core": child_ours_core, "reference": child_reference}[mode](*rest)
        print(json.dumps(result))
        return 0

    from kidney_seg.atomic import write_json_atomic

    with tempfile.TemporaryDirectory(prefix="kidney-seg-bench-") as tmpdir:
        tmp = Path(tmpdir)
        t0 = time.perf_counter()
        image, label, note = make_case(args.case, tmp, args.dtype)
        print(f"input: {note}; synthetic CT ({args.dtype}) written in {time.perf_counter() - t0:.1f} s", flush=True)
        import nibabel as nib

        shape = tuple(int(s) for s in nib.load(str(image)).shape)
        ours = run_child("ours", str(image), str(label), str(tmp / "cache"))
        core = run_child("ours_core", str(image))
        ref = run_child("reference", str(image))

    float32_bytes = 4 * shape[0] * shape[1] * shape[2]
    mb = 1 / 2**20
    ratio_total = ours["wall_s"] / ref["total_s"]
    ratio_core = core["wall_s"] / ref["wall_s"]
    rss_ratio = ours["peak_rss"] / float32_bytes
    result = {
        "input": {"note": note, "shape": list(shape), "file_dtype": args.dtype, "float32_mib": float32_bytes * mb},
        "settings": PAPER_CFG,
        "ours": ours,
        "ours_core": core,
        "reference": ref,
        "ratio_time_end_to_end": ratio_total,
        "ratio_time_resampling": ratio_core,
        "ratio_peak_rss_to_float32_input": rss_ratio,
        "targets": {"time_ratio": TARGET_TIME_RATIO, "rss_ratio": TARGET_RSS_RATIO},
        "pass": {
            "time": ratio_total <= TARGET_TIME_RATIO and ratio_core <= TARGET_TIME_RATIO,
            "memory": rss_ratio <= TARGET_RSS_RATIO,
        },
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    write_json_atomic(args.out, result)

    rows = [
        ("ours: preprocess_case (load image+label, crop, resample both, write)", ours["wall_s"], ours["peak_rss"]),
        (f"ours: preprocess_image only (after a {core['load_s']:.1f} s lean load)", core["wall_s"], core["peak_rss"]),
        ("reference: load + clip + skimage resize + nearest z", ref["total_s"], ref["peak_rss"]),
        ("reference: clip + skimage resize + nearest z only", ref["wall_s"], None),
    ]
    print(
        f"\ninput {shape[0]}x{shape[1]}x{shape[2]} ({args.dtype} file), float32 size {float32_bytes * mb:.0f} MiB "
        f"({float32_bytes / 1e6:.0f} MB); "
        f"ours -> {ours['out_shape']} (crop box {ours['crop_box']}), reference -> {ref['out_shape']}"
    )
    print(f"{'step':<72} {'wall s':>8} {'peak RSS MiB':>12} {'x float32':>10}")
    for name, wall, rss in rows:
        rss_txt = f"{rss * mb:12.0f} {rss / float32_bytes:10.2f}" if rss is not None else f"{'':>12} {'':>10}"
        print(f"{name:<72} {wall:8.2f} {rss_txt}")
    print(
        f"(interpreter + imports baseline RSS: ours {ours['baseline_rss'] * mb:.0f} MiB, "
        f"reference {ref['baseline_rss'] * mb:.0f} MiB)"
    )
    print(
        f"\ntime ratio ours/reference: end to end {ratio_total:.3f}, resampling only {ratio_core:.3f} "
        f"(target <= {TARGET_TIME_RATIO}) -> {'PASS' if result['pass']['time'] else 'FAIL'}"
    )
    print(
        f"peak RSS ours / float32 input: {rss_ratio:.2f}x (target <= {TARGET_RSS_RATIO}x) -> "
        f"{'PASS' if result['pass']['memory'] else 'FAIL'}"
    )
    print(f"wrote {args.out}")
    return 0 if all(result["pass"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
