"""Provenance: data and split, git commit, hardware and package versions, run time and memory, the config."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

import kidney_seg
from kidney_seg.environment import PACKAGES, describe_environment, git_commit
from kidney_seg.report.common import DASH, esc, fmt, note, read_csv_or_none

# ---------------------------------------------------------------- data and split


def config_text(config: dict) -> str:
    """The config as YAML (JSON if it cannot be dumped as YAML)."""
    try:
        import yaml

        return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True)
    except Exception:
        return json.dumps(config, indent=2, default=str, ensure_ascii=False)


def dataset_source(config: dict) -> str:
    """The dataset source named in the config, or 'unknown'."""
    ds = config.get("dataset") if isinstance(config, dict) else None
    if isinstance(ds, dict):
        for key in ("source", "name", "variant"):
            if ds.get(key) is not None:
                return str(ds[key])
    elif ds is not None:
        return str(ds)
    for key in ("data_source", "source"):
        if isinstance(config, dict) and config.get(key) is not None:
            return str(config[key])
    return "unknown"


def split_sizes(split_csv: str | os.PathLike | None) -> dict[str, int] | None:
    """Case counts per subset in split.csv, or None when unavailable."""
    split = read_csv_or_none(split_csv)
    if split is None or "subset" not in split.columns:
        return None
    if "case_id" in split.columns:
        split = split.drop_duplicates("case_id")
    counts = split["subset"].astype(str).value_counts()
    order = [s for s in ("train", "val", "test") if s in counts.index] + sorted(
        s for s in counts.index if s not in ("train", "val", "test")
    )
    return {s: int(counts[s]) for s in order}


def split_folds(split_csv: str | os.PathLike | None) -> int | None:
    """Number of cross-validation folds in split.csv (its ``fold`` column), or None without one."""
    split = read_csv_or_none(split_csv, dtype=str, keep_default_na=False)
    if split is None or "fold" not in split.columns:
        return None
    folds = {f for f in split["fold"].astype(str) if f.strip()}
    return len(folds) or None


# ---------------------------------------------------------------- run time and memory


def find_benchmarks(benchmark_dir: str | os.PathLike) -> list[Path]:
    """The Snakemake benchmark TSVs written so far under ``benchmark_dir``."""
    root = Path(benchmark_dir)
    return sorted(root.rglob("*.tsv")) if root.is_dir() else []


def benchmark_inputs(benchmark_files: str | os.PathLike | list | None) -> tuple[list, Path | None]:
    """(TSV paths, root folder or None) of a folder of benchmarks (searched) or a list of TSV paths."""
    if benchmark_files is not None and not isinstance(benchmark_files, (list, tuple)):
        root = Path(benchmark_files)
        return find_benchmarks(root), root
    return list(benchmark_files or []), None


def benchmark_job(path: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[str, str]:
    """(rule, job label) of a benchmark file: ``<root>/<rule>.tsv`` or ``<root>/<rule>/<wildcards>.tsv``.

    Without ``root`` the rule is the file's folder, or its name when the folder is
    called ``benchmarks`` (Snakemake's usual layout).
    """
    p = Path(path)
    if root is not None:
        try:
            parts = p.relative_to(root).with_suffix("").parts
        except ValueError:
            parts = ()
        if parts:
            return parts[0], "/".join(parts)
    if p.parent.name in ("", "benchmarks"):
        return p.stem, p.stem
    return p.parent.name, f"{p.parent.name}/{p.stem}"


def benchmark_row(path: str | os.PathLike, root: str | os.PathLike | None = None) -> dict:
    """Rule, job, run time (s, h:m:s) and peak RSS/VMS (MB) from one Snakemake benchmark TSV."""
    rule, label = benchmark_job(path, root)
    row = {"rule": rule, "label": label, "s": np.nan, "hms": "", "max_rss": np.nan, "max_vms": np.nan, "repeats": 0}
    try:
        df = pd.read_csv(path, sep="\t")
    except Exception:
        row["hms"] = "unreadable"
        return row
    if df.empty:
        return row
    row["repeats"] = len(df)
    for col in ("s", "max_rss", "max_vms"):
        if col in df.columns:
            v = pd.to_numeric(df[col], errors="coerce")
            row[col] = float(v.mean() if col == "s" else v.max())
    if "h:m:s" in df.columns:
        row["hms"] = str(df["h:m:s"].iloc[0])
    return row


def rule_totals(rows: list[dict]) -> list[dict]:
    """Per rule: jobs, total and max run time (s), max peak RSS (MB); NaN-aware (all-NaN -> NaN)."""
    out = []
    for rule in sorted({r["rule"] for r in rows}):
        mine = [r for r in rows if r["rule"] == rule]
        s = np.array([r["s"] for r in mine], float)
        rss = np.array([r["max_rss"] for r in mine], float)
        out.append(
            {
                "rule": rule,
                "jobs": len(mine),
                "total_s": float(np.nansum(s)) if np.isfinite(s).any() else np.nan,
                "max_s": float(np.nanmax(s)) if np.isfinite(s).any() else np.nan,
                "max_rss": float(np.nanmax(rss)) if np.isfinite(rss).any() else np.nan,
            }
        )
    return out


def benchmarks_table(benchmark_files, root: str | os.PathLike | None = None) -> str:
    """Run time and peak memory per rule (jobs, total, max) and per job (collapsed)."""
    if not benchmark_files:
        return note("No benchmark files given.")
    rows = [benchmark_row(f, root) for f in benchmark_files]
    totals = rule_totals(rows)
    agg = "".join(
        f'<tr data-rule="{esc(t["rule"])}"><td class=txt>{esc(t["rule"])}</td><td>{t["jobs"]}</td>'
        f"<td>{fmt(t['total_s'], 1)}</td><td>{fmt(t['max_s'], 1)}</td><td>{fmt(t['max_rss'], 1)}</td></tr>"
        for t in totals
    )
    body = "".join(
        f"<tr><td class=txt>{esc(r['label'])}</td><td>{fmt(r['s'], 1)}</td><td class=txt>{esc(r['hms'])}</td>"
        f"<td>{fmt(r['max_rss'], 1)}</td><td>{fmt(r['max_vms'], 1)}</td><td>{r['repeats']}</td></tr>"
        for r in rows
    )
    total = float(np.nansum([r["s"] for r in rows])) if rows else 0.0
    return (
        '<table class="sortable rule-totals"><thead><tr><th class=txt>Rule</th><th>Jobs</th><th>Total run time (s)</th>'
        f"<th>Longest job (s)</th><th>Max peak RSS (MB)</th></tr></thead><tbody>{agg}</tbody></table>"
        f"<p>Total run time over these {len(rows)} job(s): {fmt(total, 1)} s (summed; jobs may have run side by "
        "side).</p>"
        f"<details><summary>Every job ({len(rows)})</summary>"
        '<table class="sortable benchmarks"><thead><tr><th class=txt>Job</th><th>Run time (s)</th>'
        "<th class=txt>h:m:s</th><th>Peak RSS (MB)</th><th>Peak VMS (MB)</th><th>Rows</th></tr></thead>"
        f"<tbody>{body}</tbody></table></details>"
    )


# ---------------------------------------------------------------- hardware and software


def read_environment(path: str | os.PathLike) -> dict | None:
    """An environment.json as a dict; None when missing; {'error': ...} when unreadable."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        env = json.loads(p.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return {"error": f"{p}: unreadable ({exc})"}
    return env if isinstance(env, dict) else {"error": f"{p}: not a JSON object"}


def _fold_of(path: str | os.PathLike, index: int) -> str:
    """The fold of an environment file from a ``fold_K`` folder in its path, else its position."""
    for part in reversed(Path(path).parts):
        m = re.fullmatch(r"fold_(\d+)", part)
        if m:
            return m.group(1)
    return str(index)


def accelerators_text(env: dict) -> str:
    """Accelerators of an environment as text: 'not queried', 'none (CPU only)' or '2 x NVIDIA H200'."""
    devices = env.get("accelerators")
    err = env.get("accelerator_error")
    if devices is None:
        text = "not queried"
    elif not devices:
        text = "none (CPU only)"
    else:
        names = Counter(str(d.get("name", d)) if isinstance(d, dict) else str(d) for d in devices)
        text = ", ".join(f"{n} x {name}" if n > 1 else name for name, n in names.items())
    return f"{text} (probe failed: {err})" if err else text


def _cpus(env: dict) -> str:
    count, usable = env.get("cpu_count"), env.get("cpus_usable")
    return f"{count}" + (f" ({usable} usable)" if usable not in (None, count) else "")


def hardware_table(envs: list[tuple[str, str, dict | None]]) -> str:
    """One row per (role, source path, environment): host, CPU, memory, accelerators, backend, Python, platform."""
    rows = []
    for role, source, env in envs:
        if env is None:
            rows.append(
                f'<tr data-role="{esc(role)}"><td class=txt>{esc(role)}</td>'
                f"<td class=txt colspan=7>not recorded ({esc(source)} missing)</td></tr>"
            )
            continue
        if "error" in env:
            rows.append(
                f'<tr data-role="{esc(role)}"><td class=txt>{esc(role)}</td>'
                f"<td class=txt colspan=7>{esc(env['error'])}</td></tr>"
            )
            continue
        mem = env.get("memory_gb")
        rows.append(
            f'<tr data-role="{esc(role)}"><td class=txt>{esc(role)}</td>'
            f"<td class=txt>{esc(env.get('hostname', ''))}</td>"
            f"<td class=txt>{esc(env.get('cpu_model', ''))}</td>"
            f"<td>{DASH if env.get('cpu_count') is None else esc(_cpus(env))}</td>"
            f'<td>{fmt(mem, 1)}</td><td class="txt accel">{esc(accelerators_text(env))}</td>'
            f"<td class=txt>{esc(env.get('keras_backend', ''))}</td>"
            f"<td class=txt>{esc(env.get('python', ''))}<br>"
            f"<span class=muted>{esc(env.get('platform', ''))}</span></td>"
            "</tr>"
        )
    return (
        '<table class="hardware"><thead><tr><th class=txt>Where</th><th class=txt>Host</th><th class=txt>CPU</th>'
        "<th>CPUs</th><th>Memory (GB)</th><th class=txt>Accelerators</th><th class=txt>Keras backend</th>"
        f"<th class=txt>Python, platform</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def packages_table(envs: list[tuple[str, str, dict | None]]) -> str:
    """Package versions: one row per package, one column per environment that recorded them."""
    have = [(role, env) for role, _, env in envs if env and isinstance(env.get("packages"), dict)]
    if not have:
        return note("No package versions recorded.")
    names = [p for p in PACKAGES if any(p in env["packages"] for _, env in have)]
    names += sorted({p for _, env in have for p in env["packages"]} - set(names))
    head = "".join(f"<th class=txt>{esc(role)}</th>" for role, _ in have)
    body = "".join(
        f'<tr data-package="{esc(p)}"><td class=txt>{esc(p)}</td>'
        + "".join(f"<td class=txt>{esc(env['packages'].get(p, '')) or DASH}</td>" for _, env in have)
        + "</tr>"
        for p in names
    )
    return (
        f'<table class="packages"><thead><tr><th class=txt>Package</th>{head}</tr></thead><tbody>{body}</tbody></table>'
    )


def git_text(workflow_dir: str | os.PathLike | None) -> str:
    """The workflow directory's git commit and whether its tracked files were modified, as HTML."""
    if workflow_dir is None:
        return '<li class="git">Workflow git commit: not recorded (no workflow directory given)</li>'
    info = git_commit(workflow_dir)
    if info is None:
        return (
            f'<li class="git">Workflow git commit: none (<code>{esc(workflow_dir)}</code> is not a git '
            "work tree, or git is not installed)</li>"
        )
    state = {True: "modified (uncommitted changes to tracked files)", False: "clean", None: "unknown"}[info["dirty"]]
    branch = f" on branch <code>{esc(info['branch'])}</code>" if info.get("branch") else ""
    return (
        f'<li class="git" data-commit="{esc(info["commit"])}" data-dirty="{str(info["dirty"]).lower()}">'
        f"Workflow git commit: <code>{esc(info['commit'])}</code>{branch}; working tree: <b>{esc(state)}</b> "
        f"(<code>{esc(workflow_dir)}</code>)</li>"
    )


def environments(environment_files, host: dict | None = None) -> list[tuple[str, str, dict | None]]:
    """(role, source, environment) for the report host and each training fold's environment.json."""
    out = [("report host", "this process", host if host is not None else describe_environment(accelerators=False))]
    for i, path in enumerate(environment_files or []):
        out.append((f"training, fold {_fold_of(path, i)}", str(path), read_environment(path)))
    return out


def provenance_section(
    config: dict,
    per_case: pd.DataFrame | None,
    split_csv,
    benchmark_files,
    *,
    benchmark_root=None,
    environment_files=None,
    workflow_dir=None,
    host_environment: dict | None = None,
) -> str:
    """Dataset, split sizes, git commit, hardware, package versions, benchmarks, version, date and the config."""
    n_eval = 0 if per_case is None else len(per_case)
    sizes = split_sizes(split_csv)
    folds = split_folds(split_csv)
    if sizes is None:
        split_html = note(f"No split available ({split_csv})." if split_csv else "No split given.")
    else:
        cells = "".join(f"<tr><td class=txt>{esc(k)}</td><td>{v}</td></tr>" for k, v in sizes.items())
        cells += f"<tr><td class=txt><b>total</b></td><td><b>{sum(sizes.values())}</b></td></tr>"
        split_html = (
            '<table class="split"><thead><tr><th class=txt>Subset</th><th>Cases</th></tr></thead>'
            f"<tbody>{cells}</tbody></table>"
        )
        if folds:
            split_html += f"<p>{folds}-fold cross-validation over the train and val cases.</p>"
    ds = config.get("dataset") if isinstance(config.get("dataset"), dict) else {}
    root = ds.get("root")
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    facts = (
        "<ul>"
        f"<li>Dataset source: <code>{esc(dataset_source(config))}</code>"
        + (f", root <code>{esc(root)}</code>" if root else "")
        + "</li>"
        f"<li>Labelled cases in the split: {'unknown' if sizes is None else sum(sizes.values())}; "
        f"evaluated test cases: {n_eval}</li>"
        f"<li>kidney_seg version: <code>{esc(getattr(kidney_seg, '__version__', 'unknown'))}</code></li>"
        f"{git_text(workflow_dir)}"
        f"<li>Report generated: {esc(date)}</li>"
        "</ul>"
    )
    envs = environments(environment_files, host_environment)
    training = [e for e in envs[1:] if e[2] and "error" not in e[2]]
    hw_note = (
        ""
        if training
        else note("No training environment recorded (model/fold_K/environment.json): the training hardware is unknown.")
    )
    return (
        f"{facts}<h3>Split</h3>{split_html}"
        f"<h3>Hardware</h3>{hw_note}{hardware_table(envs)}"
        f"<h3>Software</h3>{packages_table(envs)}"
        f"<h3>Run time and memory</h3>{benchmarks_table(benchmark_files, benchmark_root)}"
        f'<h3>Configuration</h3><pre class="config">{esc(config_text(config))}</pre>'
    )
