# Phase 5c: a calibrated probe. Pooled multi-layer embeddings of every utterance from the frozen audio
# encoder (layer_embeddings; read from encode_audio's pass when it is the same encoder), then a classifier of a manifest label (probe.label, default group) with
# probabilities calibrated in speaker-grouped folds, evaluated on held-out speakers (train_probe); beside it the
# same probe on five plain signal features of the processed audio (duration, speech rate, RMS, SNR, centroid).


rule layer_embeddings:
    input:
        manifest="data/processed/manifest.parquet",
        **audio_encoder_inputs(),  # the shared encoder pass, or the audio and the encoder (common.smk)
    output:
        embeddings="data/cache/layer_embeddings.npz",
        meta="data/cache/layer_embeddings.npz.json",
    params:
        cfg=cfg_json("probe.layers", "probe.encode_batch_size", *model_cfg("audio_encoder")),
        pooled=pooled_option,
    log:
        "results/logs/layer_embeddings.log",
    benchmark:
        "results/benchmarks/layer_embeddings.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=1,
    shell:
        "MMASR_THREADS={threads} mmasr layer-embeddings --cfg {params.cfg:q} --manifest {input.manifest}"
        " --out {output.embeddings} {params.pooled} --quiet > {log} 2>&1"


rule train_probe:
    input:
        embeddings="data/cache/layer_embeddings.npz",
        meta="data/cache/layer_embeddings.npz.json",
        manifest="data/processed/manifest.parquet",
        audio="data/processed/audio",  # the baseline's signal features
    output:
        metrics="results/metrics/probe.json",
        reliability="results/probe/reliability.csv",
        model="results/checkpoints/probe/probe.json",
    params:
        cfg=cfg_json("probe", "seed"),
    log:
        "results/logs/train_probe.log",
    benchmark:
        "results/benchmarks/train_probe.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "MMASR_THREADS={threads} mmasr train-probe --cfg {params.cfg:q} --embeddings {input.embeddings}"
        " --manifest {input.manifest} --metrics {output.metrics} --reliability {output.reliability}"
        " --model {output.model} > {log} 2>&1"
