"""The workflow seen from outside Snakemake: dvc.yaml generated from the Snakemake jobs (``mmasr dvc-yaml``)."""
