# Phase 3: Whisper n-best lists, scattered over nbest.shards independent jobs and gathered.


rule nbest:
    input:
        manifest="data/processed/manifest.parquet",
        audio="data/processed/audio",
        model=model_input("whisper"),
        **({"states": STATES} if NBEST_STATES else {}),  # encode_audio's pass: no second encoder pass
    output:
        "data/nbest/shards/{shard}-of-{n}.parquet",
    wildcard_constraints:
        shard=r"\d+",
        n=r"\d+",
    params:
        cfg=cfg_json("nbest", "text", *model_cfg("whisper")),
        states=lambda wildcards, input: f"--states {input.states}" if NBEST_STATES else "",
    log:
        "results/logs/nbest/{shard}-of-{n}.log",
    benchmark:
        "results/benchmarks/nbest/{shard}-of-{n}.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    retries: 1
    shell:
        "MMASR_THREADS={threads} mmasr nbest --cfg {params.cfg:q} --manifest {input.manifest}"
        " --shard {wildcards.shard} --num-shards {wildcards.n} --out {output} {params.states} --quiet > {log} 2>&1"


rule nbest_merge:
    input:
        NBEST_SHARDS,
    output:
        "data/nbest/asr_nbest.parquet",
    log:
        "results/logs/nbest_merge.log",
    benchmark:
        "results/benchmarks/nbest_merge.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "mmasr nbest-merge {input} --out {output} > {log} 2>&1"
