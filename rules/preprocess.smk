rule fingerprint:
    input:
        images=[CASE[c].image for c in TRAIN],
        labels=[CASE[c].label for c in TRAIN],
        code=library("preprocessing.py"),
    output:
        f"{RESULTS}/fingerprint.json",
    params:
        cases=TRAIN,
        seed=config["seed"],
    log:
        f"{RESULTS}/logs/fingerprint.log",
    benchmark:
        f"{RESULTS}/benchmarks/fingerprint.tsv"
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/fingerprint.py"


rule preprocess:
    input:
        image=raw_image,
        label=raw_label,
        fingerprint=fingerprint,
        code=library("preprocessing.py"),
    output:
        image=f"{RESULTS}/preprocessed/{{case}}/image.npy",
        label=f"{RESULTS}/preprocessed/{{case}}/label.npy",
        meta=f"{RESULTS}/preprocessed/{{case}}/meta.json",
    params:
        preprocessing=PREPROCESSING,
        labels=LABELS,
    log:
        f"{RESULTS}/logs/preprocess/{{case}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/preprocess/{{case}}.tsv"
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/preprocess.py"
