# Phase 4: each hypothesis's LM score; fuse ASR, CLIP and LM scores, weights searched on dev, test WER.


rule lm_scores:
    input:
        nbest="data/nbest/nbest.parquet",
        model=model_input("lm") if config["fusion"]["lm_enabled"] else [],
    output:
        nbest="data/nbest/nbest_lm.parquet",
        cache="data/cache/lm_text_scores.npz",  # each distinct hypothesis text's score, once
    params:
        cfg=cfg_json(*LM_SCORE_KEYS, *model_cfg("lm")),
    log:
        "results/logs/lm_scores.log",
    benchmark:
        "results/benchmarks/lm_scores.tsv"
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


rule fuse:
    input:
        nbest="data/nbest/nbest_lm.parquet",
        manifest="data/processed/manifest.parquet",
        image_embeddings="data/cache/clip_image_embeddings.npz",  # picture-swap control
        text_embeddings="data/cache/clip_text_embeddings.npz",
    output:
        grid="results/fusion/grid.csv",
        per_speaker="results/fusion/per_speaker.csv",
        changed="results/fusion/changed.parquet",
        metrics="results/metrics/fusion.json",
    params:
        cfg=cfg_json("fusion", "text", "seed", "nbest", "models.whisper", "models.clip"),
    log:
        "results/logs/fuse.log",
    benchmark:
        "results/benchmarks/fuse.tsv"
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
        " --text-embeddings {input.text_embeddings} > {log} 2>&1"
