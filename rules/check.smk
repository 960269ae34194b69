# The DAG is static (no checkpoint), so `snakemake -n` lists every stage on a fresh results
# folder. Every case is checked once (check_case); each per-case rule after it (preprocess,
# predict, postprocess, evaluate_case) takes the case's check record as `check` input and,
# for a case that failed, writes an exclusion record ("excluded": true, file, reason) at its
# record output instead of a result (kidney_seg.data.checks.run_unless_excluded). Those
# record outputs are JSON: the slice cache's meta.json, raw_predictions/{case}.json,
# predictions/{case}.json and metrics/cases/{case}.json. The data files (the cache's .npy
# arrays, the NIfTI predictions beside their records) exist only for usable cases, so they
# are not declared outputs: Snakemake has no optional outputs, and a placeholder NIfTI for an
# excluded case would look like a prediction. Aggregate rules (fingerprint, train,
# decide_postprocessing, evaluate, report) read the records and keep the usable cases.
# With dataset.on_bad_case: fail, check_case fails instead, naming the case and the file.
rule check_case:
    input:
        image=raw_image,
        label=label_if_any,
        code=code_of("check_case"),
    output:
        f"{RESULTS}/checks/{{case}}.json",
    log:
        f"{RESULTS}/logs/check_case/{{case}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/check_case/{{case}}.tsv"
    conda:
        "../envs/core.yaml"
    params:
        labels=LABELS,
        on_bad_case=config["dataset"]["on_bad_case"],
    script:
        "../workflow_scripts/check_case.py"


# checks.csv (every case) and failures.csv (the failed ones: the report's Failures section
# and the end-of-run message).
rule collect_checks:
    input:
        checks=checks_of(sorted(CASE)),
        code=code_of("collect_checks"),
    output:
        table=f"{RESULTS}/checks.csv",
        failures=f"{RESULTS}/failures.csv",
    log:
        f"{RESULTS}/logs/collect_checks.log",
    benchmark:
        f"{RESULTS}/benchmarks/collect_checks.tsv"
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/collect_checks.py"
