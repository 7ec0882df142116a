# Last phase: one self-contained HTML report (results/report.html) over the final outputs of every stage
# (FINAL_OUTPUTS in common.smk). `mmasr report` also reads the files beside them (rejects, pictures,
# loss curves, Snakemake benchmarks) and says "not run yet" for a stage whose outputs are absent.
# It shows every parameter, so it takes all of them: any params change re-runs it (and only it, when
# nothing upstream changed) - it takes seconds.


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
