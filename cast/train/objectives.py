"""Training objectives of the reference recipes: how a batch becomes a loss.

Each ``Objective`` builds the module it trains (from the job config), puts it in the right train mode,
turns a batch on the device into a loss, and keeps whatever recipe state lives beside the weights
(DeiT's EMA). The loop (``cast.train.loop``) owns everything else: distribution, precision, the
optimizer step, schedules, metrics and checkpoints.

Models stay free of distributed code; the only collective here is MoCo's key all-gather, a no-op in a
single process.
"""

from __future__ import annotations

import copy
import math

import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

import cast.models  # noqa: F401  (registers cast_* with timm)
from cast.eval.model_loading import checkpoint_location, load_backbone
from cast.models.decoders import DenseSegmenter, build_decoder
from cast.train.config import MocoConfig, SegmentationConfig, SupervisedConfig, TrainConfig
from cast.train.distributed import all_gather, rank


def build_mlp(num_layers: int, in_dim: int, mlp_dim: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """MoCo-v3 MLP: bias-free Linears, BN+ReLU between them, optionally a non-affine BN at the end."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else mlp_dim
        d_out = out_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of local queries against the keys of all workers, scaled by 2*tau as in MoCo-v3."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    all_keys = all_gather(k)  # keys carry no gradient, so a plain all_gather is exact
    logits = q @ all_keys.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank()
    return F.cross_entropy(logits, labels) * (2 * temperature)


def moco_momentum(epoch: float, epochs: int, cfg: MocoConfig) -> float:
    """Key-encoder momentum at fractional ``epoch``: constant, or cosine from ``cfg.momentum`` to 1."""
    if not cfg.momentum_cosine:
        return cfg.momentum
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * min(epoch / epochs, 1.0))) * (1.0 - cfg.momentum)


def top1_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hits as a device tensor: read on the host only at report time (no sync per micro-batch)."""
    return (logits.argmax(dim=1) == labels).sum()


class MoCo(nn.Module):
    """Base encoder + projector, predictor, and a momentum copy updated by EMA (no gradient)."""

    def __init__(self, encoder: nn.Module, cfg: MocoConfig):
        super().__init__()
        encoder.head = build_mlp(3, encoder.embed_dim, cfg.mlp_dim, cfg.dim, last_bn=True)
        self.base_encoder = encoder
        self.momentum_encoder = copy.deepcopy(encoder)
        for param in self.momentum_encoder.parameters():
            param.requires_grad_(False)
        self.predictor = build_mlp(2, cfg.dim, cfg.mlp_dim, cfg.dim, last_bn=False)
        self.temperature = cfg.temperature

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        for base, key in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters(), strict=True):
            key.mul_(m).add_(base.detach(), alpha=1.0 - m)

    def forward(self, images: torch.Tensor, superpixels: torch.Tensor) -> torch.Tensor:
        """``images`` [B,2,3,H,W], ``superpixels`` [B,2,H,W] -> symmetric contrastive loss. The momentum
        encoder is not updated here but once per optimizer step (``update_momentum_encoder``), so gradient
        accumulation does not apply the EMA once per micro-batch."""
        x1, x2 = images[:, 0], images[:, 1]
        s1, s2 = superpixels[:, 0], superpixels[:, 1]
        q1 = self.predictor(self.base_encoder(x1, s1))
        q2 = self.predictor(self.base_encoder(x2, s2))
        with torch.no_grad():
            k1 = self.momentum_encoder(x1, s1)
            k2 = self.momentum_encoder(x2, s2)
        return contrastive_loss(q1, k2, self.temperature) + contrastive_loss(q2, k1, self.temperature)


class DeiTLoss:
    """DeiT loss: Mixup/CutMix on the batch (superpixels stay as computed, like the reference) + soft CE."""

    def __init__(self, cfg: SupervisedConfig):
        self.mixup = None
        if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=cfg.mixup_alpha,
                cutmix_alpha=cfg.cutmix_alpha,
                prob=cfg.mix_prob,
                switch_prob=cfg.switch_prob,
                label_smoothing=cfg.label_smoothing,
                num_classes=cfg.num_classes,
            )
            self.criterion = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def __call__(
        self, model: nn.Module, images: torch.Tensor, superpixels: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (loss, logits); ``images`` [B,3,H,W]."""
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        logits = model(images, superpixels)
        return self.criterion(logits.float(), targets), logits


def prepare_linear_probe(model: nn.Module, pretrained: str | dict) -> nn.Module:
    """Load the backbone of ``pretrained`` into ``model`` and freeze all but a fresh head (MoCo-v3 lincls).

    ``pretrained``: any checkpoint ``cast.eval.model_loading`` reads (a location or a dict already read):
    our MoCo runs (the base encoder), DeiT or dense runs, and the released originals (MoCo ``.pth.tar``,
    DeiT ``.pth``, a linear probe) through ``load_original_checkpoint``. Every backbone weight must load.
    """
    try:
        load_backbone(pretrained, model)
    except ValueError as error:
        raise ValueError(f"linear.pretrained: {error}") from error
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("head."))
    nn.init.normal_(model.head.weight, std=0.01)
    nn.init.zeros_(model.head.bias)
    return model


class Objective:
    """One recipe's part of a training step. ``loss`` returns (loss, top-1 hits or None without labels);
    ``progress`` is the fractional epoch the step trains in (schedules that follow training progress)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def build(self) -> nn.Module:
        raise NotImplementedError

    def setup(self, module: nn.Module) -> None:
        """Called once the module sits on its device (and before a checkpoint is restored)."""

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        if self.cfg.model.freeze_bn:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def loss(self, model: nn.Module, batch: dict, progress: float) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def after_step(self, module: nn.Module, progress: float) -> None:
        """Called after each optimizer step; ``progress``: the fractional epoch reached by it."""

    def scored_modules(self, module: nn.Module) -> list[nn.Module]:
        """What validation scores and rank 0 checkpoints: the trained module (and any average of it)."""
        return [module]

    def param_groups(self, module: nn.Module) -> list[dict] | None:
        """The optimizer's param groups when the recipe has its own (lr multipliers); None = the default."""
        return None

    def state_dict(self) -> dict:
        """Recipe state saved in checkpoints beside the model and optimizer."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class MoCoObjective(Objective):
    """MoCo-v3: symmetric contrastive loss of two views; the key encoder's momentum follows training.

    The EMA of the key encoder runs once per optimizer step, after it, with the momentum at the training
    progress the step reached (the reference updates it before the next step's keys: the same weights).
    With gradient accumulation each micro-batch contrasts against the keys of that micro-batch on all
    workers (global batch / accumulation negatives, the memory-bound choice), while the lr follows the
    global batch; ``data.batch_size >= optim.global_batch / min workers`` keeps accumulation at 1."""

    def build(self) -> nn.Module:
        encoder = timm.create_model(self.cfg.model.name, num_classes=0, **self.cfg.model_kwargs())
        return MoCo(encoder, self.cfg.moco)

    def loss(self, model, batch, progress):
        return model(batch["images"], batch["superpixels"]), None

    def after_step(self, module, progress):
        module.update_momentum_encoder(moco_momentum(progress, self.cfg.schedule.epochs, self.cfg.moco))


class SupervisedObjective(Objective):
    """DeiT-style supervised training: Mixup/CutMix + label-smoothed CE, an optional model EMA."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.criterion = DeiTLoss(cfg.supervised)
        self.ema: ModelEmaV3 | None = None

    def build(self) -> nn.Module:
        return timm.create_model(
            self.cfg.model.name, num_classes=self.cfg.supervised.num_classes, **self.cfg.model_kwargs()
        )

    def setup(self, module):
        if self.cfg.supervised.ema_decay > 0:
            self.ema = ModelEmaV3(module, decay=self.cfg.supervised.ema_decay)

    def loss(self, model, batch, progress):
        labels = batch["label"]
        loss, logits = self.criterion(model, batch["images"][:, 0], batch["superpixels"][:, 0], labels)
        return loss, top1_correct(logits.detach(), labels)

    def after_step(self, module, progress):
        if self.ema is not None:
            self.ema.update(module)

    def scored_modules(self, module):
        return [module] if self.ema is None else [module, self.ema.module]

    def state_dict(self):
        return {"ema": self.ema.module.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state):
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])


class LinearProbeObjective(Objective):
    """Linear probe (MoCo-v3 lincls): frozen pretrained backbone, a fresh linear head, plain CE.

    The reference trains the probe with the backbone in eval mode (BN statistics frozen)."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.pretrained = checkpoint_location(cfg.linear.pretrained)

    def build(self) -> nn.Module:
        model = timm.create_model(self.cfg.model.name, num_classes=self.cfg.linear.num_classes,
                                  **self.cfg.model_kwargs())
        return prepare_linear_probe(model, self.pretrained)

    def train_mode(self, model):
        model.eval()

    def loss(self, model, batch, progress):
        labels = batch["label"]
        logits = model(batch["images"][:, 0], batch["superpixels"][:, 0])
        return F.cross_entropy(logits.float(), labels), top1_correct(logits.detach(), labels)


def segmentation_param_groups(module: nn.Module, cfg: SegmentationConfig, weight_decay: float) -> list[dict]:
    """SPML's groups (reference section 5.6): backbone weights x1, biases ``bias_lr_mult`` (decay unless
    ``bias_decay`` is off), decoder weights ``head_lr_mult``, decoder biases ``head_bias_lr_mult``;
    ``lr_scale`` is what ``optim.set_lr`` multiplies by. 1-D tensors other than biases (norms, embeddings)
    count as weights, as SPML's grouping by name does."""
    groups: dict[tuple[float, float], list] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        head, bias = name.startswith("decoder."), name.endswith(".bias")
        if head:
            scale = cfg.head_bias_lr_mult if bias else cfg.head_lr_mult
        else:
            scale = cfg.bias_lr_mult if bias else 1.0
        decay = 0.0 if bias and not cfg.bias_decay else weight_decay
        groups.setdefault((scale, decay), []).append(param)
    return [{"params": params, "lr_scale": scale, "weight_decay": decay}
            for (scale, decay), params in groups.items()]


class SegmentationObjective(Objective):
    """Dense fine-tuning: a dense CAST with a decoder (Segmenter mask transformer or SPML softmax head),
    per-pixel CE ignoring ``segmentation.ignore_index``. The backbone comes from ``segmentation.pretrained``
    (our runs or a released checkpoint, position table resized, block fusion new when the source had
    none). Every parameter takes part in the loss, so DDP runs without ``find_unused_parameters``."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        seg = cfg.segmentation
        self.pretrained = checkpoint_location(seg.pretrained) if seg.pretrained else ""

    def build(self) -> nn.Module:
        seg = self.cfg.segmentation
        encoder = timm.create_model(self.cfg.model.name, num_classes=0, **self.cfg.model.kwargs)
        if self.pretrained:
            try:
                description = load_backbone(self.pretrained, encoder, new=("fusion.",))
            except ValueError as error:
                raise ValueError(f"segmentation.pretrained: {error}") from error
            if rank() == 0:
                print(f"[cast-train] backbone from {self.pretrained}: {description}", flush=True)
        decoder = build_decoder(seg.decoder, seg.num_classes, encoder.embed_dim, **seg.decoder_options)
        return DenseSegmenter(encoder, decoder)

    def param_groups(self, module):
        return segmentation_param_groups(module, self.cfg.segmentation, self.cfg.optim.weight_decay)

    def loss(self, model, batch, progress):
        masks = batch["mask"]
        logits = model(batch["images"][:, 0], batch["superpixels"][:, 0])
        if logits.shape[-2:] != masks.shape[-2:]:  # superpixels at a lower resolution (SPML: half scale)
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits.float(), masks, ignore_index=self.cfg.segmentation.ignore_index)
        return loss, None


def compile_encoders(module: nn.Module) -> int:
    """``torch.compile`` every CAST encoder inside ``module`` in place (``nn.Module.compile``: parameter
    names and checkpoints stay as they are; the momentum update and losses stay eager). Returns the count."""
    from cast.models import CAST

    encoders = [m for m in module.modules() if isinstance(m, CAST)]
    for encoder in encoders:
        encoder.compile()
    return len(encoders)


OBJECTIVES: dict[str, type[Objective]] = {
    "moco": MoCoObjective,
    "supervised": SupervisedObjective,
    "linear": LinearProbeObjective,
    "segmentation": SegmentationObjective,
}


def build_objective(cfg: TrainConfig) -> Objective:
    return OBJECTIVES[cfg.objective](cfg)
