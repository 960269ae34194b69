rule decide_postprocessing:
    input:
        predictions=validation_predictions,
        labels=validation_labels,
        code=code_of("decide_postprocessing"),
    output:
        f"{RESULTS}/model/postprocessing.json",
    log:
        f"{RESULTS}/logs/decide_postprocessing.log",
    benchmark:
        f"{RESULTS}/benchmarks/decide_postprocessing.tsv"
    conda:
        "../envs/core.yaml"
    params:
        settings=config["postprocessing"],
        labels=LABELS,
    script:
        "../workflow_scripts/decide_postprocessing.py"


# Records in and out, the NIfTI predictions beside them (rules/check.smk says why): the
# decided steps are applied to the scan-grid and to the plan-grid labels alike, and the
# record gets the case's QC flags (kidney_seg/quality.py) with the raw record's uncertainty.
rule postprocess:
    input:
        prediction=f"{RESULTS}/raw_predictions/{{case}}.json",
        check=f"{RESULTS}/checks/{{case}}.json",
        decision=f"{RESULTS}/model/postprocessing.json",
        qc_reference=f"{RESULTS}/model/qc_reference.json",
        code=code_of("postprocess"),
    output:
        f"{RESULTS}/predictions/{{case}}.json",
    log:
        f"{RESULTS}/logs/postprocess/{{case}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/postprocess/{{case}}.tsv"
    conda:
        "../envs/core.yaml"
    params:
        prediction=f"{RESULTS}/predictions/{{case}}.nii.gz",
        plan_grid_prediction=f"{RESULTS}/predictions/{{case}}.plan_grid.nii.gz",
        labels=LABELS,
    script:
        "../workflow_scripts/postprocess.py"
