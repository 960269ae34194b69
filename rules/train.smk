rule train:
    input:
        train=fold_training,
        val=fold_validation,
        plan=PLAN,
        code=code_of("train"),
    output:
        model=f"{RESULTS}/model/fold_{{fold}}/model.keras",
        history=f"{RESULTS}/model/fold_{{fold}}/history.csv",
        settings=f"{RESULTS}/model/fold_{{fold}}/inference.json",
        environment=f"{RESULTS}/model/fold_{{fold}}/environment.json",
        curves=report(
            f"{RESULTS}/model/fold_{{fold}}/curves.png",
            caption="../report/curves.rst",
            category="Training",
            labels={"fold": "{fold}"},
        ),
    log:
        f"{RESULTS}/logs/train/fold_{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/fold_{{fold}}.tsv"
    conda:
        "../envs/gpu.yaml"
    threads: train_threads
    resources:
        gpu=1,
    params:
        model=config["model"],
        training=config["training"],
        seed=config["seed"],
        deterministic=config["deterministic"],
        allow_cpu=config["allow_cpu"],
        checkpoint_dir=lambda wildcards: f"{model_dir(wildcards.fold)}/checkpoint",
    script:
        "../workflow_scripts/train.py"
