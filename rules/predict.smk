# The output is the prediction's record; the NIfTIs beside it exist only for a usable case
# (rules/check.smk says why they are not declared outputs): the labels on the scan's grid and
# on the plan's grid ({case}.plan_grid.nii.gz, the argmax there, no round trip; the record
# holds that grid's crop box, shape and spacing, and the case's uncertainty summary).
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
    threads: predict_threads
    resources:
        gpu=1,
    params:
        prediction=f"{RESULTS}/raw_predictions/{{case}}.nii.gz",
        plan_grid_prediction=f"{RESULTS}/raw_predictions/{{case}}.plan_grid.nii.gz",
        # written only with inference.uncertainty_map: true
        uncertainty_map=f"{RESULTS}/raw_predictions/{{case}}.uncertainty.nii.gz",
        inference=config["inference"],
        seed=config["seed"],
        deterministic=config["deterministic"],
        allow_cpu=config["allow_cpu"],
    script:
        "../workflow_scripts/predict.py"
