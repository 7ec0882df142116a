# Phase 2b: demo pre-training. The random-init demo models (build_demo_models -> results/checkpoints/demo/init/)
# are trained on the train split only into results/checkpoints/demo/{whisper,clip}, the folders params
# models.* name by default. When models.* name other checkpoints, nothing asks for these outputs and
# neither rule runs. The resumable state (results/checkpoints/demo/state/) is not an output: Snakemake
# does not delete it when a job fails, so a killed job resumes from its newest checkpoint when re-run.


# Only the params each pre-training reads (its own pretrain sub-section, seed, device, and the decoder
# prompt or the caption style), as JSON for `mmasr --cfg`: changing e.g. nbest.num_beams or fusion.* must
# not re-train a model (Snakemake re-runs a rule when its params change).
PRETRAIN_CFG = {
    "whisper": cfg_json("seed", "pretrain.whisper", "models.device", "nbest.language", "nbest.task"),
    "clip": cfg_json("seed", "pretrain.clip", "models.device", "text"),
    "lm": cfg_json("seed", "pretrain.lm", "models.device"),
    "text_encoder": cfg_json("seed", "pretrain.text_encoder", "models.device", *TEXT_NORM_KEYS),  # CLAP's text
}

rule pretrain_demo_whisper:
    input:
        manifest="data/processed/manifest.parquet",
        audio="data/processed/audio",
        init="results/checkpoints/demo/init/whisper",
    output:
        model=directory("results/checkpoints/demo/whisper"),
        loss="results/pretrain/whisper_loss.csv",
        metrics="results/metrics/pretrain_whisper.json",
    params:
        cfg=PRETRAIN_CFG["whisper"],
        state="results/checkpoints/demo/state/whisper",
    log:
        "results/logs/pretrain_demo_whisper.log",
    benchmark:
        "results/benchmarks/pretrain_demo_whisper.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=1,
    shell:
        "MMASR_THREADS={threads} mmasr pretrain-whisper --cfg {params.cfg:q} --init {input.init}"
        " --manifest {input.manifest} --out {output.model} --log-csv {output.loss} --metrics {output.metrics}"
        " --checkpoint-dir {params.state} --quiet > {log} 2>&1"


rule pretrain_demo_clip:
    input:
        manifest="data/processed/manifest.parquet",
        images="data/processed/images",
        init="results/checkpoints/demo/init/clip",
    output:
        model=directory("results/checkpoints/demo/clip"),
        loss="results/pretrain/clip_loss.csv",
        metrics="results/metrics/pretrain_clip.json",
    params:
        cfg=PRETRAIN_CFG["clip"],
        state="results/checkpoints/demo/state/clip",
    log:
        "results/logs/pretrain_demo_clip.log",
    benchmark:
        "results/benchmarks/pretrain_demo_clip.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=1,
    shell:
        "MMASR_THREADS={threads} mmasr pretrain-clip --cfg {params.cfg:q} --init {input.init}"
        " --manifest {input.manifest} --images-dir {input.images} --out {output.model}"
        " --log-csv {output.loss} --metrics {output.metrics} --checkpoint-dir {params.state} --quiet > {log} 2>&1"


rule pretrain_demo_lm:
    input:
        manifest="data/processed/manifest.parquet",
    output:
        model=directory("results/checkpoints/demo/lm"),
        loss="results/pretrain/lm_loss.csv",
        metrics="results/metrics/pretrain_lm.json",
    params:
        cfg=PRETRAIN_CFG["lm"],
        state="results/checkpoints/demo/state/lm",
    log:
        "results/logs/pretrain_demo_lm.log",
    benchmark:
        "results/benchmarks/pretrain_demo_lm.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
        gpu=1,
    shell:
        "MMASR_THREADS={threads} mmasr pretrain-lm --cfg {params.cfg:q} --manifest {input.manifest}"
        " --out {output.model} --log-csv {output.loss} --metrics {output.metrics}"
        " --checkpoint-dir {params.state} --quiet > {log} 2>&1"


rule pretrain_demo_text_encoder:
    input:
        manifest="data/processed/manifest.parquet",
    output:
        model=directory("results/checkpoints/demo/text_encoder"),
        loss="results/pretrain/text_encoder_loss.csv",
        metrics="results/metrics/pretrain_text_encoder.json",
    params:
        cfg=PRETRAIN_CFG["text_encoder"],
        state="results/checkpoints/demo/state/text_encoder",
    log:
        "results/logs/pretrain_demo_text_encoder.log",
    benchmark:
        "results/benchmarks/pretrain_demo_text_encoder.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
        gpu=1,
    shell:
        "MMASR_THREADS={threads} mmasr pretrain-text-encoder --cfg {params.cfg:q} --manifest {input.manifest}"
        " --out {output.model} --log-csv {output.loss} --metrics {output.metrics}"
        " --checkpoint-dir {params.state} --quiet > {log} 2>&1"
