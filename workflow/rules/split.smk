# Phase 1c: speaker-disjoint train/dev/test splits -> the manifest every later stage reads. With
# split.disjoint_text, dev/test utterances whose normalised transcript (the normaliser's text keys) occurs in
# train (with partition: also train utterances of held-out prompts), and with split.disjoint_picture those
# whose picture occurs in train, are moved out of the manifest into the split report, excluded.parquet
# (which exists, empty, when both are off).


rule split:
    input:
        "data/processed/utterances.parquet",
    output:
        manifest="data/processed/manifest.parquet",
        summary="results/metrics/split.json",
        excluded="results/split/excluded.parquet",
    params:
        cfg=cfg_json("split", "seed", *TEXT_NORM_KEYS),
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
        " --summary {output.summary} --excluded {output.excluded} > {log} 2>&1"
