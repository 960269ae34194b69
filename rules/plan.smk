# The plan: the resolved preprocessing (with the training set's intensity fingerprint
# folded in where the config needs it), labels, class names, patch size and output
# activation, which preprocess, train and predict all read.
rule plan:
    input:
        fingerprint=fingerprint,
        code=code_of("plan"),
    output:
        PLAN,
    log:
        f"{RESULTS}/logs/plan.log",
    benchmark:
        f"{RESULTS}/benchmarks/plan.tsv"
    conda:
        "../envs/core.yaml"
    params:
        config=PLAN_INPUTS,
    script:
        "../workflow_scripts/plan.py"
