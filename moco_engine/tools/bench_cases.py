"""``moco-bench``'s named cases: each a method, backbone, input size, batch and K, with the
recipe settings it is built with (MoCo v1/v2 and v3 on images; text; image–text contrast)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    """One benchmark configuration."""

    arch: str
    cifar_stem: bool
    image_size: int
    batch: int
    queue: int
    head: str = "mlp"
    bn_splits: int = 1
    augmentation: str = "cifar"
    method: str = "moco"  # moco (v1/v2) | moco_v3 | byol | itc (a pairs method: image and text towers)
    patch_size: int = 16  # vit_*: the patch side
    settings: tuple[str, ...] = ()  # further key=value of the method's recipe
    tokens: int = 0  # a text case: each view's padded width W in tokens; a pairs case: its captions' (0: images only)

    @property
    def floor(self) -> float:
        """The least a step can cost, in supervised steps of one view (module docstring)."""
        return 8 / 3 if self.method in ("moco_v3", "byol") else 4 / 3


# MoCo v3's ViT recipe (configs/experiment/moco_v3_imagenet_vit_small.yaml) as the bench builds it:
# one process, so plain BN where the recipe has SyncBN.
V3_VIT = ("model.freeze_patch_embed=true", "model.hidden_dim=4096", "model.dim=256", "model.predictor_last_bn=true",
          "model.momentum_schedule=cosine", "model.bn=plain", "negatives.kind=momentum_batch", "loss.temperature=0.2",
          "optim.name=adamw", "optim.lr=1.5e-4", "optim.weight_decay=0.1")


# The text recipes' encoders and optimisers as the bench builds them (a tokenizer trained on the
# embedded sample: its vocabulary is smaller than bert-base-uncased's 30,522).
TEXT = ("model.bn=plain", "model.bn_splits=1", "optim.name=adamw", "optim.betas=[0.9,0.98]", "optim.eps=1e-6",
        "optim.weight_decay=0.01", "loss.temperature=0.05")
SCIFACT = (*TEXT, "model.params.layers=2", "model.params.hidden=128", "model.params.heads=2",
           "model.params.intermediate=512", "model.params.dropout=0", "model.dim=128", "optim.lr=4e-3",
           "data.text.chunk_length=128")
CONTRIEVER = (*TEXT, "model.params.layers=12", "model.params.hidden=768", "model.params.heads=12",
              "model.params.intermediate=3072", "model.dim=768", "model.normalize=false", "model.momentum=0.9995",
              "optim.lr=5e-5", "data.text.chunk_length=256", "data.text.vocab_size=30522")


# BYOL's recipe (configs/experiment/cifar10_byol.yaml) as the bench builds it.
BYOL = ("model.hidden_dim=4096", "model.dim=256", "model.momentum=0.996", "model.momentum_schedule=cosine",
        "loss.byol_hidden_dim=4096", "optim.lr=0.05", "optim.weight_decay=1e-5")


# Image–text contrast: the towers and optimizer of configs/experiment/flickr8k_itc.yaml (mirrored
# here: a change of its model, text_model or optim is made here too) with ALBEF's step, the two
# queues (the recipe itself trains CLIP's in-batch loss: RESULTS.md). Its data are generated
# (moco-bench's pairs folder: its WordPiece fills data.text.vocab_size as Flickr8k's captions do).
FLICKR_ITC = ("model.bn=plain", "model.dim=256", "model.momentum=0.99", "text_model.arch=bert",
              "text_model.head=linear_no_bias", "text_model.params.layers=2", "text_model.params.hidden=256",
              "text_model.params.heads=4", "text_model.params.intermediate=512", "text_model.params.dropout=0.1",
              "text_model.params.pooling=mean", "negatives.kind=queue", "loss.temperature=0.07",
              "loss.learn_temperature=true", "loss.distill_alpha=0.4", "optim.name=adamw", "optim.lr=1e-3",
              "optim.weight_decay=0.02", "optim.schedule=cosine", "optim.warmup_epochs=0.5",
              "data.text.vocab_size=4096", "data.text.max_length=32", "data.crop_min=0.5")


CASES = {
    # The MoCo authors' CIFAR-10 demo: CIFAR ResNet-18, batch 512, K 4096, split-BN over 8 slices.
    "r18-cifar": Case("resnet18", True, 32, 512, 4096, head="linear", bn_splits=8),
    # MoCo v1/v2 on ImageNet: ResNet-50 at 224 px, batch 256, K 65536 (v1's linear head).
    "r50-224": Case("resnet50", False, 224, 256, 65536, head="linear", augmentation="moco_v2"),
    # The 2-core CPU target of BENCHMARKS.md: the demo's model at batch 64.
    "r18-cifar-cpu": Case("resnet18", True, 32, 64, 4096, head="linear", bn_splits=8),
    # Seconds on any CPU (the test suite runs it).
    "tiny": Case("resnet18", False, 32, 16, 256, head="linear"),
    # MoCo v3 with ViT-S/16 at 224 px, batch 256 on one GPU (on a 2-core CPU: --batch 8).
    "vit-s-224": Case("vit_small", False, 224, 256, 1024, head="mlp3_bn", augmentation="moco_v3", method="moco_v3",
                      patch_size=16, settings=V3_VIT),
    # MoCo v3 with ViT-Tiny/4 at 32 px (configs/experiment/moco_v3_cifar10_vit_tiny.yaml), batch 256.
    "vit-t-cifar": Case("vit_tiny", False, 32, 256, 1024, head="mlp3_bn", augmentation="moco_v3_cifar",
                        method="moco_v3", patch_size=4, settings=V3_VIT),
    # BYOL (configs/experiment/cifar10_byol.yaml) on the demo's model at the CPU batch: no negatives.
    "byol-cifar-cpu": Case("resnet18", True, 32, 64, 4096, head="mlp_bn", method="byol", settings=BYOL),
    # Text: configs/experiment/scifact_contriever.yaml's BERT and step; W 48 is about its views' mean
    # padded width (spans of 10-50% of 128-token chunks, padded to the batch's longest).
    "bert-scifact": Case("bert", False, 0, 128, 4096, head="none", tokens=48, settings=SCIFACT),
    # The same with the CPU recipe's four length buckets (each encoded on its own: four times the
    # encoder's operators); configs/experiment/scifact_contriever_gpu.yaml has none.
    "bert-scifact-buckets": Case("bert", False, 0, 128, 4096, head="none", tokens=48,
                                 settings=(*SCIFACT, "model.params.length_buckets=4")),
    # Image–text contrast, configs/experiment/flickr8k_itc.yaml: ResNet-18 (standard stem) at 64 px
    # and the 2 x 256 BERT, batch 64, K 4096. W 27: the mean padded width of a batch of 64 Flickr8k
    # training pairs (one caption drawn an image, cut to the batch's longest) with the recipe's
    # WordPiece (V 4096) at data.text.max_length 32, measured over 2,000 random batches: mean 26.6,
    # median 26, 10-90% 23-31 (a caption is 14.3 tokens on average; the batch pads to its longest).
    "itc-flickr-cpu": Case("resnet18", False, 64, 64, 4096, head="linear", augmentation="cifar_light", method="itc",
                           tokens=27, settings=FLICKR_ITC),
    # Contriever's step on one of its 32 GPUs: BERT-base (12 x 768), 64 chunks, K 131,072, spans of
    # 5-50% of 256 tokens padded to the batch's longest (about 130).
    "bert-base": Case("bert", False, 0, 64, 131072, head="none", tokens=128, settings=CONTRIEVER),
}
