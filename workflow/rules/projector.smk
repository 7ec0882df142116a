# Phase 5: SLAM-ASR style projector between the frozen Whisper encoder and the frozen decoder-only LM.
# The encoder runs once per utterance (encode_audio, which also serves the probe and CLAP when they use the same
# encoder); training reads its cached outputs; evaluation
# decodes the test split and reports WER beside Whisper's ASR-only and n-best oracle WERs on the same
# utterances (from the n-best lists, so fusion settings such as tau never re-run it).

# Training reads these projector keys; decoding keys (num_beams, ...) and encoding keys must not re-train.
PROJECTOR_TRAIN_KEYS = [
    f"projector.{k}"
    for k in ("k", "hidden", "prompt", "steps", "batch_size", "grad_accum", "bucket_batches", "lr", "warmup",
              "min_lr_ratio", "weight_decay", "grad_clip", "eval_every", "eval_utts", "checkpoint_every",
              "keep_checkpoints")
]


# With one encoder for Whisper and models.audio_encoder (SHARED_ENCODER, common.smk) the same pass also writes the
# pooled hidden states of every layer that layer_embeddings and clap_embeddings read (POOLED); with
# nbest.reuse_encoder_states (NBEST_STATES) the whole window's states of the n-best splits, which nbest reads (STATES).
rule encode_audio:
    input:
        manifest="data/processed/manifest.parquet",
        audio="data/processed/audio",
        model=model_input("whisper"),
    output:
        features=directory("data/cache/encoder_features"),
        **({"pooled": POOLED} if SHARED_ENCODER else {}),
        **({"states": directory(STATES)} if NBEST_STATES else {}),
    params:
        cfg=cfg_json("projector.encode_batch_size", "projector.shard_size", *(["nbest.splits"] if NBEST_STATES else []),
                     *model_cfg("whisper", *(["audio_encoder"] if SHARED_ENCODER else []))),
        pooled=lambda wildcards, output: f"--pooled {output.pooled}" if SHARED_ENCODER else "",
        states=lambda wildcards, output: f"--states {output.states}" if NBEST_STATES else "",
    log:
        "results/logs/encode_audio.log",
    benchmark:
        "results/benchmarks/encode_audio.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=1,
    shell:
        "MMASR_THREADS={threads} mmasr encode-audio --cfg {params.cfg:q} --manifest {input.manifest}"
        " --out {output.features} {params.pooled} {params.states} --quiet > {log} 2>&1"


rule train_projector:
    input:
        features="data/cache/encoder_features",
        manifest="data/processed/manifest.parquet",
        lm=model_input("lm"),
    output:
        model=directory("results/checkpoints/projector/model"),
        log_csv="results/projector/train_log.csv",
    params:
        cfg=cfg_json("seed", *PROJECTOR_TRAIN_KEYS, *model_cfg("lm")),
        # Not an output: Snakemake keeps it when the job fails, so a killed run resumes (--resume).
        state="results/checkpoints/projector/state",
    log:
        "results/logs/train_projector.log",
    benchmark:
        "results/benchmarks/train_projector.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 2 * TRAIN_NPROC  # 2 torch threads per process
    resources:
        mem_mb=16000 * TRAIN_NPROC,  # each process loads the frozen LM
        runtime=240,
        gpu=TRAIN_NPROC,  # training.nproc: one process per GPU under torchrun (common.smk)
    shell:
        f"MMASR_THREADS={{threads}} {TRAIN_MMASR} train-projector --cfg {{params.cfg:q}}"
        " --features {input.features}"
        " --manifest {input.manifest} --out {output.model} --log-csv {output.log_csv}"
        " --state-dir {params.state} --resume --quiet > {log} 2>&1"


rule eval_projector:
    input:
        features="data/cache/encoder_features",
        manifest="data/processed/manifest.parquet",
        model="results/checkpoints/projector/model",
        nbest="data/nbest/asr_nbest.parquet",
        lm=model_input("lm"),
    output:
        hyps="results/projector/hyps.parquet",
        per_speaker="results/projector/per_speaker.csv",
        metrics="results/metrics/projector.json",
    params:
        cfg=cfg_json("seed", "text", "projector", "fusion.bootstrap_resamples", *model_cfg("lm", "whisper", "clip")),
    log:
        "results/logs/eval_projector.log",
    benchmark:
        "results/benchmarks/eval_projector.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=60,
        gpu=1,
    shell:
        "MMASR_THREADS={threads} mmasr eval-projector --cfg {params.cfg:q} --features {input.features}"
        " --manifest {input.manifest} --model {input.model} --nbest {input.nbest}"
        " --hyps {output.hyps} --per-speaker {output.per_speaker} --metrics {output.metrics} --quiet > {log} 2>&1"
