rule fingerprint:
    input:
        checks=training_checks,
        images=training_images,
        labels=training_labels,
        code=code_of("fingerprint"),
    output:
        f"{RESULTS}/fingerprint.json",
    log:
        f"{RESULTS}/logs/fingerprint.log",
    benchmark:
        f"{RESULTS}/benchmarks/fingerprint.tsv"
    conda:
        "../envs/core.yaml"
    params:
        cases=TRAIN,
        seed=config["seed"],
    script:
        "../workflow_scripts/fingerprint.py"


# meta.json is the slice cache's record; the arrays beside it exist only for a usable case
# (rules/check.smk says why they are not declared outputs).
rule preprocess:
    input:
        image=raw_image,
        label=raw_label,
        check=f"{RESULTS}/checks/{{case}}.json",
        plan=PLAN,
        code=code_of("preprocess"),
    output:
        meta=f"{RESULTS}/preprocessed/{{case}}/meta.json",
    log:
        f"{RESULTS}/logs/preprocess/{{case}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/preprocess/{{case}}.tsv"
    conda:
        "../envs/core.yaml"
    params:
        image=f"{RESULTS}/preprocessed/{{case}}/image.npy",
        label=f"{RESULTS}/preprocessed/{{case}}/label.npy",
    script:
        "../workflow_scripts/preprocess.py"
