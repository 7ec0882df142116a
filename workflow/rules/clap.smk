# Phase 5b: CLAP-style audio-text model. Frozen audio and text encoders (models.audio_encoder,
# models.text_encoder) run once per utterance / distinct transcript (clap_embeddings; the audio half is read from
# encode_audio's pass when models.whisper is the same encoder); the projection
# heads train on that cache (train_clap; phase 2, optional, also fine-tunes the last encoder layers);
# retrieval is evaluated over the whole test split against the untrained heads and chance
# (eval_retrieval). The resumable state (results/checkpoints/clap/state/) is not an output: Snakemake
# does not delete it when a job fails, so a killed job resumes from its newest checkpoint when re-run.

# Each rule passes only the clap keys it reads: changing the evaluation keys never re-trains, changing
# training keys never re-encodes.
CLAP_EMBED_KEYS = ["clap.layers", "clap.text_pooling", "clap.encode_batch_size"]
CLAP_EVAL_KEYS = ["clap.eval_split", "clap.plot_max_k"]
CLAP_TRAIN_KEYS = [f"clap.{k}" for k in config["clap"] if f"clap.{k}" not in CLAP_EMBED_KEYS + CLAP_EVAL_KEYS]
CLAP_MODELS = model_cfg("audio_encoder", "text_encoder")
CLAP_OUT = "results/checkpoints/clap"
# Phase 2 re-encodes audio with the (fine-tuned) encoders, in training and in evaluation.
CLAP_PHASE2_INPUTS = (["data/processed/audio"] + model_input("audio_encoder") + model_input("text_encoder")
                      if config["clap"]["phase2_epochs"] > 0 else [])


rule clap_embeddings:
    input:
        manifest="data/processed/manifest.parquet",
        **audio_encoder_inputs(),  # the shared encoder pass, or the audio and the encoder (common.smk)
        text_encoder=model_input("text_encoder"),
    output:
        directory("data/cache/clap_embeddings"),
    params:
        cfg=cfg_json(*CLAP_EMBED_KEYS, *TEXT_NORM_KEYS, *CLAP_MODELS),
        pooled=pooled_option,
    log:
        "results/logs/clap_embeddings.log",
    benchmark:
        "results/benchmarks/clap_embeddings.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=1,
    shell:
        "MMASR_THREADS={threads} mmasr clap-embeddings --cfg {params.cfg:q} --manifest {input.manifest}"
        " --out {output} {params.pooled} --quiet > {log} 2>&1"


rule train_clap:
    input:
        cache="data/cache/clap_embeddings",
        phase2=CLAP_PHASE2_INPUTS,
    output:
        model=f"{CLAP_OUT}/model.safetensors",
        init=f"{CLAP_OUT}/init.safetensors",
        config=f"{CLAP_OUT}/config.json",
        log="results/clap/train_log.csv",
    params:
        cfg=cfg_json(*CLAP_TRAIN_KEYS, "seed", *CLAP_MODELS),
        out=lambda wildcards, output: os.path.dirname(output.config),
        state=f"{CLAP_OUT}/state",
    log:
        "results/logs/train_clap.log",
    benchmark:
        "results/benchmarks/train_clap.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: TRAIN_NPROC  # 1 torch thread per process
    resources:
        mem_mb=4000 * TRAIN_NPROC,
        runtime=60,
        gpu=TRAIN_NPROC,  # training.nproc: one process per GPU under torchrun (common.smk)
    shell:
        f"MMASR_THREADS={{threads}} {TRAIN_MMASR} train-clap --cfg {{params.cfg:q}}"
        " --cache {input.cache} --out {params.out}"
        " --log-csv {output.log} --checkpoint-dir {params.state} --quiet > {log} 2>&1"


rule eval_retrieval:
    input:
        cache="data/cache/clap_embeddings",
        model=f"{CLAP_OUT}/model.safetensors",
        init=f"{CLAP_OUT}/init.safetensors",
        config=f"{CLAP_OUT}/config.json",
        phase2=CLAP_PHASE2_INPUTS,
    output:
        metrics="results/metrics/retrieval.json",
        curve="results/clap/recall_at_k.csv",
    params:
        cfg=cfg_json(*CLAP_EVAL_KEYS, "seed", *CLAP_MODELS),
        checkpoint=lambda wildcards, input: os.path.dirname(input.config),
    log:
        "results/logs/eval_retrieval.log",
    benchmark:
        "results/benchmarks/eval_retrieval.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=1,
    shell:
        "MMASR_THREADS={threads} mmasr eval-retrieval --cfg {params.cfg:q} --cache {input.cache}"
        " --checkpoint {params.checkpoint} --metrics {output.metrics} --curve {output.curve} --quiet > {log} 2>&1"
