rule download:
    output:
        image=f"{RAW}/{{case}}/imaging.nii.gz",
        label=f"{RAW}/{{case}}/segmentation.nii.gz",
    input:
        code=library("data/sources.py", "data/phantom.py"),
    params:
        dataset=config["dataset"],
        seed=config["seed"],
    log:
        f"{RESULTS}/logs/download/{{case}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/download/{{case}}.tsv"
    conda:
        "../envs/core.yaml"
    resources:
        downloads=1,
    script:
        "../workflow_scripts/download.py"
