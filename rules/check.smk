rule check_case:
    input:
        image=raw_image,
        label=label_if_any,
        code=library("data/checks.py", "preprocessing.py"),
    output:
        f"{RESULTS}/checks/{{case}}.json",
    params:
        labels=LABELS,
        on_bad_case=config["dataset"]["on_bad_case"],
    log:
        f"{RESULTS}/logs/check_case/{{case}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/check_case/{{case}}.tsv"
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/check_case.py"


# The cases that passed decide what is trained on, predicted and evaluated.
checkpoint collect_checks:
    input:
        checks=expand(f"{RESULTS}/checks/{{case}}.json", case=sorted(CASE)),
        code=library("data/checks.py"),
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
