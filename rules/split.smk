# Writes the split made once at parse time (common.smk's SPLIT, which the DAG needs).
rule split:
    input:
        code=code_of("split"),
    output:
        f"{RESULTS}/split.csv",
    params:
        split=SPLIT.to_dict("list"),
    log:
        f"{RESULTS}/logs/split.log",
    benchmark:
        f"{RESULTS}/benchmarks/split.tsv"
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/split.py"
