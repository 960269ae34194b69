rule train:
    input:
        split=f"{RESULTS}/split.csv",
        train=preprocessed(TRAIN),
        val=preprocessed(VAL),
        fingerprint=fingerprint,
        code=library("model.py", "losses.py", "sampling.py", "training.py", "config.py"),
    output:
        model=f"{RESULTS}/model/model.keras",
        history=f"{RESULTS}/model/history.csv",
        settings=f"{RESULTS}/model/inference.json",
        curves=f"{RESULTS}/model/curves.png",
    params:
        model=config["model"],
        training=config["training"],
        preprocessing=PREPROCESSING,
        labels=LABELS,
        seed=config["seed"],
        checkpoint_dir=f"{RESULTS}/model/checkpoint",
    threads: workflow.cores
    resources:
        gpu=1,
    log:
        f"{RESULTS}/logs/train.log",
    benchmark:
        f"{RESULTS}/benchmarks/train.tsv"
    conda:
        "../envs/gpu.yaml"
    script:
        "../workflow_scripts/train.py"
