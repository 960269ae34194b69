# The training cases' range (kidney and tumour volumes, spacing, field of view) and the QC
# settings, beside the models: the postprocess rule and `kidney-seg predict` flag each
# prediction against it (kidney_seg/quality.py).
rule qc_reference:
    input:
        metas=preprocessed(TRAIN + VAL),
        # their uncertainty sets the threshold when qc.max_uncertainty is null
        validation=validation_predictions,
        code=code_of("qc_reference"),
    output:
        f"{RESULTS}/model/qc_reference.json",
    log:
        f"{RESULTS}/logs/qc_reference.log",
    benchmark:
        f"{RESULTS}/benchmarks/qc_reference.tsv"
    conda:
        "../envs/core.yaml"
    params:
        settings=config["qc"],
    script:
        "../workflow_scripts/qc_reference.py"
