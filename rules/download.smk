# One job per case (the phantom: its image and label are generated together) or per file (KiTS:
# cases download in parallel, the label checked against its image). A local dataset is read where
# it lies: no rule may ever produce (or delete) a user's own files.
# Only the phantom's files depend on library code (the generator the script runs); downloaded
# files never go stale.
# Downloads use https; dataset.allow_http (plain http to a loopback test server) is read by the
# scripts from the config, not passed as a param: a params change reruns a job, and toggling the
# override must not download the files again.


if DOWNLOAD_SETTINGS["source"] == "phantom":

    rule generate_phantom:
        input:
            code=code_of("generate_phantom"),
        output:
            image=f"{RAW}/{{case}}/imaging.nii.gz",
            label=f"{RAW}/{{case}}/segmentation.nii.gz",
        log:
            f"{RESULTS}/logs/generate_phantom/{{case}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/generate_phantom/{{case}}.tsv"
        conda:
            "../envs/core.yaml"
        params:
            dataset=DOWNLOAD_SETTINGS,
            seed=config["seed"],
        script:
            "../workflow_scripts/generate_phantom.py"

elif DOWNLOAD_SETTINGS["source"] != "local":

    rule download_image:
        output:
            f"{RAW}/{{case}}/imaging.nii.gz",
        log:
            f"{RESULTS}/logs/download_image/{{case}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/download_image/{{case}}.tsv"
        conda:
            "../envs/core.yaml"
        resources:
            downloads=1,
        params:
            dataset=DOWNLOAD_SETTINGS,
            seed=config["seed"],
        script:
            "../workflow_scripts/download.py"

    rule download_label:
        input:
            image=raw_image,
        output:
            f"{RAW}/{{case}}/segmentation.nii.gz",
        log:
            f"{RESULTS}/logs/download_label/{{case}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/download_label/{{case}}.tsv"
        conda:
            "../envs/core.yaml"
        resources:
            downloads=1,
        params:
            dataset=DOWNLOAD_SETTINGS,
            seed=config["seed"],
        script:
            "../workflow_scripts/download.py"
