# The output is the prediction's record; the NIfTI beside it exists only for a usable case
# (rules/check.smk says why it is not a declared output).
rule predict:
    input:
        image=raw_image,
        check=f"{RESULTS}/checks/{{case}}.json",
        models=predicting_models,
        plan=PLAN,
        code=code_of("predict"),
    output:
        f"{RESULTS}/raw_predictions/{{case}}.json",
    log:
        f"{RESULTS}/logs/predict/{{case}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/predict/{{case}}.tsv"
    conda:
        "../envs/gpu.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        prediction=f"{RESULTS}/raw_predictions/{{case}}.nii.gz",
        inference=config["inference"],
        seed=config["seed"],
        deterministic=config["deterministic"],
    script:
        "../workflow_scripts/predict.py"
