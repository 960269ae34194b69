rule evaluate_case:
    input:
        prediction=f"{RESULTS}/predictions/{{case}}.json",
        label=raw_label,
        check=f"{RESULTS}/checks/{{case}}.json",
        code=code_of("evaluate_case"),
    output:
        f"{RESULTS}/metrics/cases/{{case}}.json",
    log:
        f"{RESULTS}/logs/evaluate_case/{{case}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_case/{{case}}.tsv"
    conda:
        "../envs/core.yaml"
    params:
        # the labels and the surface-Dice tolerances (kidney_seg.vocabulary.surface_tolerances)
        source=config["dataset"]["source"],
    script:
        "../workflow_scripts/evaluate_case.py"


rule evaluate:
    input:
        cases=test_metrics,
        code=code_of("evaluate"),
    output:
        per_case=report(
            f"{RESULTS}/metrics/per_case.csv",
            caption="../report/per_case.rst",
            category="Metrics",
            labels={"table": "per case"},
        ),
        summary=report(
            f"{RESULTS}/metrics/summary.csv",
            caption="../report/summary.rst",
            category="Metrics",
            labels={"table": "summary"},
        ),
    log:
        f"{RESULTS}/logs/evaluate.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate.tsv"
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/evaluate.py"
