# LoRA-adapted Whisper (adapt.enabled): adapters trained on the train split, then the same n-best, CLIP, LM and
# fusion stages as the zero-shot model, on the same shards, under data/nbest/adapted/ and results/fusion/adapted/.

ADAPTED = "results/checkpoints/adapt/model"
ADAPTED_SHARDS = expand("data/nbest/adapted/shards/{shard}-of-{n}.parquet", shard=range(config["nbest"]["shards"]),
                        n=config["nbest"]["shards"])


rule adapt_whisper:
    input:
        manifest="data/processed/manifest.parquet",
        audio="data/processed/audio",
        model=model_input("whisper"),
    output:
        model=directory(ADAPTED),
        log_csv="results/adapt/train_log.csv",
        metrics="results/metrics/adapt.json",
    params:
        cfg=cfg_json("adapt", "seed", "nbest", *model_cfg("whisper")),
        # Not an output: Snakemake keeps it when the job fails, so a killed run resumes (--resume).
        state="results/checkpoints/adapt/state",
    log:
        "results/logs/adapt_whisper.log",
    benchmark:
        "results/benchmarks/adapt_whisper.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=1,
    shell:
        "MMASR_THREADS={threads} mmasr adapt-whisper --cfg {params.cfg:q} --manifest {input.manifest}"
        " --out {output.model} --log-csv {output.log_csv} --metrics {output.metrics}"
        " --state-dir {params.state} --resume --quiet > {log} 2>&1"


rule nbest_adapted:
    input:
        manifest="data/processed/manifest.parquet",
        audio="data/processed/audio",
        model=ADAPTED,
    output:
        "data/nbest/adapted/shards/{shard}-of-{n}.parquet",
    wildcard_constraints:
        shard=r"\d+",
        n=r"\d+",
    params:
        cfg=cfg_json("nbest", "text", *model_cfg("whisper")),
    log:
        "results/logs/nbest_adapted/{shard}-of-{n}.log",
    benchmark:
        "results/benchmarks/nbest_adapted/{shard}-of-{n}.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    retries: 1
    shell:
        "MMASR_THREADS={threads} mmasr nbest --cfg {params.cfg:q} --manifest {input.manifest} --model {input.model}"
        " --shard {wildcards.shard} --num-shards {wildcards.n} --out {output} --quiet > {log} 2>&1"


rule nbest_merge_adapted:
    input:
        ADAPTED_SHARDS,
    output:
        "data/nbest/adapted/asr_nbest.parquet",
    log:
        "results/logs/nbest_merge_adapted.log",
    benchmark:
        "results/benchmarks/nbest_merge_adapted.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "mmasr nbest-merge {input} --out {output} > {log} 2>&1"


rule clip_text_scores_adapted:
    input:
        nbest="data/nbest/adapted/asr_nbest.parquet",
        manifest="data/processed/manifest.parquet",
        embeddings="data/cache/clip_image_embeddings.npz",
        model=model_input("clip"),
    output:
        nbest="data/nbest/adapted/nbest.parquet",
        text_embeddings="data/cache/adapted/clip_text_embeddings.npz",
    params:
        cfg=cfg_json("text", *model_cfg("clip")),
    log:
        "results/logs/clip_text_scores_adapted.log",
    benchmark:
        "results/benchmarks/clip_text_scores_adapted.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=1,
    shell:
        "MMASR_THREADS={threads} mmasr clip-scores --cfg {params.cfg:q} --nbest {input.nbest} --manifest {input.manifest}"
        " --embeddings {input.embeddings} --out {output.nbest} --text-embeddings {output.text_embeddings}"
        " --quiet > {log} 2>&1"


rule lm_scores_adapted:
    input:
        nbest="data/nbest/adapted/nbest.parquet",
        model=model_input("lm") if config["fusion"]["lm_enabled"] else [],
    output:
        nbest="data/nbest/adapted/nbest_lm.parquet",
        cache="data/cache/adapted/lm_text_scores.npz",
    params:
        cfg=cfg_json(*LM_SCORE_KEYS, *model_cfg("lm")),
    log:
        "results/logs/lm_scores_adapted.log",
    benchmark:
        "results/benchmarks/lm_scores_adapted.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=30,
        gpu=1,
    shell:
        "MMASR_THREADS={threads} mmasr lm-scores --cfg {params.cfg:q} --nbest {input.nbest} --out {output.nbest}"
        " --cache {output.cache} --quiet > {log} 2>&1"


rule fuse_adapted:
    input:
        nbest="data/nbest/adapted/nbest_lm.parquet",
        manifest="data/processed/manifest.parquet",
        image_embeddings="data/cache/clip_image_embeddings.npz",
        text_embeddings="data/cache/adapted/clip_text_embeddings.npz",
        reference="data/nbest/asr_nbest.parquet",  # the zero-shot n-best: adapted ASR-only vs zero-shot ASR-only
    output:
        grid="results/fusion/adapted/grid.csv",
        per_speaker="results/fusion/adapted/per_speaker.csv",
        changed="results/fusion/adapted/changed.parquet",
        metrics="results/metrics/fusion_adapted.json",
    params:
        cfg=cfg_json("fusion", "text", "seed", "nbest", "models.whisper", "models.clip"),
    log:
        "results/logs/fuse_adapted.log",
    benchmark:
        "results/benchmarks/fuse_adapted.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "mmasr fuse --cfg {params.cfg:q} --nbest {input.nbest} --manifest {input.manifest}"
        " --grid {output.grid} --per-speaker {output.per_speaker} --changed {output.changed}"
        " --metrics {output.metrics} --image-embeddings {input.image_embeddings}"
        " --text-embeddings {input.text_embeddings} --reference-nbest {input.reference} > {log} 2>&1"
