# Last phase: one self-contained HTML report (results/report.html) over the final outputs of every stage
# (FINAL_OUTPUTS in common.smk). `mmasr report` also reads the files beside them (rejects, pictures,
# loss curves, Snakemake benchmarks) and says "not run yet" for a stage whose outputs are absent.
# It shows every parameter, so it takes all of them: any params change re-runs it (and only it, when
# nothing upstream changed) - it takes seconds.


rule systems_table:
    input:
        fusion="results/metrics/fusion.json",
        adapted=["results/metrics/fusion_adapted.json"] if config["adapt"]["enabled"] else [],
    output:
        md="results/tables/systems.md",
        tex="results/tables/systems.tex",
    params:
        adapted="--adapted results/metrics/fusion_adapted.json" if config["adapt"]["enabled"] else "",
    log:
        "results/logs/systems_table.log",
    benchmark:
        "results/benchmarks/systems_table.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "mmasr systems-table --fusion {input.fusion} {params.adapted} --md {output.md} --tex {output.tex} > {log} 2>&1"


rule report:
    input:
        FINAL_OUTPUTS,
        rejects="data/processed/rejects.parquet",  # the table of unused inputs and their reasons
        excluded="results/split/excluded.parquet",  # dev/test utterances moved out by split.disjoint_text
    output:
        REPORT,
    params:
        cfg=cfg_json(*sorted(config)),
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "mmasr report --cfg {params.cfg:q} --root . --out {output} > {log} 2>&1"


rule browser:
    input:
        nbest="data/nbest/nbest_lm.parquet",
        manifest="data/processed/manifest.parquet",
        images="data/processed/images.parquet",
        audio="data/processed/audio",  # embedded (or linked) in the page
        metrics="results/metrics/fusion.json",  # after fuse: the dev-chosen weights and the WERs to match
    output:
        BROWSER,
    params:
        cfg=cfg_json("fusion", "text", "report"),
    log:
        "results/logs/browser.log",
    benchmark:
        "results/benchmarks/browser.tsv"
    conda:
        "../envs/mmasr.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "mmasr browser --cfg {params.cfg:q} --nbest {input.nbest} --manifest {input.manifest} --images {input.images}"
        " --metrics {input.metrics} --root . --out {output} > {log} 2>&1"
