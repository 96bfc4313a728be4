"""The Wav2Lip-family generator in three sizes, written from the published layout.

Attribute names follow the state-dict layout of the checkpoints in circulation
(``face_encoder_blocks.N.M.conv_block.{0,1}.*``, ``audio_encoder.N.conv_block.*``,
``face_decoder_blocks.N.M.conv_block.*``, ``output_block.0.conv_block.*`` and
``output_block.1.*``), so a user's checkpoint loads with ``strict=True``. The layouts are
data (:data:`LAYOUTS`), one builder turns them into modules, and the committed manifests
(``manifests/*.json``) pin the names and shapes that come out.

Beyond the reference forward pass the generator is split into its three parts
(:meth:`Wav2Lip.encode_face`, :meth:`Wav2Lip.encode_audio`, :meth:`Wav2Lip.decode`)
because an avatar built from one still image feeds the same face to every frame: its
encoder features are computed once per avatar and only the audio encoder and the
decoder run per frame.

* ``96`` — the original generator (Prajwal et al., 2020), 96×96 crops.
* ``256`` — the "v2" generator in circulation for 256×256 crops: one more stride-2 stage
  on both sides and a kernel-4 bottleneck (4×4 → 1×1); its two 512-wide 8×8 stages
  carry one residual block each, not two.
* ``384`` — the spatial-attention generator in circulation for 384×384 crops: three
  residual blocks in every encoder stage (also at full resolution), a 1024-wide
  bottleneck and audio path, a spatial-attention gate (``sam``) on every skip connection
  of the decoder, and an ``audio_refine`` stack that the checkpoints carry but the
  reference inference never runs. It has the same stage count as 256: at 384 its
  bottleneck is 4×4, and the gate broadcasts the 1×1 audio column over it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

MANIFEST_DIR = Path(__file__).with_name("manifests")


@dataclass(frozen=True)
class ConvSpec:
    """One conv + BatchNorm + ReLU block (``conv_block`` in the checkpoints)."""

    cin: int
    cout: int
    kernel: int
    stride: int | tuple[int, int] = 1
    padding: int = 1
    residual: bool = False
    transpose: bool = False
    output_padding: int = 0


def _c(
    cin: int, cout: int, k: int = 3, s: int | tuple[int, int] = 1, p: int = 1
) -> ConvSpec:
    return ConvSpec(cin, cout, k, s, p)


def _r(ch: int) -> ConvSpec:
    return ConvSpec(ch, ch, 3, 1, 1, residual=True)


def _t(cin: int, cout: int, k: int = 3, s: int = 2, p: int = 1, op: int = 1) -> ConvSpec:
    return ConvSpec(cin, cout, k, s, p, transpose=True, output_padding=op)


def _down(cin: int, cout: int, residuals: int) -> list[ConvSpec]:
    return [_c(cin, cout, 3, 2, 1)] + [_r(cout) for _ in range(residuals)]


def _up(cin: int, cout: int, residuals: int, k: int = 3, s: int = 2, p: int = 1, op: int = 1
        ) -> list[ConvSpec]:
    return [_t(cin, cout, k, s, p, op)] + [_r(cout) for _ in range(residuals)]


@dataclass(frozen=True)
class Layout:
    """A variant: crop size, the three conv stacks, the output head and attention."""

    name: str
    size: int
    face_encoder: list[list[ConvSpec]]
    audio_encoder: list[ConvSpec]
    face_decoder: list[list[ConvSpec]]
    output_hidden: int
    spatial_attention: bool = False
    #: Stored in the checkpoints (so strict loading needs it) but never run: the
    #: published inference feeds the audio encoder's output straight to the decoder.
    audio_refine: tuple[ConvSpec, ...] = ()


def _audio(width: int) -> list[ConvSpec]:
    """The mel encoder: 80×16 → 1×1. 1024 widens it with one more 512-wide stage."""
    stack = [
        _c(1, 32), _r(32), _r(32),
        _c(32, 64, 3, (3, 1), 1), _r(64), _r(64),
        _c(64, 128, 3, 3, 1), _r(128), _r(128),
        _c(128, 256, 3, (3, 2), 1), _r(256),
    ]
    if width == 512:
        return [*stack, _c(256, 512, 3, 1, 0), _c(512, 512, 1, 1, 0)]
    return [
        *stack, _r(256),
        _c(256, 512), _r(512), _r(512),
        _c(512, 1024, 3, 1, 0), _c(1024, 1024, 1, 1, 0),
    ]


LAYOUT_96 = Layout(
    name="96",
    size=96,
    face_encoder=[
        [_c(6, 16, 7, 1, 3)],                     # 96
        _down(16, 32, 2),                          # 48
        _down(32, 64, 3),                          # 24
        _down(64, 128, 2),                         # 12
        _down(128, 256, 2),                        # 6
        _down(256, 512, 1),                        # 3
        [_c(512, 512, 3, 1, 0), _c(512, 512, 1, 1, 0)],  # 1
    ],
    audio_encoder=_audio(512),
    face_decoder=[
        [_c(512, 512, 1, 1, 0)],                   # 1   (+512)
        _up(1024, 512, 1, 3, 1, 0, 0),             # 3   (+512)
        _up(1024, 512, 2),                         # 6   (+256)
        _up(768, 384, 2),                          # 12  (+128)
        _up(512, 256, 2),                          # 24  (+64)
        _up(320, 128, 2),                          # 48  (+32)
        _up(160, 64, 2),                           # 96  (+16)
    ],
    output_hidden=32,
)

LAYOUT_256 = Layout(
    name="256",
    size=256,
    face_encoder=[
        [_c(6, 16, 7, 1, 3)],                     # 256
        _down(16, 32, 2),                          # 128
        _down(32, 64, 3),                          # 64
        _down(64, 128, 2),                         # 32
        _down(128, 256, 2),                        # 16
        _down(256, 512, 1),                        # 8
        _down(512, 512, 1),                        # 4
        [_c(512, 512, 4, 1, 0), _c(512, 512, 1, 1, 0)],  # 1 (kernel-4 bottleneck)
    ],
    audio_encoder=_audio(512),
    face_decoder=[
        [_c(512, 512, 1, 1, 0)],                   # 1   (+512)
        _up(1024, 512, 1, 4, 1, 0, 0),             # 4   (+512)
        _up(1024, 512, 1),                         # 8   (+512)
        _up(1024, 512, 2),                         # 16  (+256)
        _up(768, 384, 2),                          # 32  (+128)
        _up(512, 256, 2),                          # 64  (+64)
        _up(320, 128, 2),                          # 128 (+32)
        _up(160, 64, 2),                           # 256 (+16)
    ],
    output_hidden=32,
)

LAYOUT_384 = Layout(
    name="384",
    size=384,
    face_encoder=[
        [_c(6, 16, 7, 1, 3), _r(16), _r(16), _r(16)],  # 384
        _down(16, 32, 3),                          # 192
        _down(32, 64, 3),                          # 96
        _down(64, 128, 3),                         # 48
        _down(128, 256, 3),                        # 24
        _down(256, 512, 3),                        # 12
        _down(512, 1024, 3),                       # 6
        # 4×4 at 384 (the layout is fully convolutional: the same weights run at 256).
        [_c(1024, 1024, 3, 1, 0), _c(1024, 1024, 1, 1, 0), _c(1024, 1024, 1, 1, 0)],
    ],
    audio_encoder=_audio(1024),
    face_decoder=[
        [_c(1024, 1024, 1, 1, 0)],                 # 1, broadcast to 4 by the gate (+1024)
        _up(2048, 1024, 1, 3, 1, 0, 0),            # 6   (+1024)
        _up(2048, 1024, 2),                        # 12  (+512)
        _up(1536, 768, 2),                         # 24  (+256)
        _up(1024, 512, 2),                         # 48  (+128)
        _up(640, 256, 2),                          # 96  (+64)
        _up(320, 128, 2),                          # 192 (+32)
        _up(160, 64, 2),                           # 384 (+16)
    ],
    output_hidden=32,
    spatial_attention=True,
    audio_refine=(_c(1024, 1024, 1, 1, 0), _c(1024, 1024, 1, 1, 0)),
)

LAYOUTS: dict[str, Layout] = {"96": LAYOUT_96, "256": LAYOUT_256, "384": LAYOUT_384}


class ConvBlock(nn.Module):
    """Conv (or transposed conv) + BatchNorm + ReLU, with an optional identity skip.

    After :meth:`fold_batchnorm` the BatchNorm is folded into the convolution's weights
    and replaced by an identity, so inference is one conv, an add and a ReLU.
    """

    def __init__(self, spec: ConvSpec) -> None:
        super().__init__()
        conv: nn.Module
        if spec.transpose:
            conv = nn.ConvTranspose2d(
                spec.cin, spec.cout, spec.kernel, spec.stride, spec.padding,
                spec.output_padding,
            )
        else:
            conv = nn.Conv2d(spec.cin, spec.cout, spec.kernel, spec.stride, spec.padding)
        self.conv_block = nn.Sequential(conv, nn.BatchNorm2d(spec.cout))
        self.act = nn.ReLU(inplace=True)
        self.residual = spec.residual
        self.transpose = spec.transpose

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)  # type: ignore[no-any-return]

    @torch.no_grad()
    def fold_batchnorm(self) -> None:
        """Fold the (eval-mode) BatchNorm into the conv; idempotent."""
        bn = self.conv_block[1]
        if not isinstance(bn, nn.BatchNorm2d):
            return
        conv = self.conv_block[0]
        assert isinstance(conv, nn.Conv2d | nn.ConvTranspose2d)
        running_var, running_mean = bn.running_var, bn.running_mean
        assert running_var is not None and running_mean is not None
        scale = bn.weight / torch.sqrt(running_var + bn.eps)
        shift = bn.bias - running_mean * scale
        # Conv2d weights are (out, in, kh, kw); ConvTranspose2d weights are (in, out, kh, kw).
        shape = (1, -1, 1, 1) if self.transpose else (-1, 1, 1, 1)
        conv.weight.mul_(scale.reshape(shape))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
        new_bias = bias * scale + shift
        conv.bias = nn.Parameter(new_bias, requires_grad=False)
        self.conv_block[1] = nn.Identity()


class SpatialAttention(nn.Module):
    """A 7×7 conv over the channel mean and max of a skip feature, gating the decoder."""

    def __init__(self, kernel: int = 7) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv1(pooled))


class SkipAttention(nn.Module):
    """``decoded * (1 + attention(skip))``: named ``sam.sa`` as in the 384 checkpoints.

    One gate (a single 7×7 conv) is shared by every decoder stage. The product
    broadcasts, so a decoded map smaller than its skip (the 1×1 audio column against the
    4×4 bottleneck at 384) comes out at the skip's size.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sa = SpatialAttention()

    def forward(self, skip: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        gate: torch.Tensor = self.sa(skip)
        return decoded * gate + decoded


class Wav2Lip(nn.Module):
    """The generator: face encoder (U-Net down path), audio encoder, decoder, head.

    Inputs: ``mel`` (B, 1, 80, 16) normalised log-mel; ``face`` (B, 6, S, S) in [0, 1],
    BGR, channels 0–2 the target frame with its lower half zeroed, 3–5 the reference.
    Output: (B, 3, S, S) BGR in [0, 1].
    """

    def __init__(self, layout: Layout) -> None:
        super().__init__()
        self.layout = layout
        if layout.spatial_attention:
            self.sam = SkipAttention()
        self.face_encoder_blocks = nn.ModuleList(
            nn.Sequential(*(ConvBlock(s) for s in stage)) for stage in layout.face_encoder
        )
        self.audio_encoder = nn.Sequential(*(ConvBlock(s) for s in layout.audio_encoder))
        if layout.audio_refine:
            self.audio_refine = nn.Sequential(*(ConvBlock(s) for s in layout.audio_refine))
        self.face_decoder_blocks = nn.ModuleList(
            nn.Sequential(*(ConvBlock(s) for s in stage)) for stage in layout.face_decoder
        )
        last = layout.face_decoder[-1][-1].cout + layout.face_encoder[0][-1].cout
        self.output_block = nn.Sequential(
            ConvBlock(_c(last, layout.output_hidden)),
            nn.Conv2d(layout.output_hidden, 3, kernel_size=1, stride=1, padding=0),
            nn.Sigmoid(),
        )

    def encode_face(self, face: torch.Tensor) -> list[torch.Tensor]:
        """Skip features of every encoder stage, shallowest first."""
        feats: list[torch.Tensor] = []
        x = face
        for block in self.face_encoder_blocks:
            x = block(x)
            feats.append(x)
        return feats

    def encode_audio(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, 1, 80, 16) → (B, C, 1, 1) audio embedding."""
        return self.audio_encoder(mel)  # type: ignore[no-any-return]

    def decode(self, audio_embedding: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """Decode from the audio embedding, concatenating skip features deepest first."""
        x = audio_embedding
        for block, skip in zip(self.face_decoder_blocks, reversed(feats), strict=True):
            x = block(x)
            if self.layout.spatial_attention:
                x = self.sam(skip, x)
            x = torch.cat((x, skip), dim=1)
        return self.output_block(x)  # type: ignore[no-any-return]

    def forward(self, mel: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode_audio(mel), self.encode_face(face))

    def fold_batchnorm(self) -> None:
        """Fold every BatchNorm into its convolution (inference only, after loading)."""
        for module in self.modules():
            if isinstance(module, ConvBlock):
                module.fold_batchnorm()


def build(variant: str, device: str | torch.device = "cpu") -> Wav2Lip:
    """An untrained generator of ``variant`` (``"96"``, ``"256"``, ``"384"``) in eval mode.

    ``device="meta"`` builds the structure without allocating weights (manifests).
    """
    if variant not in LAYOUTS:
        raise ValueError(f"unknown Wav2Lip variant {variant!r}; known: {', '.join(LAYOUTS)}")
    with torch.device(device):
        model = Wav2Lip(LAYOUTS[variant])
    return model.eval()


def state_manifest(variant: str) -> dict[str, list[int]]:
    """State-dict names and shapes of a variant, computed on the meta device."""
    model = build(variant, "meta")
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def manifest_path(variant: str) -> Path:
    """Where the committed manifest of ``variant`` lives."""
    return MANIFEST_DIR / f"wav2lip-{variant}.json"


def load_manifest(variant: str) -> dict[str, list[int]]:
    """The committed manifest: the layout a user's checkpoint must match."""
    data: dict[str, Any] = json.loads(manifest_path(variant).read_text())
    return {k: list(v) for k, v in data["state_dict"].items()}


def write_manifests() -> None:
    """Regenerate ``manifests/*.json`` (run when a layout changes on purpose)."""
    MANIFEST_DIR.mkdir(exist_ok=True)
    for variant, layout in LAYOUTS.items():
        manifest = state_manifest(variant)
        doc = {
            "variant": f"wav2lip-{variant}",
            "crop_size": layout.size,
            "tensors": len(manifest),
            "parameters": sum(
                _numel(shape) for name, shape in manifest.items()
                if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))
            ),
            "state_dict": manifest,
        }
        # One tensor per line keeps the committed file reviewable as a diff.
        head = json.dumps({k: v for k, v in doc.items() if k != "state_dict"}, indent=1)
        rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items())
        text = head[:-2] + ',\n "state_dict": {\n' + rows + "\n }\n}\n"
        manifest_path(variant).write_text(text)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    write_manifests()
