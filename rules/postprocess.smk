rule decide_postprocessing:
    input:
        predictions=validation_predictions,
        labels=validation_labels,
        code=library("postprocessing.py", "evaluation.py"),
    output:
        f"{RESULTS}/model/postprocessing.json",
    params:
        cases=validation_cases,
        settings=config["postprocessing"],
        labels=LABELS,
    log:
        f"{RESULTS}/logs/decide_postprocessing.log",
    benchmark:
        f"{RESULTS}/benchmarks/decide_postprocessing.tsv"
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/decide_postprocessing.py"


rule postprocess:
    input:
        prediction=f"{RESULTS}/raw_predictions/{{case}}.nii.gz",
        decision=f"{RESULTS}/model/postprocessing.json",
        code=library("postprocessing.py", "evaluation.py"),
    output:
        f"{RESULTS}/predictions/{{case}}.nii.gz",
    params:
        labels=LABELS,
    log:
        f"{RESULTS}/logs/postprocess/{{case}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/postprocess/{{case}}.tsv"
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/postprocess.py"
