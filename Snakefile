# kidney-seg: a 2D U-Net for KiTS kidney and tumour segmentation, end to end.
# Run: snakemake --cores 8 --resources gpu=1   (see README.md and docs/)
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "kidney_seg/schemas/config.schema.yaml")


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/check.smk"
include: "rules/plan.smk"
include: "rules/preprocess.smk"
include: "rules/split.smk"
include: "rules/train.smk"
include: "rules/predict.smk"
include: "rules/qc.smk"
include: "rules/postprocess.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        f"{RESULTS}/report.html",
        predict_only_outputs,


onsuccess:
    report_failures(f"{RESULTS}/failures.csv")


onerror:
    report_failures(f"{RESULTS}/failures.csv")
