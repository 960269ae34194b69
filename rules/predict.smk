rule predict:
    input:
        image=raw_image,
        models=predicting_models,
        code=library("inference.py", "preprocessing.py", "losses.py", "determinism.py"),
    output:
        f"{RESULTS}/raw_predictions/{{case}}.nii.gz",
    params:
        inference=config["inference"],
        seed=config["seed"],
        deterministic=config["deterministic"],
    threads: 2
    resources:
        gpu=1,
    log:
        f"{RESULTS}/logs/predict/{{case}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/predict/{{case}}.tsv"
    conda:
        "../envs/gpu.yaml"
    script:
        "../workflow_scripts/predict.py"
