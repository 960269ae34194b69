rule report:
    input:
        per_case=f"{RESULTS}/metrics/per_case.csv",
        summary=f"{RESULTS}/metrics/summary.csv",
        history=expand(f"{RESULTS}/model/fold_{{fold}}/history.csv", fold=FOLDS),
        postprocessing=f"{RESULTS}/model/postprocessing.json",
        split=f"{RESULTS}/split.csv",
        # the test cases' scans, ground truth and prediction records, for the best/median/worst overlays
        scans=test_scans,
        failures=f"{RESULTS}/failures.csv",
        # each fold's training hardware and software (written by the train rule)
        environments=expand(f"{RESULTS}/model/fold_{{fold}}/environment.json", fold=FOLDS),
        code=code_of("report"),
    output:
        report(f"{RESULTS}/report.html", caption="../report/report.rst", category="Report"),
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    conda:
        "../envs/core.yaml"
    params:
        config=config,
        cases=TEST,
        labels=LABELS,
        benchmark_dir=f"{RESULTS}/benchmarks",
        # the workflow's folder, for its git commit (a function: a plain path trips the linter's prefix check)
        workflow_dir=lambda wildcards: workflow.basedir,
    script:
        "../workflow_scripts/report.py"
