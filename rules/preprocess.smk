rule fingerprint:
    input:
        images=usable_training_images,
        labels=usable_training_labels,
        code=library("preprocessing.py"),
    output:
        f"{RESULTS}/fingerprint.json",
    params:
        cases=usable_training_cases,
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
