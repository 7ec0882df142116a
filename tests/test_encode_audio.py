import numpy as np
import torch

from mmasr.models.layers import n_encoder_frames
from mmasr.models.loading import whisper_features
from mmasr.projector.encoder_cache import FeatureCache, encode_batch, write_index, write_shard
from tests.conftest import tone


def test_frame_counts_follow_the_hop_and_the_stride():
    assert n_encoder_frames(16000, 160, 1500) == 50      # 1 s -> 100 mel frames -> 50 encoder frames
    assert n_encoder_frames(16001, 160, 1500) == 51      # a partial frame still counts
    assert n_encoder_frames(10 * 16000, 160, 150) == 150  # never beyond the window
    assert n_encoder_frames(0, 160, 150) == 1


def test_encoder_outputs_are_trimmed_to_the_audio_and_round_trip_through_the_cache(whisper_bundle, tmp_path):
    audios = [tone(0.5, lead=0, tail=0), tone(1.2, lead=0, tail=0)]
    out = encode_batch(whisper_bundle, audios)
    assert [o.shape[0] for o in out] == [25, 60] and out[0].dtype == np.float16
    with torch.inference_mode():
        full = whisper_bundle.model.get_encoder()(whisper_features(whisper_bundle, audios)["input_features"]).last_hidden_state
    np.testing.assert_allclose(out[1], full[1, :60].numpy(), atol=2e-3, rtol=1e-2)  # float16 storage

    write_shard(tmp_path / "shard-00000.safetensors", {"a": out[0], "b": out[1]})
    write_index(tmp_path / "index.parquet", [{"utt_id": u, "shard": "shard-00000.safetensors", "n_frames": o.shape[0],
                                              "dim": o.shape[1]} for u, o in zip("ab", out)])
    cache = FeatureCache(tmp_path)
    assert len(cache) == 2
    np.testing.assert_array_equal(cache["b"], out[1])
