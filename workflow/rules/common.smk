# Helpers shared by the rules: parameter passing and the list of final outputs.
import json
import os


def cfg_json(*sections):
    """The params sections a rule uses, as compact JSON for `mmasr --cfg`.

    Declaring them as rule params also makes Snakemake re-run the rule when (and only when) they change.
    """
    return json.dumps({s: config[s] for s in sections}, sort_keys=True, separators=(",", ":"))


def corpus_input(wildcards):
    """What `ingest` reads: the generated demo folder, the user's manifest, or the TORGO root."""
    source = config["data"]["source"]
    if source == "demo":
        return "data/raw/demo"
    if source == "manifest":
        return config["data"]["manifest"]
    return config["data"]["torgo_root"]


DEMO_CHECKPOINTS = "results/checkpoints/demo/"


def model_input(kind):
    """A model folder the workflow builds (the demo models) or that exists locally is an input;
    a hub id is not a file, so it adds nothing."""
    name = config["models"][kind]
    return [name] if name.startswith(DEMO_CHECKPOINTS) or os.path.isdir(name) else []


NBEST_SHARDS = expand(
    "data/nbest/shards/{shard}-of-{n}.parquet",
    shard=range(config["nbest"]["shards"]),
    n=config["nbest"]["shards"],
)

FINAL_OUTPUTS = [
    "data/processed/manifest.parquet",
    "results/metrics/preprocess.json",
    "results/metrics/split.json",
    "results/metrics/fusion.json",
    "results/fusion/grid.csv",
    "results/fusion/changed.parquet",
]


def print_outputs():
    print("\nmmasr: pipeline finished. Outputs:")
    for path in FINAL_OUTPUTS + ["data/processed/rejects.parquet", "results/logs/", "results/benchmarks/"]:
        print(f"  {path}")
