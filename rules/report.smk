rule report:
    input:
        per_case=f"{RESULTS}/metrics/per_case.csv",
        summary=f"{RESULTS}/metrics/summary.csv",
        history=expand(f"{RESULTS}/model/fold_{{fold}}/history.csv", fold=FOLDS),
        postprocessing=f"{RESULTS}/model/postprocessing.json",
        split=f"{RESULTS}/split.csv",
        code=library("report/__init__.py", "report/html.py"),
    output:
        f"{RESULTS}/report.html",
    params:
        config=config,
        benchmark_dir=f"{RESULTS}/benchmarks",
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    conda:
        "../envs/core.yaml"
    script:
        "../workflow_scripts/report.py"
