"""Every setting of moco_engine as one dataclass schema, its dotted keys, and the errors a
user's input raises (:class:`UserError`, :class:`ConfigError`: one line and exit code 2 in the
command-line tools). ``loading.py`` builds a run's config from it.

The schema's defaults are the embedded default run (``moco-train`` with no arguments): a short
pretraining of a ResNet-18 (standard stem, cheap at 32 px) on the CIFAR-10 sample shipped inside
the package, sized to finish in minutes on 2 CPU cores. Recipes set every key they rely on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf


class UserError(Exception):
    """An error the user can fix (bad config, missing data, incompatible checkpoint).

    The command-line tools print its message as one line and exit with code 2, no traceback.
    """


class ConfigError(UserError):
    """A configuration key or value is wrong."""


@dataclass
class TextDataConfig:
    """data.name=text: the tokenizer and Contriever's views (data/text/views.py)."""

    tokenizer: str = ""  # "" (a WordPiece trained on the training corpus) | a tokenizer.json | a local Hugging Face model folder
    vocab_size: int = 8192  # the trained WordPiece's vocabulary size (at most)
    lowercase: bool = True  # the trained WordPiece's normaliser (and a vocab.txt folder's)
    chunk_length: int = 256  # L, tokens of a chunk (an item)
    within_documents: bool = False  # chunks end at documents' ends (else one stream, a random offset each epoch)
    ratio_min: float = 0.1  # a view is a random span of n·U(ratio_min, ratio_max) tokens of its chunk
    ratio_max: float = 0.5
    deletion: float = 0.1  # each span token deleted with this probability
    replacement: float = 0.0  # ... else replaced by a random non-special token
    masking: float = 0.0  # ... else replaced by [MASK]
    max_length: int = 256  # evaluation: passages truncated to this many tokens, [CLS] and [SEP] included
    query_max_length: int = 0  # evaluation: queries truncated likewise (0: at max_length, as the sentence-transformers export does)


@dataclass
class PairsDataConfig:
    """data.name=pairs: the columns of a CSV or TSV of image-caption rows (data/pairs/read.py)."""

    image_key: str = "filepath"  # the image path's column (open_clip's --csv-img-key), relative to the file
    caption_key: str = "title"  # the caption's column (open_clip's --csv-caption-key)
    split_key: str = "split"  # the split's column, if the file has one (else the file is data.train_split)


@dataclass
class DataConfig:
    name: str = "embedded"  # embedded | cifar10 | imagefolder | shards | synthetic | text | pairs | any registered source (data/sources.py)
    root: str = ""  # cifar10: torchvision root; imagefolder: a folder or a .tar/.tar.gz/.tar.xz; shards: moco-shard's folder or a .txt of shards; pairs: a Karpathy-JSON folder or archive, or a CSV/TSV
    test_root: str = ""  # where the test split lives when not under `root` (imagefolder; pairs: a CSV/TSV of it)
    train_split: str = "train"  # imagefolder: sub-folder of the pretraining images; shards, pairs: the split's name (Karpathy's: train, val, test)
    test_split: str = "test"  # imagefolder: sub-folder of the kNN query images ("" = none); pairs: the split held out
    download: bool = False  # cifar10 only: let torchvision download it
    augmentation: str = "cifar_light"  # cifar | cifar_light | moco_v1 | moco_v2 | any registered recipe (data/images/recipes.py; the experiment recipes set theirs)
    image_size: int = 32  # crop size of the augmentations
    crop_min: float = 0.0  # the crops' smallest scale in place of the recipe's (0: the recipe's own; MoCo v3's ResNets: 0.2)
    num_workers: int = 2  # DataLoader worker processes (0 = load in the main process)
    on_bad_image: str = "fail"  # fail (stop, naming the file) | skip (leave unreadable images out, count and warn)
    max_bad_images: float = 0.01  # shards: past this share of the images read being unreadable, stop
    decode: str = "cpu"  # shards: cpu (PIL in the loader) | gpu (the loader sends the JPEG bytes; train.device decodes them in batches)
    drop_last: bool = True  # drop each epoch's last partial batch (off: a ragged last batch is trained on)
    pipeline: str = "auto"  # cpu (PIL augmentations in loader workers) | device (decoded once, augmented batched on train.device) | auto (device for embedded and cifar10, else cpu)
    synthetic_size: int = 512  # synthetic: number of training images (test: a quarter)
    synthetic_classes: int = 4  # synthetic: number of classes
    params: dict[str, Any] = field(default_factory=dict)  # options of a registered source that the schema lacks (its `params`)
    text: TextDataConfig = field(default_factory=TextDataConfig)
    pairs: PairsDataConfig = field(default_factory=PairsDataConfig)


@dataclass
class ModelConfig:
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 (torchvision) | any registered backbone (method/backbones.py)
    cifar_stem: bool = False  # conv1 3x3 stride 1 and no max-pool (for 32 px; 16x the FLOPs)
    # linear (MoCo v1, the CIFAR-10 demo) | mlp (MoCo v2) | mlp_bn (MoCo v3's projector). Linear by
    # default: in the short embedded run the MLP head stays on MoCo's collapsed start (BENCHMARKS.md).
    head: str = "linear"  # or any registered head (method/heads.py)
    hidden_dim: int = 0  # width of the MLP head's hidden layer (0 = the backbone's width)
    dim: int = 128  # D, the embedding size of queries, keys and negatives
    normalize: bool = True  # L2-normalised embeddings (off: raw dot products, as Contriever's recipe trains)
    momentum: float = 0.99  # m of the key encoder's EMA
    momentum_schedule: str = "constant"  # constant | cosine (m rises to 1 over training)
    bn: str = "shuffle"  # shuffle (key batch permuted across all ranks before f_k) | sync (SyncBN, CUDA) | plain
    norm: str = "batch"  # batch | group (GroupNorm, 32 groups: no statistics shared between samples)
    bn_splits: int = 4  # split-BN: BN statistics over this many slices of each batch
    bn_split_form: str = "auto"  # how split-BN is computed: auto | per_slice | one_pass | strided | grouped (norms.SplitBatchNorm)
    patch_size: int = 16  # vit_*: the side of a patch (p x p pixels a token)
    freeze_patch_embed: bool = False  # vit_*: keep the random patch projection (moco-v3's stop-gradient on it)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # timm:<name>: its constructor's options (img_size, ...)
    zero_init_residual: bool = False  # resnet*: each residual block's last BN starts at scale 0 (MoCo v3's ResNets)
    predictor_last_bn: bool = False  # method=moco_v3: a BN(affine=False) after the predictor (MoCo v3's ViTs)
    init_from: str = ""  # a weights file the backbone starts from (a fresh run; method/init_from.py); never downloaded
    locked: bool = False  # method=itc: this tower's backbone frozen, in eval mode (LiT, Zhai et al. 2022); its projection trains
    params: dict[str, Any] = field(default_factory=dict)  # options of a registered backbone that the schema lacks (its `params`)


@dataclass
class LossConfig:
    name: str = "infonce"  # infonce | nt_xent | nce | pair | triplet | lifted | npair | debiased | mochi | any registered loss (method/objectives.py)
    temperature: float = 0.1  # T
    symmetric: bool = False  # each crop is once the query (two key passes, both keys enqueued)
    pair_margin: float = 1.0  # pair: margin on the squared distance of negative pairs
    triplet_margin: float = 0.2  # triplet: alpha
    lifted_margin: float = 1.0  # lifted: alpha
    tau_plus: float = 0.1  # debiased: the class prior of a false negative
    mochi_hardest: int = 1024  # mochi: the pool of hardest negatives mixed from
    mochi_mix: int = 1024  # mochi: synthetic negatives mixed from two hard negatives
    mochi_mix_query: int = 256  # mochi: synthetic negatives mixed from the query and a hard negative
    byol_hidden_dim: int = 4096  # byol: width of the predictor MLP
    learn_temperature: bool = False  # itc: T is learned from loss.temperature, clamped to [0.001, 0.5] each step (ALBEF's)
    distill_alpha: float = 0.0  # itc with the queue: momentum distillation's alpha (ALBEF: 0.4), ramped in over epoch 0
    params: dict[str, Any] = field(default_factory=dict)  # hyper-parameters of a registered loss that the schema lacks


@dataclass
class NegativesConfig:
    kind: str = "queue"  # queue | memory_bank | in_batch | any registered kind (method/negatives.py)


@dataclass
class QueueConfig:
    size: int = 1024  # K, the number of negatives (the queue's length; the bank's samples per step)
    mask_same_instance: str = "auto"  # drop a query's own older key from its negatives: auto (when K >= half an epoch's items) | true | false
    dtype: str = "float32"  # float32 | bfloat16 | float16 storage (logits are always float32)
    start: str = "random"  # itc: the queues start as random unit vectors (ALBEF's) | empty (a slot scores once written)


@dataclass
class MemoryBankConfig:
    init: str = "random"  # random | encode (one encoding pass of the data set before training)
    positive: str = "bank"  # bank (Wu et al.'s v_i) | key (the key encoder's output)
    update: str = "refresh"  # refresh (re-encode all items each epoch) | momentum | both
    momentum: float = 0.5  # m of the proximal update v_i <- normalize(m v_i + (1 - m) f_i)
    exclude_own: bool = True  # drop a query's own item from its sampled negatives
    replacement: bool = True  # sample the K negatives with replacement


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | lars (MoCo v3's ResNet recipes) | adamw (its ViT recipes); method/optimizers.py
    lr: float = 0.0075  # the embedded default run's (BENCHMARKS.md: higher rates undo the random features first)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64  # per process
    lr_scaling: str = "none"  # none | linear (lr = optim.lr x global batch / 256)
    schedule: str = "cosine"  # cosine | linear (to 0, Contriever's) | step | constant (after the warm-up)
    warmup_epochs: float = 0.0  # linear warm-up (fractional epochs allowed)
    warmup_from_zero: bool = False  # the warm-up's first step at lr 0 (MoCo v3's adjust_learning_rate), not lr/warmup
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw: (beta1, beta2)
    eps: float = 1e-8  # adamw: epsilon
    trust_coefficient: float = 0.001  # lars: eta of the trust ratio eta·|p|/|d|
    lars_clip: bool = False  # lars: cap the trust ratio at lr (solo-learn's clipping)
    milestones: list[int] = field(default_factory=lambda: [120, 160])  # step: epochs of lr x gamma
    gamma: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 7  # the embedded default run: about 2 minutes on 2 CPU cores
    steps: int = 0  # a budget of optimizer steps (> 0: train.epochs is not read; the epochs follow from the data)
    out_dir: str = "runs/default"  # the run folder: config, checkpoints, metrics
    resume: str = ""  # "" (start fresh) | auto (latest checkpoint in out_dir, if any) | a path
    overwrite: bool = False  # allow starting fresh in a folder that holds checkpoints
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    steps_per_epoch: int = 0  # stop each epoch after this many steps (0 = the whole epoch)
    log_every: int = 10  # steps between metrics.jsonl lines
    keep_checkpoints: int = 2  # the newest k epoch checkpoints are kept
    max_nonfinite_skips: int = 0  # skip up to this many steps whose loss is NaN/inf (checked every step) before stopping
    save_every: int = 1  # epochs between checkpoints (the last epoch and a stop signal always save)
    channels_last: bool = True  # NHWC memory format: faster convolutions on CPU and on tensor cores
    compile: bool = False  # torch.compile the encoders (first steps pay the compilation)
    cuda_graphs: bool = False  # replay the encoders' passes as CUDA graphs (compile mode reduce-overhead; CUDA, one process)


@dataclass
class EvalConfig:
    at_start: bool = True  # also run kNN before the first step: the random-init baseline a run's figure is judged by
    knn_every: int = 2  # epochs between kNN evaluations (the last epoch always runs one; 0 = only it)
    knn_k: int = 200
    knn_t: float = 0.1
    knn_features: str = "backbone"  # backbone | head (normalised either way)
    batch_size: int = 512
    retrieval_split: str = "train"  # text: the qrels split the retrieval monitor (and so sweeps, best-of-run) use; pairs (method=itc): the split it ranks (set val for Karpathy's data)
    split: str = "test"  # text: the qrels split moco-eval retrieval reports; pairs: the split moco-eval pairs ranks


@dataclass
class LinearConfig:
    """The linear probe of ``moco-eval linear``: MoCo v1/v2's protocol by default (a fc on the
    frozen backbone); MoCo v3's is ``configs/linear/moco_v3_vit.yaml`` and ``moco_v3_resnet.yaml``."""

    epochs: int = 100
    lr: float = 30.0
    lr_scaling: str = "none"  # none | linear (lr x linear.batch_size / 256, MoCo v3's main_lincls.py)
    schedule: str = "step"  # step (lr x gamma at the milestones, MoCo v1/v2's) | cosine (a half cosine per epoch, v3's)
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [60, 80])  # step: epochs of lr x gamma
    gamma: float = 0.1
    batch_size: int = 256
    cached: bool = False  # train on features extracted once, without augmentation (fast variant)


@dataclass
class WandbConfig:
    # "" (not set: the WANDB_MODE environment variable, else disabled; online under `wandb agent`) |
    # online | offline | disabled. A mode set here wins over WANDB_MODE, as wandb.init(mode=...) does.
    mode: str = ""
    project: str = "moco_engine"
    entity: str = ""  # W&B user or team ("" = the account's default)
    group: str = ""  # runs of one sweep share a group (moco-sweep sets it)
    name: str = ""  # "" = the run folder's name
    tags: list[str] = field(default_factory=list)
    log_checkpoints: bool = False  # upload each checkpoint as a W&B artifact


@dataclass
class TrackConfig:
    progress: bool = True  # tqdm progress bar on the console
    preview: int = 8  # query/key view pairs drawn to augmentations.png at the start (0 = none)
    # Warn when embed_std·sqrt(D) falls below this (uniform on the sphere: 1). A run stuck on
    # MoCo's collapsed start sat at 0.018-0.05 for 150 steps; learning runs stayed above 0.11.
    collapse_threshold: float = 0.05
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    method: str = "moco"  # moco (a contrastive loss over negatives) | moco_v3 (a predictor; the batch's momentum keys) | byol (a predictor, no negatives) | itc (image-text contrast: two towers on data.name=pairs)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # method=itc: the text tower (arch, head, params, locked; params.pretrained starts it from a model folder); D and the EMA are model.dim and model.momentum
    text_model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="bert", head="linear_no_bias"))
    loss: LossConfig = field(default_factory=LossConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    memory_bank: MemoryBankConfig = field(default_factory=MemoryBankConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    track: TrackConfig = field(default_factory=TrackConfig)


def valid_keys(node: Any = None, prefix: str = "") -> list[str]:
    """All dotted keys of the schema, e.g. ``["data.name", ..., "track.progress"]``."""
    node = OmegaConf.structured(Config) if node is None else node
    keys = []
    for key, value in node.items_ex(resolve=False) if isinstance(node, DictConfig) else []:
        full = f"{prefix}{key}"
        if isinstance(value, DictConfig):
            keys += valid_keys(value, full + ".")
        else:
            keys.append(full)
    return keys


def setting(cfg: Any, key: str) -> Any:
    """The value of a dotted key (``queue.size``) of a :class:`Config`."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg
