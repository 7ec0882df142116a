# Phase 1b: audio to 16 kHz mono, normalised and trimmed; pictures to RGB PNG; rejects with reasons.


rule preprocess:
    input:
        table="data/processed/ingested.parquet",
        rejects="data/processed/ingest_rejects.parquet",
    output:
        audio=directory("data/processed/audio"),
        images_dir=directory("data/processed/images"),
        table="data/processed/utterances.parquet",
        images="data/processed/images.parquet",
        rejects="data/processed/rejects.parquet",
        metrics="results/metrics/preprocess.json",
    params:
        cfg=cfg_json("preprocess", "data"),
    log:
        "results/logs/preprocess.log",
    benchmark:
        "results/benchmarks/preprocess.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 8
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "mmasr preprocess --cfg {params.cfg:q} --threads {threads}"
        " --ingested {input.table} --ingest-rejects {input.rejects}"
        " --audio-dir {output.audio} --image-dir {output.images_dir} --out {output.table}"
        " --images {output.images} --rejects {output.rejects} --metrics {output.metrics} > {log} 2>&1"
