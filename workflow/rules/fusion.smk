# Phase 4: fuse ASR and CLIP scores, grid-search alpha on dev, report test WER.


rule fuse:
    input:
        nbest="data/nbest/nbest.parquet",
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
