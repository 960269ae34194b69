# Writes the split made once at parse time (common.smk's SPLIT, which the DAG needs).
rule split:
    input:
        code=code_of("split"),
    output:
        f"{RESULTS}/split.csv",
    log:
        f"{RESULTS}/logs/split.log",
    benchmark:
        f"{RESULTS}/benchmarks/split.tsv"
    conda:
        "../envs/core.yaml"
    params:
        split=SPLIT.to_dict("list"),
    script:
        "../workflow_scripts/split.py"
