# Scores out in the field's formats: sclite trn files (reference, ASR-only, fused), an S/D/I table per
# speaker and group, sclite's own report where SCTK is installed, the n-best lists as HyPoradise JSON.


rule scoring:
    input:
        nbest="data/nbest/nbest_lm.parquet",
        manifest="data/processed/manifest.parquet",
        fusion="results/metrics/fusion.json",
    output:
        scoring=directory("results/scoring"),
        metrics="results/metrics/scoring.json",
    params:
        cfg=cfg_json("text", "nbest.splits"),
    log:
        "results/logs/scoring.log",
    benchmark:
        "results/benchmarks/scoring.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "mmasr score-formats --cfg {params.cfg:q} --nbest {input.nbest} --manifest {input.manifest}"
        " --fusion-metrics {input.fusion} --out {output.scoring} --metrics {output.metrics} > {log} 2>&1"
