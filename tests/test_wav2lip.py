"""Wav2Lip generator: layouts, features, loading, batching across sessions, end to end.

Random weights stand in for the (non-commercial) published checkpoints: they exercise
exactly the same layout, loader and render path a user's checkpoint goes through.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
librosa = pytest.importorskip("librosa")

from omnistream.codecs.framing import decode_video  # noqa: E402
from omnistream.codecs.jpeg import decode_jpeg  # noqa: E402
from omnistream.models.avatar_base import ChunkRequest, ChunkResult, PrepareRequest  # noqa: E402
from omnistream.models.wav2lip import audio as w2l_audio  # noqa: E402
from omnistream.models.wav2lip import specs  # noqa: E402
from omnistream.models.wav2lip.checkpoint import (  # noqa: E402
    CheckpointError,
    check_layout,
    detect_variant,
    load_generator,
    save_random_checkpoint,
)
from omnistream.models.wav2lip.model import Wav2LipModel, load_model  # noqa: E402
from omnistream.models.wav2lip.network import (  # noqa: E402
    LAYOUTS,
    Wav2Lip,
    build,
    load_manifest,
    state_manifest,
)
from omnistream.sessions.avatar import default_avatar_bytes  # noqa: E402
from omnistream.settings import Settings  # noqa: E402
from tests.avatar_client import connect, flashtalk_init, recv_json, speech_like  # noqa: E402
from tests.server import run_server  # noqa: E402

SR = 16000


def _face() -> np.ndarray:
    """The server's default avatar photo (a public-domain portrait), RGB."""
    import cv2

    bgr = cv2.imdecode(np.frombuffer(default_avatar_bytes(), np.uint8), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(bgr[:, :, ::-1])


@pytest.fixture(scope="module")
def ckpt96(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight wav2lip-96 checkpoint saved as training scripts save them."""
    return save_random_checkpoint(tmp_path_factory.mktemp("w2l") / "wav2lip.pth", "96")


@pytest.fixture(scope="module")
def model96(ckpt96: Path) -> Iterator[Wav2LipModel]:
    model = load_model("96", str(ckpt96), "cpu")
    yield model
    model.close()


def _speech(samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / SR
    f0 = 120 + 30 * rng.random()
    x = np.sin(2 * np.pi * f0 * t) * np.clip(np.sin(2 * np.pi * 3.5 * t + seed), 0, None)
    return (0.3 * x + 0.01 * rng.standard_normal(samples)).astype(np.float32)


# -- layouts ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["96", "256", "384"])
def test_committed_manifest_matches_the_layout_on_meta(variant: str) -> None:
    built = state_manifest(variant)  # meta device: no weights allocated
    assert load_manifest(variant) == built
    prefixes = {key.split(".")[0] for key in built}
    expected = {"face_encoder_blocks", "audio_encoder", "face_decoder_blocks", "output_block"}
    assert prefixes == expected | ({"sam", "audio_refine"} if variant == "384" else set())
    # Every block is conv + BatchNorm under ``conv_block`` except the final 1×1 conv.
    assert all(".conv_block." in k for k in built if not k.startswith(("output_block.1.", "sam.")))
    model = build(variant, "meta")
    out = model(torch.zeros(2, 1, 80, 16, device="meta"),
                torch.zeros(2, 6, LAYOUTS[variant].size, LAYOUTS[variant].size, device="meta"))
    assert tuple(out.shape) == (2, 3, LAYOUTS[variant].size, LAYOUTS[variant].size)


def test_96_layout_is_the_original_generator() -> None:
    manifest = load_manifest("96")
    # Spot checks against the original Wav2Lip generator's tensors.
    assert manifest["face_encoder_blocks.0.0.conv_block.0.weight"] == [16, 6, 7, 7]
    assert manifest["face_encoder_blocks.6.1.conv_block.0.weight"] == [512, 512, 1, 1]
    assert manifest["audio_encoder.12.conv_block.0.weight"] == [512, 512, 1, 1]
    assert manifest["face_decoder_blocks.1.0.conv_block.0.weight"] == [1024, 512, 3, 3]
    assert manifest["face_decoder_blocks.6.0.conv_block.0.weight"] == [160, 64, 3, 3]
    assert manifest["output_block.1.weight"] == [3, 32, 1, 1]
    params = sum(int(np.prod(s)) for k, s in manifest.items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert params == 36_298_035


def test_256_and_384_layouts_are_the_circulating_generators() -> None:
    """Spot checks against the published 256 ("v2") and 384 (spatial-attention) layouts.

    Both have eight encoder stages, so only the attention gate tells a 384 checkpoint
    from a 256 one; a wrong guess would refuse a good checkpoint as mismatched.
    """
    v256, v384 = load_manifest("256"), load_manifest("384")
    assert v256["face_encoder_blocks.7.0.conv_block.0.weight"] == [512, 512, 4, 4]
    assert "face_encoder_blocks.5.2.conv_block.0.weight" not in v256  # one residual at 8×8
    assert v256["face_decoder_blocks.1.0.conv_block.0.weight"] == [1024, 512, 4, 4]
    assert v384["face_encoder_blocks.0.3.conv_block.0.weight"] == [16, 16, 3, 3]
    assert v384["face_encoder_blocks.7.2.conv_block.0.weight"] == [1024, 1024, 1, 1]
    assert v384["audio_encoder.16.conv_block.0.weight"] == [1024, 1024, 1, 1]
    assert v384["audio_refine.1.conv_block.0.weight"] == [1024, 1024, 1, 1]
    assert v384["sam.sa.conv1.weight"] == [1, 2, 7, 7]
    assert v384["output_block.0.conv_block.0.weight"] == [32, 80, 3, 3]
    for variant in LAYOUTS:
        assert detect_variant(build(variant, "meta").state_dict()) == variant


def test_attention_generator_also_serves_256_crops() -> None:
    """LiveTalking's ``wav2lip256`` is the attention network trained on 256 crops."""
    from omnistream.models.wav2lip.checkpoint import layout_for

    attention = build("384", "meta").state_dict()
    assert layout_for(attention, "256", "wav2lip256.pth") == "384"
    assert layout_for(attention, "384", "x.pth") == "384"
    with pytest.raises(CheckpointError, match="is a wav2lip-256 checkpoint, but wav2lip-384"):
        layout_for(build("256", "meta").state_dict(), "384", "v2.pth")
    with pytest.raises(CheckpointError, match="is a wav2lip-384 checkpoint, but wav2lip-96"):
        layout_for(attention, "96", "x.pth")

    torch.manual_seed(0)
    model = Wav2LipModel(build("384").eval(), "cpu", size=256)
    try:
        avatar = model.prepare(PrepareRequest(image=_face(), width=256, height=320,
                                              content_hash="attention-256"))
        assert avatar.size == 256
        chunk = ChunkRequest(avatar=avatar, audio=_speech(SR // 5, seed=4), start_sample=0,
                             audio_offset=0, first_frame_index=0, frame_count=1, fps=25)
        (result,) = model.render([chunk])
        assert isinstance(result, ChunkResult), result
        assert [f.shape for f in result.frames] == [(320, 256, 3)]
    finally:
        model.close()


# -- audio features --------------------------------------------------------------------


def test_mel_matches_librosa() -> None:
    from scipy.signal import lfilter

    x = _speech(SR * 2 + 123, seed=1)
    y = lfilter([1, -0.97], [1], x)
    spec = np.abs(librosa.stft(y=y, n_fft=800, hop_length=200, win_length=800,
                               pad_mode="constant"))
    mel = librosa.filters.mel(sr=SR, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    db = 20 * np.log10(np.maximum(1e-5, mel @ spec)) - 20
    reference = np.clip(8 * ((db + 100) / 100) - 4, -4, 4)
    ours = w2l_audio.melspectrogram(x)
    assert ours.shape == reference.shape == (80, 1 + x.size // 200)
    assert np.abs(ours - reference).max() < 1e-3
    assert ours.min() >= -4 and ours.max() <= 4


def test_frame_windows_are_the_same_whichever_chunk_holds_them() -> None:
    x = _speech(SR * 2, seed=2)
    frames = np.arange(10, 20)
    whole = w2l_audio.frame_windows(x, 0, frames / 25)
    # A streaming chunk: 0.12 s of context before the first frame, 0.14 s after the last.
    lo, hi = int(10 / 25 * SR - 0.12 * SR), int(19 / 25 * SR + 0.14 * SR)
    chunk = w2l_audio.frame_windows(x[lo:hi], lo, frames / 25)
    assert whole.shape == (10, 1, 80, 16)
    np.testing.assert_array_equal(whole, chunk)
    # The window of frame t starts 80 ms before it (6 mel frames at 80 frames/s).
    mel = w2l_audio.melspectrogram(x)
    start = int(15 * 80 / 25) - 6
    np.testing.assert_allclose(whole[5, 0], mel[:, start : start + 16], atol=1e-6)


# -- loading ---------------------------------------------------------------------------


def test_random_checkpoint_loads_strictly_with_batchnorm_folded(ckpt96: Path) -> None:
    raw = load_generator(ckpt96, "96", fold=False)
    folded = load_generator(ckpt96)  # variant detected from the keys
    assert folded.layout.name == "96"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    mel = torch.randn(3, 1, 80, 16)
    face = torch.rand(3, 6, 96, 96)
    with torch.inference_mode():
        np.testing.assert_allclose(raw(mel, face).numpy(), folded(mel, face).numpy(), atol=1e-4)


def test_bare_state_dict_without_prefix_and_counters_loads(tmp_path: Path) -> None:
    state = {k: v for k, v in build("96").state_dict().items()
             if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "bare.pt")
    assert load_generator(tmp_path / "bare.pt").layout.name == "96"


class Payload:
    """Not a tensor: pickling it embeds a reference to code."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("pwned",))


def _bad(tmp_path: Path, name: str, obj: Any) -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_bad_checkpoints_are_refused_with_the_reason(tmp_path: Path, capsys: Any) -> None:
    good = {f"module.{k}": v for k, v in build("96").state_dict().items()}

    cases: list[tuple[Path, str]] = [
        (tmp_path / "absent.pth", "does not exist"),
        (_bad(tmp_path, "code.pth", {"state_dict": Payload()}), "pickles code"),
        (_bad(tmp_path, "list.pth", [torch.zeros(3)]), "not a state dict: it holds a list"),
        (_bad(tmp_path, "mixed.pth", {"a": torch.zeros(1), "b": "text"}),
         "entry 'b' holds a str"),
        (_bad(tmp_path, "other.pth", {"encoder.weight": torch.zeros(2)}),
         "not a Wav2Lip generator"),
    ]
    missing = dict(good)
    for key in [k for k in missing if k.startswith("module.output_block.")]:
        del missing[key]
    cases.append((_bad(tmp_path, "missing.pth", {"state_dict": missing}),
                  "missing key(s): output_block.0.conv_block.0.weight"))
    extra = dict(good)
    extra["module.audio_refine.0.conv_block.0.weight"] = torch.zeros(1)
    cases.append((_bad(tmp_path, "extra.pth", extra),
                  "1 unexpected key(s): audio_refine.0.conv_block.0.weight"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    cases.append((junk, "is not a PyTorch checkpoint"))
    # A zip that is not a torch archive gets past the magic check and is still refused.
    import zipfile

    fake_zip = tmp_path / "fake.pth"
    with zipfile.ZipFile(fake_zip, "w") as zf:
        zf.writestr("hello.txt", "not torch")
    cases.append((fake_zip, "could not be read as a PyTorch file"))

    for path, fragment in cases:
        with pytest.raises(CheckpointError) as info:
            load_generator(path, "96")
        assert fragment in str(info.value), (path.name, str(info.value))
    assert "pwned" not in capsys.readouterr().out  # the payload never ran

    with pytest.raises(CheckpointError, match="is a wav2lip-96 checkpoint, but wav2lip-256"):
        load_generator(cases[-2][0].with_name("extra.pth"), "256")
    wrong_shape = {k.removeprefix("module."): v for k, v in good.items()}
    wrong_shape["output_block.1.weight"] = torch.zeros(3, 16, 1, 1)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*output_block\.1\.weight"):
        check_layout(wrong_shape, "96", "test")


# -- registry --------------------------------------------------------------------------


def test_specs_report_unavailable_with_the_reason(tmp_path: Path) -> None:
    listed = {s.id: s for s in specs(Settings())}
    assert set(listed) == {"wav2lip-96", "wav2lip-256", "wav2lip-384"}
    for spec in listed.values():
        assert spec.tasks == ("audio2video",)
        assert "non-commercial" in spec.capabilities["license"]
        assert "no checkpoint configured" in (spec.unavailable_reason() or "")
    gone = specs(Settings(wav2lip_256_path=str(tmp_path / "nope.pth")))[1]
    assert "checkpoint file not found" in (gone.unavailable_reason() or "")


def test_core_import_stays_torch_free() -> None:
    """Listing models never imports torch, and without torch the reason says so."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from omnistream.settings import Settings\n"
        "from omnistream.models.catalog import build_registry\n"
        "r = build_registry(Settings(wav2lip_96_path=sys.executable))\n"
        "print(r.get('wav2lip-96').unavailable_reason())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "torch is not installed" in out
    code2 = (
        "import sys\n"
        "from omnistream.settings import Settings\n"
        "from omnistream.models.catalog import build_registry\n"
        "build_registry(Settings()).get('wav2lip-384').unavailable_reason()\n"
        "print('torch' in sys.modules)\n"
    )
    out2 = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True,
                          timeout=120, check=True).stdout
    assert out2.strip() == "False"


# -- rendering -------------------------------------------------------------------------


def _portraits() -> list[np.ndarray]:
    face = _face()
    gradient = np.broadcast_to(np.linspace(40, 200, 300, dtype=np.uint8)[:, None, None],
                               (300, 240, 3)).copy()
    return [face, np.ascontiguousarray(face[:, ::-1]), gradient]


def test_prepare_finds_the_face_or_falls_back(model96: Wav2LipModel) -> None:
    face, _, blank = _portraits()
    found = model96.prepare(PrepareRequest(face, 256, 320, "face"))
    assert found.info["face_found"] is True
    x1, y1, x2, y2 = found.box
    assert 0 <= x1 < x2 <= 256 and 0 <= y1 < y2 <= 320
    fallback = model96.prepare(PrepareRequest(blank, 256, 320, "blank"))
    assert fallback.info["face_found"] is False
    assert "no face" in fallback.info["fallback"]
    assert model96.prepare(PrepareRequest(face, 256, 320, "face")) is found  # cached


def _chunk(avatar: Any, first: int, frames: int, seed: int, fps: int = 25) -> ChunkRequest:
    context = int(0.25 * SR)
    samples = frames * SR // fps
    audio = _speech(context + samples, seed)
    return ChunkRequest(avatar=avatar, audio=audio, audio_offset=context,
                        start_sample=first * SR // fps, first_frame_index=first,
                        frame_count=frames, fps=fps, session_id=f"s{seed}")


def test_mixed_batch_equals_one_session_at_a_time(model96: Wav2LipModel) -> None:
    avatars = [model96.prepare(PrepareRequest(img, 256, 320, f"p{i}"))
               for i, img in enumerate(_portraits())]
    chunks = [_chunk(avatars[0], 0, 3, seed=1), _chunk(avatars[1], 40, 2, seed=2),
              _chunk(avatars[2], 7, 4, seed=3), _chunk(avatars[0], 3, 0, seed=4)]
    together = model96.render(chunks)
    assert model96.last_batch_frames == 9
    for chunk, joint in zip(chunks, together, strict=True):
        alone = model96.render([chunk])[0]
        assert isinstance(joint, ChunkResult) and isinstance(alone, ChunkResult)
        assert len(joint.frames) == len(alone.frames) == chunk.frame_count
        for a, b in zip(joint.frames, alone.frames, strict=True):
            assert a.shape == (320, 256, 3) and a.dtype == np.uint8
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    # The generator changed the mouth region and nothing outside the face box.
    first = together[0]
    assert isinstance(first, ChunkResult)
    diff = np.abs(first.frames[0].astype(int) - avatars[0].frame.astype(int)).sum(axis=2)
    x1, y1, x2, y2 = avatars[0].box
    assert diff[y1:y2, x1:x2].max() > 0
    outside = diff.copy()
    outside[y1:y2, x1:x2] = 0
    assert outside.max() == 0


def test_a_bad_chunk_fails_alone(model96: Wav2LipModel) -> None:
    avatar = model96.prepare(PrepareRequest(_face(), 128, 160, "small"))
    good = _chunk(avatar, 0, 2, seed=5)
    wrong_rate = _chunk(avatar, 0, 2, seed=6)
    wrong_rate.sample_rate = 8000
    foreign = _chunk(object(), 0, 2, seed=7)
    out = model96.render([good, wrong_rate, foreign])
    assert isinstance(out[0], ChunkResult) and len(out[0].frames) == 2
    assert isinstance(out[1], ValueError) and "16 kHz" in str(out[1])
    assert isinstance(out[2], ValueError) and "not prepared by a Wav2Lip" in str(out[2])


def _frames(results: list[Any]) -> list[np.ndarray]:
    assert all(isinstance(r, ChunkResult) for r in results), results
    return [f for r in results for f in r.frames]


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    assert len(a) == len(b)
    return max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(a, b, strict=True))


def test_static_batches_render_the_frames_of_the_plain_path(ckpt96: Path,
                                                            model96: Wav2LipModel) -> None:
    """The buffers CUDA graphs replay, driven eagerly on the CPU: padding is invisible.

    Calls of 7, 3, 5 and 9 frames (buckets 8, 4, 8 and 8 + 1) mixing three sessions:
    the 5-frame call runs on buffers whose rows 5–7 still hold the 7-frame call's
    frames, which must not leak into anyone's output.
    """
    static = load_model("96", str(ckpt96), "cpu", {"static_batches": True, "max_batch": 8})
    try:
        assert static.info()["buckets"] == [1, 2, 4, 8] and not static.info()["cuda_graphs"]
        static.warmup()  # every padded size allocated up front, as on CUDA
        requests = [PrepareRequest(img, 128, 160, f"st{i}") for i, img in enumerate(_portraits())]
        mine = [static.prepare(r) for r in requests]
        plain = [model96.prepare(r) for r in requests]
        calls = [[(0, 0, 5, 1), (1, 30, 2, 2)], [(2, 7, 3, 3)],
                 [(1, 32, 1, 4), (0, 5, 4, 5)], [(2, 10, 5, 6), (0, 9, 4, 7)]]
        for call in calls:
            ours = static.render([_chunk(mine[a], first, n, seed) for a, first, n, seed in call])
            ref = model96.render([_chunk(plain[a], first, n, seed)
                                  for a, first, n, seed in call])
            assert static.last_batch_frames == sum(n for *_, n, _ in call)
            assert _max_diff(_frames(ours), _frames(ref)) <= 1
    finally:
        static.close()
    assert all(avatar.device_cache == {} for avatar in mine)  # device tensors released


def test_failed_graph_capture_falls_back_to_eager_padded_batches(
    ckpt96: Path, model96: Wav2LipModel, caplog: pytest.LogCaptureFixture
) -> None:
    """Graphs asked for where capture fails (here: no CUDA) cost a warning, not a session."""
    model = load_model("96", str(ckpt96), "cpu", {"cuda_graphs": True, "max_batch": 4})
    try:
        assert model.static_batches and model.use_graphs  # graphs imply padded buffers
        request = PrepareRequest(_face(), 128, 160, "graphs")
        with caplog.at_level("WARNING", logger="omnistream.models.wav2lip.model"):
            model.warmup()  # the load-time capture: it fails here
            chunks = [_chunk(model.prepare(request), 0, 3, seed=12)]
            first, second = model.render(chunks), model.render(chunks)
        ref = model96.render([_chunk(model96.prepare(request), 0, 3, seed=12)])
        assert _max_diff(_frames(first), _frames(ref)) <= 1
        assert _max_diff(_frames(second), _frames(ref)) <= 1
        info = model.info()
        assert info["cuda_graphs"] is False and info["graphs_captured"] == []
        assert "CUDA graphs need a CUDA device" in info["graph_error"]
        assert info["static_batches"] is True
        warnings = [r for r in caplog.records if "graph capture failed" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        model.close()


class _MemoryCap(Wav2Lip):
    """A generator on a device with room for at most ``limit`` frames per call.

    The fault is injected where a real one surfaces: the generator call raises the
    out-of-memory error torch raises on CUDA.
    """

    def __init__(self, ckpt: Path, limit: int) -> None:
        raw = load_generator(ckpt, "96", fold=False)
        super().__init__(raw.layout)
        self.load_state_dict(raw.state_dict())
        self.fold_batchnorm()
        self.eval()
        self.limit = limit
        self.refused: list[int] = []

    def decode(self, audio_embedding: Any, feats: list[Any]) -> Any:
        n = int(audio_embedding.shape[0])
        if n > self.limit:
            self.refused.append(n)
            raise torch.OutOfMemoryError(f"CUDA out of memory ({n} frames, test device)")
        return super().decode(audio_embedding, feats)


@pytest.mark.parametrize("static_batches", [False, True])
def test_out_of_memory_retries_the_batch_in_halves(
    ckpt96: Path, model96: Wav2LipModel, caplog: pytest.LogCaptureFixture,
    static_batches: bool,
) -> None:
    net = _MemoryCap(ckpt96, limit=4)
    model = Wav2LipModel(net, "cpu", max_batch=8, static_batches=static_batches)
    try:
        requests = [PrepareRequest(_face(), 128, 160, "oom"), PrepareRequest(
            _portraits()[2], 128, 160, "oom-blank")]
        ours = [model.prepare(r) for r in requests]
        ref_avatars = [model96.prepare(r) for r in requests]
        specs_ = [(0, 0, 4, 13), (1, 3, 3, 14)]  # 7 frames: too many, then 4 + 3 fit
        with caplog.at_level("WARNING", logger="omnistream.models.wav2lip.model"):
            for _ in range(2):
                out = model.render([_chunk(ours[a], f, n, s) for a, f, n, s in specs_])
                ref = model96.render([_chunk(ref_avatars[a], f, n, s) for a, f, n, s in specs_])
                assert _max_diff(_frames(out), _frames(ref)) <= 1
        # Padded, the 7 frames asked for the 8-row buffers; plain, for 7 rows.
        assert net.refused == [8 if static_batches else 7] * 2
        assert model.info()["oom_splits"] == 2
        assert len([r for r in caplog.records if "out of memory" in r.getMessage()]) == 1
        net.limit = 0  # not even one frame fits: the error reaches the runner
        with pytest.raises(torch.OutOfMemoryError):
            model.render([_chunk(ours[0], 0, 2, seed=15)])
    finally:
        model.close()


def _fp16_conv_on_cpu() -> bool:
    try:
        conv = torch.nn.Conv2d(2, 2, 3).to(torch.float16)
        conv(torch.zeros(1, 2, 4, 4, dtype=torch.float16))
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.parametrize("precision", [
    "bf16",
    pytest.param("fp16", marks=pytest.mark.skipif(not _fp16_conv_on_cpu(),
                                                   reason="no fp16 convolution on this CPU")),
])
def test_reduced_precision_renders_close_to_fp32(ckpt96: Path, model96: Wav2LipModel,
                                                  precision: str) -> None:
    """The CUDA configuration (bf16/fp16 weights, features and padded buffers) on the CPU.

    Measured on this CPU with the random-weight checkpoint (generator output in 0..255
    units; frames inside the face box): bf16 mean 0.17 / max 0.55, frames max 1;
    fp16 mean 0.02 / max 0.07, frames max 1. The bounds leave about 5× headroom.
    """
    low = load_model("96", str(ckpt96), "cpu",
                     {"precision": precision, "static_batches": True, "max_batch": 8})
    try:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        assert low.dtype == dtype and low.info()["dtype"] == str(dtype).removeprefix("torch.")
        assert all(p.dtype == dtype for p in low.net.parameters())
        request = PrepareRequest(_face(), 256, 320, f"prec-{precision}")
        avatar, ref_avatar = low.prepare(request), model96.prepare(request)
        assert all(f.dtype == dtype for f in low._device_avatar(avatar).feats)

        mel = np.random.default_rng(3).uniform(-4, 4, (6, 1, 80, 16)).astype(np.float32)
        gen = low.infer(mel, [low._device_avatar(avatar)] * 6)
        gen32 = model96.infer(mel, [model96._device_avatar(ref_avatar)] * 6)
        assert gen.dtype == torch.float32  # paste-back always blends in float32
        err = (gen - gen32).abs() * 255
        assert 0 < float(err.max()) < 3.0  # not bit-identical: it did run in low precision
        assert float(err.mean()) < 1.0

        chunk = _chunk(avatar, 0, 5, seed=16)
        frames = _frames(low.render([chunk]))
        ref = _frames(model96.render([_chunk(ref_avatar, 0, 5, seed=16)]))
        x1, y1, x2, y2 = avatar.box
        box_err = [np.abs(a.astype(int) - b.astype(int))[y1:y2, x1:x2]
                   for a, b in zip(frames, ref, strict=True)]
        assert max(int(e.max()) for e in box_err) <= 3
        assert max(float(e.mean()) for e in box_err) < 0.5
    finally:
        low.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_graphs_match_cpu(ckpt96: Path, model96: Wav2LipModel) -> None:
    """On a GPU: graphs captured at load, replays equal the eager padded path, near fp32."""
    gpu = load_model("96", str(ckpt96), "cuda")
    eager = load_model("96", str(ckpt96), "cuda", {"cuda_graphs": False})
    try:
        info = gpu.info()
        assert info["graph_error"] is None and info["graphs_captured"] == list(gpu.buckets)
        assert info["dtype"] in ("bfloat16", "float16") and eager.info()["cuda_graphs"] is False
        request = PrepareRequest(_face(), 256, 320, "g")
        for frames, seed in ((37, 8), (33, 9), (5, 10)):  # 33 runs on 37's stale 64 rows
            cpu = _frames(model96.render([_chunk(model96.prepare(request), 0, frames, seed)]))
            replayed = _frames(gpu.render([_chunk(gpu.prepare(request), 0, frames, seed)]))
            plain = _frames(eager.render([_chunk(eager.prepare(request), 0, frames, seed)]))
            assert _max_diff(replayed, plain) <= 1
            for a, b in zip(cpu, replayed, strict=True):
                assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0
    finally:
        gpu.close()
        eager.close()


# -- end to end ------------------------------------------------------------------------


def test_flashtalk_session_on_wav2lip_96(ckpt96: Path, tmp_path: Path) -> None:
    async def scenario(ws_url: str, http_url: str) -> None:
        async with httpx.AsyncClient() as client:
            listed = (await client.get(http_url + "/v1/audio2video/models")).json()
        assert "wav2lip-96" in listed["models"]
        statuses = {s["id"]: s for s in listed["statuses"]}
        assert "no checkpoint configured" in statuses["wav2lip-384"]["reason"]

        ws = await connect(ws_url + "/v1/audio2video/wav2lip-96")
        try:
            reply = await flashtalk_init(ws, width=256, height=320, slice_len=5)
            assert reply["type"] == "init_ok", reply
            assert reply["slice_len"] == 5
            for i in range(2):
                await ws.send(b"AUDI" + speech_like(reply["chunk_samples"], seed=i))
                message = await asyncio.wait_for(ws.recv(), 120)
                assert isinstance(message, bytes), message
                frames = decode_video(message)
                assert len(frames) == 5
                assert all(decode_jpeg(j).shape == (320, 256, 3) for j in frames)
        finally:
            await ws.close()

        # The default avatar model (``serve --avatar-model wav2lip-96``) serves ``WS /``;
        # a reference without a face falls back to a centred region instead of failing.
        ws = await connect(ws_url + "/")
        try:
            await ws.send(json.dumps({"type": "init", "ref_image": _blank_png_b64(),
                                      "width": 128, "height": 160, "slice_len": 2}))
            reply = await recv_json(ws, timeout=60)
            assert reply["type"] == "init_ok", reply
            assert reply["model"] == "wav2lip-96" and reply["face_detected"] is False
            await ws.send(b"AUDI" + speech_like(reply["chunk_samples"], seed=9))
            message = await asyncio.wait_for(ws.recv(), 120)
            assert isinstance(message, bytes)
            assert [decode_jpeg(j).shape for j in decode_video(message)] == [(160, 128, 3)] * 2
        finally:
            await ws.close()

        # Offline audio2video runs on the same resident model (offline priority).
        from tests.jobs_helpers import b64, tone

        async with httpx.AsyncClient(timeout=120) as client:
            r = await client.post(http_url + "/v1/generate", json={
                "task": "audio2video", "model": "wav2lip-96",
                "inputs": {"audio": b64(tone(0.4))},
                "config": {"width": 96, "height": 128, "fps": 25},
            })
        assert r.status_code == 200, r.text
        (video,) = r.json()["outputs"]
        assert (video["width"], video["height"], video["num_frames"]) == (96, 128, 10)
        assert r.json()["metadata"]["model"] == "wav2lip-96"

        # A broken checkpoint for another variant: init fails clearly, server keeps going.
        ws = await connect(ws_url + "/v1/audio2video/wav2lip-256")
        try:
            await ws.send(json.dumps({"type": "init", "ref_image": _png_b64()}))
            error = await recv_json(ws, timeout=60)
            assert error["type"] == "error"
            assert error["message"].startswith("Init failed:")
            assert "not a state dict" in error["message"]
        finally:
            await ws.close()
        # A variant without weights is refused at the handshake, saying why.
        import websockets

        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await connect(ws_url + "/v1/audio2video/wav2lip-384")
        assert refused.value.response.status_code == 503
        assert b"no checkpoint configured" in refused.value.response.body
        async with httpx.AsyncClient() as client:
            assert (await client.get(http_url + "/health")).status_code == 200

    broken = tmp_path / "broken-256.pth"
    torch.save([1, 2, 3], broken)
    with run_server(wav2lip_96_path=str(ckpt96), wav2lip_256_path=str(broken),
                    avatar_model="wav2lip-96", artifacts_dir=str(tmp_path / "out")) as srv:
        asyncio.run(scenario(srv.ws, srv.http))


def _png_b64() -> str:
    import base64

    return base64.b64encode(default_avatar_bytes()).decode()


def _blank_png_b64() -> str:
    import base64

    import cv2

    gradient = np.broadcast_to(np.linspace(40, 200, 200, dtype=np.uint8)[:, None, None],
                               (200, 160, 3))
    ok, png = cv2.imencode(".png", np.ascontiguousarray(gradient))
    assert ok
    return base64.b64encode(png.tobytes()).decode()
