"""The trained model as one object: load a model folder (UNet + VAE + VAC + scheduler; DEFAULT_MODEL ships, and a
training run resolves to its newest complete checkpoint) and sample chroma for grayscale frames. Shared by
training-time validation, the colorization pipeline (pipeline.py) and the benchmarks."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from color_head import ColorHead, Decoding, load_color_head, load_head_backbone
from guidance import CarryWeight, no_hints, resize_to
from modules import (BACKBONE_SCALE, BACKBONE_STRIDES, BACKBONES, CHROMA_RANGE, FrozenBackbone, HybridVAC, load_vac,
                     load_vae, model_multiple,
                     round_to_multiple, unet_in_channels, unet_input, vac_condition, vac_fingerprint, vac_input_scale,
                     vac_spatial_channels, vae_downscale, vae_fingerprint, vae_output_to_chroma)
from utils import UserError, first_line, luma_chroma_to_rgb

CONFIG_NAME = "colorizer.json"
DEFAULT_MODEL = Path(__file__).resolve().parent / "unet_model" / "default"  # the shipped model
DECODE_MARGIN = 2  # latent pixels, see Colorizer.decode_chroma
SAMPLERS = ("ddim", "ddpm", "dpm++", "unipc", "euler")
# Defaults for models whose colorizer.json names none: the chroma gain chosen for v3 by the sampler sweep on the
# clips training held out (its model card), the colour head's calibrated mean, and the weight of the previous
# output carried along the flow (chosen for v1, docs/history.md).
SAMPLING_DEFAULTS = {"saturation": 1.5, "vividness": 0.0, "propagation": 0.99}
# Where the colour heads lead (Colorizer.sample_chroma), the diffusion's correction to their colour is smoothed by a
# Gaussian of sigma (the frame's short side / TINT_SCALE): the frame's large-scale tint, without the blotches the
# small latent adds at finer scales. Chosen on the held-out photos between /4 and /16.
TINT_SCALE = 4


def make_scheduler(name: str, train_config: dict):
    """A diffusers sampler built from the training noise schedule (so betas and prediction type always match)."""
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           UniPCMultistepScheduler)

    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm++": DPMSolverMultistepScheduler,
               "unipc": UniPCMultistepScheduler, "euler": EulerDiscreteScheduler}
    if name not in classes:
        raise UserError(f"--sampler {name}: unknown; choose one of {', '.join(SAMPLERS)}")
    extra = {"timestep_spacing": "trailing"} if name != "ddpm" else {}
    return classes[name].from_config(train_config, **extra)


def resolve_model_folder(path: Path) -> Path:
    """A model folder holds colorizer.json; a training run folder resolves to its newest complete checkpoint."""
    path = Path(path)
    if (path / CONFIG_NAME).exists():
        return path
    checkpoints = sorted(path.glob("checkpoint-*/" + CONFIG_NAME), key=lambda p: int(p.parent.name.split("-")[1]))
    if not checkpoints:
        raise UserError(f"{path}: no {CONFIG_NAME} and no checkpoint-*/ inside; pass a model or training run folder")
    return checkpoints[-1].parent


def checkpoints_of(run_dir: Path) -> list[Path]:
    """A training run's complete checkpoints (train_diffusion.py), oldest first (a checkpoint is renamed into place
    only once fully written)."""
    found = [p for p in run_dir.glob("checkpoint-*") if (p / CONFIG_NAME).exists() and (p / "state").is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_component(spec: str, folder: Path) -> str:
    """Component specs in colorizer.json are hub ids, torchvision names, or paths relative to the model folder."""
    if spec.startswith("torchvision:"):
        return spec
    local = (folder / spec).resolve()
    return str(local) if local.exists() else spec


@dataclass
class Colorizer:
    unet: torch.nn.Module
    vae: torch.nn.Module
    vac: torch.nn.Module
    config: dict
    device: torch.device
    color_heads: tuple[ColorHead, ...] = ()
    # the backbones of the colour heads that do not read the VAC's (head_backbone_key)
    head_backbones: dict[str, torch.nn.Module] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def downscale(self) -> int:
        return vae_downscale(self.vae)

    @property
    def takes_hints(self) -> bool:
        """Models trained with train_diffusion.py --hints have a colour-hint input; older ones colorize
        automatically."""
        return bool(self.config.get("hint_channels"))

    @property
    def head_hint_mask(self) -> float:
        """The hint mask the colour head's suggestion carries: guidance.HEAD_HINT_MASK for a UNet trained with the
        head (train_diffusion.py --color-head), else 1, a given colour, as for a model whose UNet never saw it."""
        return float(self.config.get("head_hint_mask", 1.0))

    def sampling_default(self, name: str, chosen: float | None) -> float:
        """A sampling setting: `chosen`, else the model's own default (colorizer.json, where export_model.py puts
        what was chosen for it on held-out clips), else SAMPLING_DEFAULTS."""
        return float(self.config.get(name, SAMPLING_DEFAULTS[name]) if chosen is None else chosen)

    def vividness(self, chosen: float | None) -> float | None:
        """The colour head's vividness (sampling_default), or None for a model without a head."""
        return None if not self.color_heads else self.sampling_default("vividness", chosen)

    @property
    def head_decoding(self) -> Decoding:
        """How the colour heads' distributions become chroma (color_head.Decoding): the model's own (colorizer.json's
        `head_pool_radius`, `head_mode_temperature`), else their mean."""
        return Decoding(int(self.config.get("head_pool_radius", 0)),
                        float(self.config.get("head_mode_temperature", 1.0)))

    def head_start(self, chosen: int | None) -> int | None:
        """The denoising step sampling starts at from the colour head's colour (sample_latents): `chosen`, else the
        model's own (colorizer.json), else None, from pure noise."""
        return chosen if chosen is not None else self.config.get("head_start")

    def heads_lead(self, chosen: bool | None) -> bool:
        """Whether the colour heads lead the colouring (sample_chroma): `chosen`, else the model's own
        (colorizer.json), else not."""
        return bool(self.config.get("heads_lead", False)) if chosen is None else chosen

    def propagation(self, chosen: float | None, heads_lead: bool) -> CarryWeight:
        """The weight of the previous output carried along the flow (--propagation): `chosen` everywhere, else,
        where the colour heads lead, the model's own (colorizer.json's `heads_propagation`) where things move and
        SAMPLING_DEFAULTS's where nothing moves, else SAMPLING_DEFAULTS's everywhere. A sample's colour is drawn
        anew every frame and needs the heavier carry to stay steady; the heads' colour is a function of the frame,
        and where things move a lighter carry keeps more of it (unet_model/default/README.md)."""
        if chosen is not None:
            return CarryWeight.constant(float(chosen))
        default = SAMPLING_DEFAULTS["propagation"]
        return CarryWeight(float(self.config.get("heads_propagation", default)) if heads_lead else default, default)

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """The model's input size for a frame: short side near image_size, aspect ratio kept."""
        multiple = model_multiple(self.vae)
        scale = self.image_size / min(height, width)
        return round_to_multiple(height * scale, multiple), round_to_multiple(width * scale, multiple)

    def vac_size(self, height: int, width: int) -> tuple[int, int]:
        """The VAC's input size for a frame: the working size, or a multiple of it for a hybrid VAC's backbone."""
        scale = vac_input_scale(self.vac)
        return tuple(side * scale for side in self.working_size(height, width))

    def head_size(self, height: int, width: int) -> tuple[int, int] | None:
        """The colour heads' input size for a frame, where it is not the VAC's: a head's training crop's side on the
        short side (sides multiples of 32, as the backbone takes them). None without such a head: where the VAC's
        input is the heads', one pass of the backbone serves all (load_colorizer allows one other size at most)."""
        sides = {head.input_side for head in self.color_heads} - {None, min(self.vac_size(height, width))}
        if not sides:
            return None
        side = sides.pop()
        scale = side / min(height, width)
        return round_to_multiple(height * scale, BACKBONE_STRIDES[-1]), round_to_multiple(width * scale,
                                                                                         BACKBONE_STRIDES[-1])

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        h, w = self.working_size(height, width)
        return self.vae.config.latent_channels, h // self.downscale, w // self.downscale

    @torch.inference_mode()
    def sample_chroma(self, gray: torch.Tensor, noise: torch.Tensor, sampler: str = "ddim", steps: int = 20,
                      guidance: float = 1.0, generator: torch.Generator | None = None,
                      hints: torch.Tensor | None = None, vac_gray: torch.Tensor | None = None,
                      vividness: float | None = None, output_gain: float = 1.0, head_start: int | None = None,
                      head_gray: torch.Tensor | None = None, heads_lead: bool = False) -> np.ndarray:
        """A batch's colour: BxHxWx2 chroma (Cb, Cr, 8-bit scale, before `output_gain`) at the working size; the
        arguments as sample_latents'. The decoded sample; with colour heads at a `vividness` and `heads_lead`, in
        the frames given no hint, the heads' chroma plus the diffusion's change to it at the scale of the frame's
        tint: the sample minus the VAE's rendering of the heads' colour (what the sample would be had the diffusion
        changed nothing), smoothed (TINT_SCALE). Measured on held-out clips and photos, the latent path pales the
        heads' colour and adds blotches at finer scales; at the tint's scale the sample does no harm
        (unet_model/default/README.md)."""
        tokens, spatial, head_chroma = self.conditioning(gray, vac_gray, vividness, head_gray)
        latents = self.sample_latents(gray, noise, sampler, steps, guidance, tokens=tokens, generator=generator,
                                      hints=hints, spatial=spatial, output_gain=output_gain, head_start=head_start,
                                      head_chroma=head_chroma)
        # a frame given hints (painted, or a keyframe's) keeps the sample, which spreads their colour
        hinted = np.zeros(len(latents), bool) if hints is None else (
            (hints[:, 2] > 0).flatten(1).any(dim=1).cpu().numpy())
        if head_chroma is None or not heads_lead or hinted.all():
            return self.decode_chroma(latents)
        head_chroma = head_chroma / output_gain
        tint = self.tint_change(latents, head_chroma)
        led = head_chroma.permute(0, 2, 3, 1).cpu().numpy() + tint
        if not hinted.any():
            return led
        return np.where(hinted[:, None, None, None], self.decode_chroma(latents), led)

    def tint_change(self, latents: torch.Tensor, head_chroma: torch.Tensor) -> np.ndarray:
        """What the sample changes in the heads' colour at the scale of the frame's tint (sample_chroma): BxHxWx2 at
        the heads' chroma's size, the decoded sample minus the VAE's rendering of `head_chroma` (Bx2xHxW), smoothed
        (TINT_SCALE). Both are decoded from latents pooled to half the grid: only their blur is kept, and the
        full-size decoding costs four times as much (on the held-out photos 0.03 dB apart)."""
        half = tuple(max(1, side // 2) for side in latents.shape[-2:])
        sample, rendered = (self.decode_chroma(F.interpolate(x, size=half, mode="area"))
                            for x in (latents, self.encode_chroma(head_chroma)))
        height, width = head_chroma.shape[-2:]
        return smoothed(sample - rendered, min(sample.shape[1:3]) / TINT_SCALE, (height, width))

    def conditioning(self, gray: torch.Tensor, vac_gray: torch.Tensor | None = None, vividness: float | None = None,
                     head_gray: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Bx1xhxw gray at the working size -> the VAC's tokens, its spatial map, and the colour heads' chroma at
        `vividness` bilinear to the working size (None without heads or vividness; see condition). The VAC reads
        `vac_gray` (the frames at vac_size) where given, else `gray`, upsampled for a hybrid VAC (which then sees
        less detail)."""
        gray = gray.to(self.device)
        scale = vac_input_scale(self.vac)
        if vac_gray is None and scale > 1:
            vac_gray = F.interpolate(gray, scale_factor=scale, mode="bilinear", align_corners=False)
        tokens, spatial, head_chroma = self.condition(gray if vac_gray is None else vac_gray, vividness, head_gray)
        if head_chroma is not None:
            head_chroma = F.interpolate(head_chroma, size=gray.shape[-2:], mode="bilinear", align_corners=False)
        return tokens, spatial, head_chroma

    @torch.inference_mode()
    def sample_latents(self, gray: torch.Tensor, noise: torch.Tensor, sampler: str = "ddim", steps: int = 20,
                       guidance: float = 1.0, tokens: torch.Tensor | None = None,
                       generator: torch.Generator | None = None, hints: torch.Tensor | None = None,
                       spatial: torch.Tensor | None = None, vac_gray: torch.Tensor | None = None,
                       vividness: float | None = None, output_gain: float = 1.0,
                       head_start: int | None = None, head_gray: torch.Tensor | None = None,
                       head_chroma: torch.Tensor | None = None) -> torch.Tensor:
        """gray: Bx1xhxw in [0, 1] at the working size; noise: B x C x h/d x w/d. Returns scaled latents.

        The VAC's condition is `tokens` (and a hybrid VAC's `spatial` map) when given, else computed from `vac_gray`
        (the frames at vac_size), else from `gray` (upsampled for a hybrid VAC, which then sees less detail).

        `generator` draws the noise that stochastic samplers (DDPM, Euler ancestral-style steps) add at each step, so
        a seed reproduces their output; without it they draw from torch's global generator. `hints` (Bx3xhxw, see
        guidance.py) guide a model that takes them; None means no hint. With a colour head and a `vividness`, the
        head's chroma at that vividness is the hint wherever no other hint is given (computed from `head_gray`, the
        frames at head_size where the head reads another size than the VAC, else from `vac_gray`), or
        `head_chroma` where the caller has it (conditioning): the output's colour, so it reaches the UNet divided by
        `output_gain`, the gain the caller applies to the decoded chroma (--saturation). With `head_start` (DDIM
        only), sampling starts from the head's colour, encoded by the VAE and noised to that denoising step (SDEdit,
        Meng et al. 2022), instead of from `noise` alone, and takes the sampler's steps from there: the noise no
        longer picks the colouring's tint on its own. A start at or after the sampler's first step (999) is the
        plain start from noise."""
        scheduler = make_scheduler(sampler, self.config["scheduler"])
        scheduler.set_timesteps(steps, device=self.device)
        check_head_start(head_start, sampler)
        step_options = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        gray = gray.to(self.device)
        if self.takes_hints:
            hints = (no_hints(len(gray), *gray.shape[-2:]) if hints is None else hints).to(self.device)
        elif hints is not None:
            raise UserError("this model has no colour-hint input (trained without --hints); colorize without "
                            "--reference / --hints, or use a model trained with them")
        if tokens is None or (head_chroma is None and vividness is not None and self.color_heads):
            vac_tokens, vac_spatial, head_chroma = self.conditioning(gray, vac_gray, vividness, head_gray)
            tokens, spatial = (vac_tokens, vac_spatial) if tokens is None else (tokens, spatial)
        if head_chroma is not None:
            hints = fill_hints(hints, head_chroma / output_gain, self.head_hint_mask)
        tokens = tokens.to(self.device)
        spatial = spatial.to(self.device) if spatial is not None else None
        unet_gray = gray
        if guidance != 1.0:  # conditional and unconditional halves: same gray and hints, zeroed VAC condition
            tokens = torch.cat([tokens, torch.zeros_like(tokens)])
            unet_gray = torch.cat([gray, gray])
            hints = torch.cat([hints, hints]) if hints is not None else None
            spatial = torch.cat([spatial, torch.zeros_like(spatial)]) if spatial is not None else None
        noise = noise.to(self.device)
        latents = noise * scheduler.init_noise_sigma
        if head_start is not None and head_chroma is not None and head_start < scheduler.timesteps[0]:
            latents = self.start_from(scheduler, head_start, head_chroma / output_gain, noise)
        for t in scheduler.timesteps:
            model_input = torch.cat([latents, latents]) if guidance != 1.0 else latents
            model_input = scheduler.scale_model_input(model_input, t)
            model_input = unet_input(model_input, unet_gray, self.downscale, hints, spatial)
            prediction = self.unet(model_input, t, encoder_hidden_states=tokens).sample
            if guidance != 1.0:
                conditional, unconditional = prediction.chunk(2)
                prediction = unconditional + guidance * (conditional - unconditional)
            latents = scheduler.step(prediction, t, latents, **step_options).prev_sample
        return latents

    def start_from(self, scheduler, start: int, chroma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """`chroma` (Bx2xhxw, 8-bit scale) encoded and noised to step `start`; the DDIM `scheduler`'s steps shifted
        to begin there (each still its sampler's stride from the next, which DDIM's update assumes)."""
        shifted = scheduler.timesteps - (scheduler.timesteps[0] - start)
        scheduler.timesteps = shifted[shifted >= 0]
        return scheduler.add_noise(self.encode_chroma(chroma), noise, scheduler.timesteps[:1])

    def encode_chroma(self, chroma: torch.Tensor) -> torch.Tensor:
        """Bx2xhxw chroma (8-bit scale) at the working size -> the VAE's scaled latents of it (its mean)."""
        return self.vae.encode(chroma / CHROMA_RANGE).latent_dist.mean * self.vae.config.scaling_factor

    @torch.inference_mode()
    def condition(self, vac_gray: torch.Tensor, vividness: float | None = None, head_gray: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Bx1xHxW gray at vac_size -> the VAC's tokens, its spatial map (a hybrid VAC's, else None) and, for a model
        with colour heads given a `vividness`, their chroma (Bx2xh/4xw/4 of the largest head input, 8-bit scale; else
        None): the mean of the heads' chroma, an ensemble of heads trained on the same colours at different input
        sizes or on different backbones, each reading the frame at its own size with its own backbone
        (head_inputs)."""
        vac_gray = vac_gray.to(self.device)
        if not self.color_heads or vividness is None:
            return (*vac_condition(self.vac, vac_gray), None)
        vac_maps, inputs = self.head_inputs(vac_gray, head_gray)
        chromas = [head.chroma(head(*read), vividness, read[1], self.head_decoding)
                   for head, read in zip(self.color_heads, inputs)]
        grid = max((c.shape[-2:] for c in chromas), key=lambda shape: shape.numel())
        chroma = torch.stack([F.interpolate(c, size=grid, mode="bilinear", align_corners=False) for c in chromas])
        return (*self.vac.head(vac_maps), chroma.mean(dim=0))

    def head_inputs(self, vac_gray: torch.Tensor, head_gray: torch.Tensor | None = None
                    ) -> tuple[list[torch.Tensor], list[tuple[list[torch.Tensor], torch.Tensor]]]:
        """The hybrid VAC backbone's maps of `vac_gray` (Bx1xHxW at vac_size), and what each colour head reads: its
        backbone's maps and the frames they are of. A head reads `head_gray` (the frames at head_size) where its input
        size is not the VAC's, else `vac_gray` (resized to its size where no `head_gray` is given). Each backbone
        runs once an input size: where a head's backbone and size are the VAC's, the VAC's pass serves it."""
        vac_gray = vac_gray.to(self.device)
        vac_side, vac_backbone = min(vac_gray.shape[-2:]), self.vac.config["backbone"]
        reads_vac_size = [head.input_side in (None, vac_side) for head in self.color_heads]
        if head_gray is None and not all(reads_vac_size):
            head_gray = F.interpolate(vac_gray, size=self.head_size(*vac_gray.shape[-2:]), mode="bilinear",
                                      align_corners=False)
        head_gray = head_gray.to(self.device) if head_gray is not None else None
        maps = {(vac_backbone, True): self.vac.features(vac_gray)}
        inputs = []
        for index, (head, on_vac_size) in enumerate(zip(self.color_heads, reads_vac_size)):
            gray = vac_gray if on_vac_size else head_gray
            name = head_backbone_key(index, head)
            key = (name, on_vac_size)
            if key not in maps:
                backbone = self.vac.features if name == vac_backbone else self.head_backbones[name]
                maps[key] = backbone(gray)
            inputs.append((maps[key], gray))
        return maps[vac_backbone, True], inputs

    @torch.inference_mode()
    def decode_chroma(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents -> BxHxWx2 float32 chroma (Cb, Cr) at the working size.

        The latents are decoded with DECODE_MARGIN latent pixels of replicated border, cropped off afterwards: a
        small VAE's decoder paints a strong blotch into the image's first pixels (measured on the shipped one: a
        chroma magnitude of up to 140 at the top-left corner for an all-zero latent, against 3 elsewhere), and the
        margin moves it out of the frame."""
        padded = F.pad(latents, (DECODE_MARGIN,) * 4, mode="replicate")
        decoded = self.vae.decode(padded / self.vae.config.scaling_factor).sample
        margin = DECODE_MARGIN * self.downscale
        return vae_output_to_chroma(decoded[..., margin:-margin, margin:-margin], self.vae)


def smoothed(chroma: np.ndarray, sigma: float, size: tuple[int, int] | None = None) -> np.ndarray:
    """BxHxWx2 chroma, each frame blurred by a Gaussian of `sigma` pixels (borders reflected), then resized to
    `size` (height, width; default its own). A blur this wide keeps nothing finer than a few sigma, so it runs on the
    frame shrunk by sigma / 16 and is enlarged: within a level of the full-size blur at a twentieth of its cost."""
    import cv2

    height, width = chroma.shape[1:3]
    shrink = max(1.0, sigma / 16)
    small = (max(1, round(height / shrink)), max(1, round(width / shrink)))
    blurred = (cv2.GaussianBlur(resize_to(frame, small), (0, 0), sigma / shrink) for frame in chroma)
    return np.stack([resize_to(frame, size or (height, width)) for frame in blurred])


def check_head_start(head_start: int | None, sampler: str) -> None:
    """--head-start: a denoising step to start from the colour head's colour, which DDIM alone can take."""
    if head_start is not None and (head_start < 0 or sampler != "ddim"):
        raise UserError(f"--head-start {head_start}: a denoising step (0-999), with --sampler ddim")


def fill_hints(hints: torch.Tensor, chroma: torch.Tensor, mask: float = 1.0) -> torch.Tensor:
    """Bx3xhxw hints (guidance.hint_tensor's layout) with `chroma` (Bx2xhxw, 8-bit scale) wherever none is given:
    the mask 1 where a hint is given, `mask` where the chroma fills in."""
    given = hints[:, 2:3] > 0
    filled = torch.where(given, hints[:, :2], chroma / CHROMA_RANGE)
    return torch.cat([filled, torch.where(given, 1.0, torch.full_like(hints[:, 2:3], mask))], dim=1)


def load_colorizer(path: Path, device: torch.device, vae_spec: str | None = None,
                   vac_spec: str | None = None) -> Colorizer:
    """Everything inference needs comes from the model folder (and the VAE/VAC it names). `vae_spec` / `vac_spec`
    replace the components colorizer.json names (say, after moving them); they must be the ones it was trained
    with, or a UserError says so."""
    from diffusers import UNet2DConditionModel

    folder = resolve_model_folder(Path(path))
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
        missing = [key for key in ("vae", "vac", "image_size", "scheduler") if key not in config]
        if missing:
            raise UserError(f"{folder / CONFIG_NAME}: lacks {', '.join(missing)}; re-export the model")
        # float32 compute, whatever precision the weights are stored in (the shipped model stores fp16)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
    except UserError:
        raise
    except Exception as error:  # json, diffusers, safetensors and torch each raise their own kinds
        raise UserError(f"{folder}: incomplete or corrupt model ({first_line(error)}); re-export it") from None
    vae = load_vae(vae_spec or resolve_component(config["vae"], folder))
    vac = load_vac(vac_spec or resolve_component(config["vac"], folder))
    check_compatible(unet, vae, vac, folder, int(config.get("hint_channels", 0)))
    check_trained_components(config, folder, vae, vac, vae_spec, vac_spec)
    color_heads = load_matching_heads(config, folder, vac)
    head_backbones = own_backbones(color_heads, vac, head_folders(config, folder))
    for module in (unet, vae, vac, *color_heads, *head_backbones.values()):
        module.to(device).eval().requires_grad_(False)
    for head in color_heads:  # channels-last, as the folded backbones' maps they read: faster on the CPU
        head.to(memory_format=torch.channels_last)
    if isinstance(vac, HybridVAC):
        vac.fold_for_inference()
    return Colorizer(unet, vae, vac, config, device, color_heads, head_backbones)


def head_backbone_key(index: int, head: ColorHead) -> str:
    """Colorizer.head_backbones' key for the backbone that the index-th colour head reads: ImageNet's own, shared by
    every head that reads it, by its name; one fine-tuned with its head, that head's alone."""
    return f"{head.backbone} tuned with colour head {index + 1}" if head.backbone_trained else head.backbone


def own_backbones(heads: tuple[ColorHead, ...], vac, folders: list[Path]) -> dict[str, torch.nn.Module]:
    """The backbones of the `heads` (loaded from `folders`) that do not read the VAC's, frozen, by head_backbone_key:
    ImageNet's, or the weights a head was fine-tuned with."""
    backbones = {}
    for index, (head, folder) in enumerate(zip(heads, folders, strict=True)):
        key = head_backbone_key(index, head)
        if key != vac.config.get("backbone") and key not in backbones:
            backbones[key] = FrozenBackbone(head.backbone, load_head_backbone(folder, head)).eval()
    return backbones


def head_folders(config: dict, folder: Path) -> list[Path]:
    """The folders of a model's colour heads (colorizer.json's `color_head`: one folder, or a list of them)."""
    names = config.get("color_head") or []
    return [Path(resolve_component(name, folder)) for name in ([names] if isinstance(names, str) else names)]


def load_matching_heads(config: dict, folder: Path, vac) -> tuple[ColorHead, ...]:
    """The model's colour heads (colorizer.json's `color_head`: a folder, or a list of them, whose chroma the model
    averages), which read an ImageNet backbone's maps (the hybrid VAC's, one of their own, or one fine-tuned with
    them) and speak through the UNet's hint input: the VAC must be a hybrid one, the UNet have a hint input, and the
    heads read the VAC's input size and one other at most."""
    heads = tuple(load_color_head(head_folder) for head_folder in head_folders(config, folder))
    for head in heads:
        if not isinstance(vac, HybridVAC) or head.backbone not in BACKBONES or not config.get("hint_channels"):
            raise UserError(f"{folder}: its colour head needs a hybrid VAC, a backbone among {', '.join(BACKBONES)} "
                            f"(it names {head.backbone}) and a UNet with a hint input; remove 'color_head' from "
                            f"{CONFIG_NAME} or use a matching model")
    if len({head.input_side for head in heads} - {BACKBONE_SCALE * int(config["image_size"])}) > 1:
        raise UserError(f"{folder}: its colour heads read more than one input size besides the VAC's; keep one")
    return heads


def check_compatible(unet, vae, vac, folder: Path, hint_input: int = 0) -> None:
    """A UNet only works with the VAE and VAC it was trained on: catch a mismatch before it produces garbage."""
    expected_in = unet_in_channels(vae.config.latent_channels, vae_downscale(vae), hint_input,
                                   vac_spatial_channels(vac))
    if unet.config.in_channels != expected_in or unet.config.out_channels != vae.config.latent_channels:
        raise UserError(f"{folder}: the UNet does not match this VAE (latent channels / downscale); use the VAE it "
                        f"was trained with")
    if unet.config.cross_attention_dim != vac.token_dim:
        raise UserError(f"{folder}: the UNet expects {unet.config.cross_attention_dim}-d VAC tokens, the VAC gives "
                        f"{vac.token_dim}; use the VAC it was trained with")
    for name, module in (("unet", unet), ("vae", vae), ("vac", vac)):
        if any(not torch.isfinite(p).all() for p in module.parameters()):
            raise UserError(f"{folder}: the {name} weights contain NaN or inf; use an earlier checkpoint")


def check_trained_components(config: dict, folder: Path, vae, vac, vae_spec: str | None = None,
                             vac_spec: str | None = None) -> None:
    """The VAE (its latent space) and VAC (its weights) must be those the UNet was trained with. colorizer.json
    records their fingerprints; for an older model without them, a VAE/VAC given instead of the recorded one is
    compared with the recorded one when that can still be loaded."""
    loaders = {"vae": (load_vae, vae_fingerprint), "vac": (load_vac, vac_fingerprint)}
    for name, module, given in (("vae", vae, vae_spec), ("vac", vac, vac_spec)):
        load, fingerprint = loaders[name]
        expected = config.get(f"{name}_fingerprint")
        if expected is None and given:
            try:
                expected = fingerprint(load(resolve_component(config[name], folder)))
            except UserError:
                continue  # the recorded one is gone; the shape checks above are all we can do
        if expected is not None and fingerprint(module) != expected:
            recorded = resolve_component(config[name], folder)
            source = f"--{name} {given}" if given else f"the {name.upper()} at {recorded}"
            raise UserError(f"{folder}: was trained with another {name.upper()} than {source} (colorizer.json names "
                            f"'{config[name]}'); pass the {name.upper()} it was trained with")


def prepare_gray(gray_frames: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """BxHxW uint8 or uint16 luma -> Bx1xhxw float in [0, 1] at the working size."""
    import cv2

    resized = np.stack([cv2.resize(g, (size[1], size[0]), interpolation=cv2.INTER_AREA) for g in gray_frames])
    return torch.from_numpy(resized.astype(np.float32)).unsqueeze(1) / float(np.iinfo(gray_frames.dtype).max)


def combine(gray: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """The input's own luma (BT.601, as grayscale footage is made; uint8, or uint16 for deep video) with the
    predicted chroma, upsampled to the input size if needed -> RGB of the luma's type."""
    import cv2

    height, width = gray.shape
    if chroma.shape[:2] != (height, width):
        chroma = cv2.resize(chroma, (width, height), interpolation=cv2.INTER_LINEAR)
    return luma_chroma_to_rgb(gray, chroma)
