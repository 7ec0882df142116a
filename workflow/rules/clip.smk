# Phase 2: the random-init demo models (trained by pretrain.smk), CLIP picture embeddings, cached once;
# and (phase 4a) each hypothesis's CLIP cosine.


rule build_demo_models:
    input:
        manifest="data/processed/manifest.parquet",  # sizes the decoder positions and window (demo/sizing.py)
    output:
        whisper=directory("results/checkpoints/demo/init/whisper"),
        clip=directory("results/checkpoints/demo/init/clip"),
    params:
        cfg=cfg_json("demo_models", "seed"),
    log:
        "results/logs/build_demo_models.log",
    benchmark:
        "results/benchmarks/build_demo_models.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "mmasr build-demo-models --cfg {params.cfg:q} --manifest {input.manifest} --out results/checkpoints/demo/init"
        " > {log} 2>&1"


rule cache_image_embeddings:
    input:
        manifest="data/processed/manifest.parquet",
        images="data/processed/images.parquet",
        images_dir="data/processed/images",  # the picture files images.parquet names
        model=model_input("clip"),
    output:
        embeddings="data/cache/clip_image_embeddings.npz",
        meta="data/cache/clip_image_embeddings.npz.json",
        rejects="data/cache/clip_image_rejects.parquet",
    params:
        cfg=cfg_json("images", *model_cfg("clip")),
    log:
        "results/logs/cache_image_embeddings.log",
    benchmark:
        "results/benchmarks/cache_image_embeddings.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=1,
    shell:
        "MMASR_THREADS={threads} mmasr cache-images --cfg {params.cfg:q} --manifest {input.manifest} --images {input.images}"
        " --out {output.embeddings} --rejects {output.rejects} --quiet > {log} 2>&1"


rule clip_text_scores:
    input:
        nbest="data/nbest/asr_nbest.parquet",
        manifest="data/processed/manifest.parquet",
        embeddings="data/cache/clip_image_embeddings.npz",
        model=model_input("clip"),
    output:
        nbest="data/nbest/nbest.parquet",
        # The distinct hypothesis texts' CLIP embeddings: fuse scores them against other utterances'
        # pictures for the picture-swap control (no model in fuse, no new column in nbest.parquet).
        text_embeddings="data/cache/clip_text_embeddings.npz",
    params:
        cfg=cfg_json("text", *model_cfg("clip")),
    log:
        "results/logs/clip_text_scores.log",
    benchmark:
        "results/benchmarks/clip_text_scores.tsv"
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
