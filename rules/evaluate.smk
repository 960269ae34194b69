rule evaluate_case:
    input:
        prediction=f"{RESULTS}/predictions/{{case}}.nii.gz",
        label=raw_label,
        code=library("evaluation.py"),
    output:
        f"{RESULTS}/metrics/cases/{{case}}.json",
    params:
        labels=LABELS,
    log:
        f"{RESULTS}/logs/evaluate_case/{{case}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_case/{{case}}.tsv"
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/evaluate_case.py"


rule evaluate:
    input:
        cases=expand(f"{RESULTS}/metrics/cases/{{case}}.json", case=TEST),
        code=library("evaluation.py"),
    output:
        per_case=f"{RESULTS}/metrics/per_case.csv",
        summary=f"{RESULTS}/metrics/summary.csv",
    log:
        f"{RESULTS}/logs/evaluate.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate.tsv"
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/evaluate.py"
