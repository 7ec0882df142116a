# mmasr: multimodal speech recognition pipeline. Thin on purpose: parameters live in params.yaml
# (validated by workflow/schemas/params.schema.yaml), rules in workflow/rules/ (one file per phase),
# runtime resources in profiles/default/ (workstation) and workflow/profiles/slurm/. Each rule calls one `mmasr <stage>` command.
from snakemake.utils import min_version, validate

from mmasr.config import validate as check_params

min_version("9.0")


configfile: "params.yaml"


check_params(config, "params")  # one short line per bad key, naming it
validate(config, "workflow/schemas/params.schema.yaml")  # fills in the schema's defaults


include: "workflow/rules/common.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/split.smk"
include: "workflow/rules/clip.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/nbest.smk"
include: "workflow/rules/fusion.smk"
include: "workflow/rules/scoring.smk"
include: "workflow/rules/adapt.smk"
include: "workflow/rules/projector.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/clap.smk"
include: "workflow/rules/probe.smk"


rule all:
    default_target: True
    input:
        REPORT,
        BROWSER,
        FINAL_OUTPUTS,


onsuccess:
    print_outputs()
