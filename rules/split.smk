rule split:
    input:
        code=library("split.py"),
    output:
        f"{RESULTS}/split.csv",
    params:
        cases=CASES,
        fractions=config["split"]["fractions"],
        seed=config["split"]["seed"],
        folds=config["split"]["folds"],
    log:
        f"{RESULTS}/logs/split.log",
    benchmark:
        f"{RESULTS}/benchmarks/split.tsv"
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/split.py"
