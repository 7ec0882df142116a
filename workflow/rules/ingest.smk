# Phase 1a: the corpus. The embedded demo is generated; a manifest or a TORGO tree is read as given.


rule make_demo:
    output:
        directory("data/raw/demo"),
    params:
        cfg=cfg_json("demo", "seed"),
    log:
        "results/logs/make_demo.log",
    benchmark:
        "results/benchmarks/make_demo.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    shell:
        "mmasr make-demo --cfg {params.cfg:q} --out {output} --quiet > {log} 2>&1"


rule ingest:
    input:
        corpus=corpus_input,
    output:
        table="data/processed/ingested.parquet",
        rejects="data/processed/ingest_rejects.parquet",
    params:
        cfg=cfg_json("data"),
    log:
        "results/logs/ingest.log",
    benchmark:
        "results/benchmarks/ingest.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    shell:
        "mmasr ingest --cfg {params.cfg:q} --demo-dir data/raw/demo"
        " --out {output.table} --rejects {output.rejects} > {log} 2>&1"
