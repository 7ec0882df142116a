# Phase 1c: speaker-disjoint train/dev/test splits -> the manifest every later stage reads.


rule split:
    input:
        "data/processed/utterances.parquet",
    output:
        manifest="data/processed/manifest.parquet",
        summary="results/metrics/split.json",
    params:
        cfg=cfg_json("split", "seed"),
    log:
        "results/logs/split.log",
    benchmark:
        "results/benchmarks/split.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "mmasr split --cfg {params.cfg:q} --utterances {input} --out {output.manifest}"
        " --summary {output.summary} > {log} 2>&1"
