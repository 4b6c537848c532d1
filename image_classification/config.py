"""Every command-line flag of ``main.py``, defined once.

Names, defaults and meanings follow the reference ``main.py`` (see README "Flags"); flags the
reference lacks follow its dash style. Model flags accept both the reference's underscore spelling
(``--num_classes``) and dashes (``--num-classes``). ``launch.py`` feeds ``configs.yml`` presets in
as parser defaults, so an explicit flag on the command line always wins.

This module parses only: the rules between flags are :mod:`image_classification.flag_rules`', the
values the flags leave open :mod:`image_classification.settings`'.
"""
from __future__ import annotations

import argparse
from typing import Any, Mapping, Sequence

from image_classification.data.loaders.priority import PRIORITIES
from image_classification.data import registry as data_registry
from image_classification.data.contract import AUGMENTATIONS, DATA_FORMATS, INTERPOLATIONS
from image_classification.data.loaders.sampling import STREAMED_WINDOW
from image_classification.engine.optim import OPTIMIZERS
from image_classification.engine.schedules import LR_SCALINGS, POLICIES
from image_classification.errors import UserError
from image_classification.models.resnet import INIT_PRESETS

LR_SCHEDULES = tuple(POLICIES)
DEFAULT_TOPK = 5
GPU_AFFINITIES = ("none", "socket", "socket_single", "socket_single_unique",
                  "socket_unique_interleaved", "socket_unique_contiguous")

def str2bool(text: str | bool) -> bool:
    """Parse true/false/1/0/yes/no (the reference parsed every string, even "False", as True)."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _int_or_text(text: str) -> int | str:
    """An int, or the text itself: the positional DIR after a bare ``--gather-checkpoints``
    (see :func:`_bare_gather_checkpoints`)."""
    try:
        return int(text)
    except ValueError:
        return text


def _choice_with_none(choices: Sequence[str]):
    """``--augmentation None`` (the reference's spelling) means ``none``."""
    def parse(text: str) -> str:
        value = "none" if text in ("None", "") else text.lower()
        if value not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(choices)})")
        return value
    return parse


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("data", metavar="DIR", nargs="?", default=None,
                       help="dataset root: train/ and val/ in ImageFolder layout, TFRecord files (train-*, "
                            "validation-*), WebDataset shards (train-*.tar, val-*.tar) or a packed dataset "
                            "(train.packed, val.packed); see --data-format "
                            "(not needed with --data-backend synthetic)")
    backends = data_registry.names()  # the registered ones, a test's or a plugin's too
    group.add_argument("--data-backend", "--data-backends", metavar="BACKEND", default="dali-cpu",
                       choices=backends, help=f"data loader: {' | '.join(backends)} (default: dali-cpu)")
    group.add_argument("--interpolation", metavar="INTERPOLATION", default=None,
                       choices=INTERPOLATIONS,
                       help="resize filter: bilinear | bicubic | triangular (DALI only) (default: the --onnx "
                            "file's, else bilinear)")
    group.add_argument("-j", "--workers", default=None, type=int, metavar="N",
                       help="data loading workers (DALI: threads) per process (default: the reference's 5, or "
                            "this process's share of the usable CPU cores when fewer)")
    group.add_argument("--loader-priority", default="auto", choices=PRIORITIES, metavar="PRIORITY",
                       help="CPU priority of the loader's workers/threads: auto | normal | idle; idle runs them "
                            "only on cycles the model leaves free (auto: idle when the model trains on the CPU, "
                            "normal on a GPU) (default: auto)")
    group.add_argument("--prefetch", default=2, type=positive_int, metavar="N",
                       help="batches each worker loads ahead (pytorch); pipeline queue depth (DALI) (default: 2)")
    group.add_argument("--image-size", default=None, type=positive_int, metavar="PX",
                       help="training and validation crop size (default: the architecture's, e.g. 224; B4 380)")
    group.add_argument("--val-resize-size", default=None, type=positive_int, metavar="PX",
                       help="validation: resize the shorter side to PX, then center crop "
                            "(default: image size + 32, e.g. 256 for 224)")
    group.add_argument("--crop-scale", default=[0.08, 1.0], type=float, nargs=2, metavar=("MIN", "MAX"),
                       help="training random-resized-crop: fraction of the image area kept (default: 0.08 1.0)")
    group.add_argument("--augmentation", type=_choice_with_none(AUGMENTATIONS), default="none",
                       metavar="POLICY", help=f"extra training augmentation: {' | '.join(AUGMENTATIONS)} (default: none)")
    group.add_argument("--randaugment-num-ops", default=2, type=positive_int, metavar="N",
                       help="--augmentation randaugment: operations applied per image (default: 2)")
    group.add_argument("--randaugment-magnitude", default=9, type=int, metavar="M",
                       help="--augmentation randaugment: strength 0..30 (with --n-stages: reached in the last "
                            "stage, from min(5, M) in the first) (default: 9)")
    group.add_argument("--eval-image-size", default=None, type=positive_int, metavar="PX",
                       help="validation crop size, independent of the training size; the validation resize "
                            "keeps its ratio to the crop (default: the final training --image-size)")
    group.add_argument("--synthetic-epoch-size", default=0, type=int, metavar="N",
                       help="synthetic backend: images per epoch (default: 64 batches per process)")
    _add_shard_flags(parser)


def _add_shard_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sharded data (TFRecord, WebDataset)")
    group.add_argument("--data-format", default="auto", choices=DATA_FORMATS, metavar="FORMAT",
                       help=f"what DIR holds: {' | '.join(DATA_FORMATS)}; auto detects DIR/train/ (folder), "
                            "DIR/train.packed.json (packed: prepare --to packed), DIR/train-*.tar (webdataset), "
                            "DIR/train-* (tfrecord) (default: auto)")
    group.add_argument("--train-shards", default=None, metavar="PATTERN",
                       help="training shards instead of DIR's: a glob or brace range, e.g. "
                            "/data/train-{000000..000127}.tar (default: found in DIR)")
    group.add_argument("--val-shards", default=None, metavar="PATTERN",
                       help="validation shards instead of DIR's (default: found in DIR)")
    group.add_argument("--data-idx-dir", "--data_idx_dir", dest="data_idx_dir", default=None, metavar="DIR",
                       help="shard index files (<shard>.samples.tsv): looked up here first, then beside the "
                            "shards, then in the shard cache; missing ones are built here if writable "
                            "(default: built in the shard cache)")
    group.add_argument("--shard-cache", default=None, metavar="DIR",
                       help="cache folder for built index files and remote shard copies "
                            "(default: $XDG_CACHE_HOME or ~/.cache, then convnets/)")
    group.add_argument("--tfrecord-label-base", default=1, type=int, metavar="N",
                       help="subtracted from TFRecord labels: 1 for TF-slim files (1-based, 0 = background); "
                            "0 with --num-classes 1001 keeps TF-slim's background class (default: 1)")
    group.add_argument("--shard-shuffle-window", default=None, type=int, metavar="W",
                       help="shuffle shards, then samples within groups of W shards, so each rank reads "
                            "a few shards at a time; 0 shuffles all samples globally "
                            f"(default: 0 for local shards, {STREAMED_WINDOW} for remote ones)")


def _add_optimization_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimization")
    group.add_argument("--epochs", default=90, type=positive_int, metavar="N", help="total epochs (default: 90)")
    group.add_argument("--run-epochs", default=-1, type=int, metavar="N",
                       help="run at most N epochs in this invocation, then stop (default: -1, all)")
    group.add_argument("--early-stopping-patience", default=-1, type=int, metavar="N",
                       help="stop after N epochs without a new best val top-1 (default: -1, off)")
    group.add_argument("-b", "--batch-size", default=256, type=positive_int, metavar="N",
                       help="batch size per process (per GPU) (default: 256)")
    group.add_argument("--optimizer-batch-size", default=-1, type=int, metavar="N",
                       help="global batch per optimizer step, reached by gradient accumulation "
                            "(default: -1, batch size x processes)")
    group.add_argument("--lr", "--learning-rate", default=0.1, type=non_negative_float, metavar="LR",
                       dest="lr", help="base learning rate (default: 0.1)")
    group.add_argument("--lr-schedule", default="step", choices=LR_SCHEDULES, metavar="SCHEDULE",
                       help=f"learning rate policy: {' | '.join(LR_SCHEDULES)} (default: step)")
    group.add_argument("--end-lr", default=0.0, type=non_negative_float, metavar="LR",
                       help="cosine and poly schedules: the LR they decay to, never scaled by --lr-base-batch "
                            "(default: 0)")
    group.add_argument("--lr-poly-power", default=2.0, type=non_negative_float, metavar="P",
                       help="poly schedule: end + (base - end) x (1 - progress)^P after the warmup (default: 2)")
    group.add_argument("--lr-base-batch", default=None, type=positive_int, metavar="B",
                       help="--lr is per B images: scale it to the global batch (-b x processes x accumulation) "
                            "by --lr-scaling (default: none, --lr is the LR used, as in the reference)")
    group.add_argument("--lr-scaling", default=None, choices=LR_SCALINGS, metavar="RULE",
                       help="with --lr-base-batch: LR x global/B (linear) or x sqrt(global/B) (sqrt) "
                            "(default: linear)")
    group.add_argument("--warmup", default=0, type=int, metavar="E", help="linear warmup epochs (default: 0)")
    group.add_argument("--lr-milestones", default=[30, 60, 80], type=int, nargs="+", metavar="E",
                       help="step schedule: epochs at which the LR is multiplied by --lr-gamma (default: 30 60 80)")
    group.add_argument("--lr-gamma", default=0.1, type=non_negative_float, metavar="G",
                       help="step schedule: LR factor at each milestone (default: 0.1)")
    group.add_argument("--lr-granularity", default="epoch", choices=("epoch", "iteration"),
                       help="epoch: LR constant within an epoch, as the reference (published results); "
                            "iteration: LR updated every optimizer step (default: epoch)")
    group.add_argument("--n-stages", default=1, type=positive_int, metavar="N",
                       help="stage-wise training: split the epochs into N stages whose training image size grows "
                            "linearly from --base-image-size to --image-size (intermediate sizes rounded to "
                            "multiples of 16) while --mixup, --cutmix and --randaugment-magnitude grow to their "
                            "values in the last stage; 1 = off (default: 1)")
    group.add_argument("--base-image-size", default=None, type=positive_int, metavar="PX",
                       help="with --n-stages > 1: training image size of the first stage "
                            "(default: half the final --image-size)")
    group.add_argument("--label-smoothing", default=0.0, type=non_negative_float, metavar="S",
                       help="label smoothing epsilon (default: 0.0)")
    group.add_argument("--mixup", default=0.0, type=non_negative_float, metavar="ALPHA",
                       help="MixUp alpha, 0 = off (default: 0.0)")
    group.add_argument("--cutmix", default=0.0, type=non_negative_float, metavar="ALPHA",
                       help="CutMix alpha, 0 = off; with --mixup too, each batch gets one of the two at random "
                            "(default: 0.0)")
    group.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS,
                       help=f"optimizer: {' | '.join(OPTIMIZERS)}; lars, lamb and adamw exclude BatchNorm and bias "
                            "parameters from weight decay and the trust ratio (default: sgd)")
    group.add_argument("--momentum", default=0.9, type=non_negative_float, metavar="M", help="momentum (default: 0.9)")
    group.add_argument("--weight-decay", "--wd", default=1e-4, type=non_negative_float, metavar="W",
                       dest="weight_decay", help="weight decay (default: 1e-4)")
    group.add_argument("--bn-weight-decay", action="store_true",
                       help="also apply weight decay to BatchNorm weights and biases (with lars, lamb, adamw: "
                            "to every bias, and with lars, lamb: the trust ratio too) (default: off)")
    group.add_argument("--rmsprop-alpha", default=0.9, type=non_negative_float, metavar="A",
                       help="RMSprop smoothing constant (default: 0.9)")
    group.add_argument("--rmsprop-eps", default=1e-3, type=non_negative_float, metavar="EPS",
                       help="RMSprop epsilon, added outside the square root as in PyTorch (default: 1e-3)")
    group.add_argument("--nesterov", action="store_true", help="Nesterov momentum for SGD or LARS (default: off)")
    group.add_argument("--trust-coefficient", default=0.001, type=non_negative_float, metavar="ETA",
                       help="LARS: eta of the trust ratio eta x ||w|| / (||g|| + wd x ||w|| + eps) (default: 0.001)")
    group.add_argument("--trust-clip", action="store_true",
                       help="LARS: LARC clipping (a layer's LR never exceeds the LR); LAMB: trust ratio <= 1 "
                            "(LAMBC) (default: off)")
    group.add_argument("--adam-betas", default=[0.9, 0.999], type=float, nargs=2, metavar=("B1", "B2"),
                       help="LAMB and AdamW: moment decay rates (default: 0.9 0.999)")
    group.add_argument("--optimizer-eps", default=None, type=non_negative_float, metavar="EPS",
                       help="LARS, LAMB, AdamW epsilon (default: 1e-7 LARS, as MLPerf's reference; 1e-6 LAMB; "
                            "1e-8 AdamW)")
    group.add_argument("--max-grad-norm", default=0.0, type=non_negative_float, metavar="N",
                       help="LAMB: clip the global gradient norm to N before the step, 0 = off (default: 0)")
    group.add_argument("--use-ema", default=None, type=non_negative_float, metavar="DECAY",
                       help="keep an exponential moving average of the weights with this decay and "
                            "validate it each epoch as val_ema.* (default: off)")
    group.add_argument("--ema-best", action="store_true",
                       help="with --use-ema: model_best.pth.tar and early stopping follow the better of val.top1 "
                            "and val_ema.top1 (default: val.top1 only, as the reference)")
    _add_finetune_flags(parser)


def _add_finetune_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fine-tuning (with --pretrained or --pretrained-from-file; a dataset with "
                                      "other classes gets a new classifier)")
    group.add_argument("--freeze-backbone-epochs", default=None, type=int, metavar="N",
                       help="train only the classifier for the first N epochs (the backbone frozen, its BatchNorm "
                            "in eval mode), then every layer (default: 0; a resumed run keeps its own)")
    group.add_argument("--backbone-lr-scale", default=None, type=non_negative_float, metavar="S",
                       help="the pretrained layers train at S x the LR of the classifier, which follows --lr and "
                            "the schedule (default: 1; a resumed run keeps its own)")


def _add_precision_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("precision and performance")
    group.add_argument("--amp", action="store_true",
                       help="automatic mixed precision: fp16 + dynamic loss scaling on CUDA; on the CPU bf16 where "
                            "it has native bf16 (AVX512-BF16, AMX-BF16, ARM BF16), fp32 elsewhere (logged at start)")
    group.add_argument("--amp-dtype", default=None, choices=("float16", "bfloat16"),
                       help="autocast dtype for --amp; bfloat16 forces bf16 even where the CPU emulates it (slower "
                            "than fp32); float16 on the CPU runs the fp16 + GradScaler path (slow, for testing it "
                            "without a GPU) (default: float16 on CUDA, on the CPU as --amp says)")
    group.add_argument("--static-loss-scale", default=None, type=float, metavar="STATIC_LOSS_SCALE",
                       help="fp16 AMP: a fixed loss scale S, or the initial scale with --dynamic-loss-scale "
                            "(default: neither flag = dynamic scaling from PyTorch's initial scale, 65536)")
    group.add_argument("--dynamic-loss-scale", action="store_true",
                       help="fp16 AMP: dynamic loss scaling (halve on overflow, double after 100 good steps), "
                            "starting from --static-loss-scale when given; the AMP presets of configs.yml "
                            "start at 128 (default: on unless --static-loss-scale is given)")
    group.add_argument("--tf32", default=True, type=str2bool, metavar="BOOL",
                       help="allow TF32 matmuls and convolutions on Ampere+ GPUs; false for strict FP32 (default: true)")
    group.add_argument("--memory-format", default="auto", choices=("nchw", "nhwc", "auto"),
                       help="nhwc: channels_last model and inputs; auto: the faster one for this device and "
                            "precision -- nhwc on the CPU, and on CUDA under --amp where the GPU has tensor cores; "
                            "nchw otherwise (image_classification/precision.py) (default: auto)")
    group.add_argument("--jit", default="no", choices=("no", "script"), help="torch.jit.script the model (default: no)")
    group.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                       help="torch.compile the model for training and evaluation (static shapes: one compile per "
                            "image size); BACKEND defaults to inductor; compile time is logged apart from the "
                            "throughput as train.compile_time / val.compile_time (default: off, eager)")
    group.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                       help="auto: CUDA when available, else CPU (default: auto)")
    group.add_argument("--gpu-affinity", default="none", choices=GPU_AFFINITIES,
                       help="pin each process to CPU cores near its GPU (needs pynvml) (default: none)")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run control, checkpoints and logging")
    group.add_argument("--arch", "-a", default="resnet50", metavar="ARCH",
                       help="model architecture, see README for the list (default: resnet50)")
    group.add_argument("--model-config", "-c", default=None, choices=tuple(INIT_PRESETS), metavar="CONF",
                       help="ResNet init preset: classic | fanin | grp-fanin | grp-fanout; classic and grp-fanout "
                            "mean --conv-init fan_out, fanin and grp-fanin --conv-init fan_in, all --last-bn-0-init "
                            "false; an explicit --conv-init/--last-bn-0-init must agree with it (default: none, "
                            "i.e. those flags' own defaults, which the published recipes use)")
    group.add_argument("--print-freq", "-p", default=10, type=positive_int, metavar="N",
                       help="log every N iterations (default: 10)")
    group.add_argument("--resume", default=None, metavar="PATH", help="continue from this training checkpoint")
    group.add_argument("--auto-resume", action="store_true",
                       help="resume from --workspace/--checkpoint-filename when it exists (for restarts by "
                            "torchrun --max-restarts or a scheduler); start fresh otherwise")
    group.add_argument("--prof", default=-1, type=int, metavar="N",
                       help="stop each train/val phase after N iterations (default: -1, off)")
    group.add_argument("--seed", default=None, type=int, metavar="SEED",
                       help="random seed; the same seed gives the same run (default: random)")
    group.add_argument("--gather-checkpoints", nargs="?", const=-1, default=None, type=_int_or_text,
                       metavar="N",
                       help="per-epoch files (checkpoint_XXXX.pth.tar, named after --checkpoint-filename) to "
                            "keep: 0 = none (only the last and best copies), -1 or no value = all, N = this "
                            "run's last N; files this run did not write are never deleted (default: 0; a "
                            "resumed run keeps the value it was started with)")
    group.add_argument("--raport-file", default="experiment_raport.json", metavar="RAPORT_FILE",
                       help="DLLogger JSON-lines log, written inside --workspace (default: experiment_raport.json)")
    group.add_argument("--tensorboard", nargs="?", const="tensorboard", default=None, metavar="DIR",
                       help="also write the metrics as TensorBoard scalars to DIR inside --workspace "
                            "(default DIR: tensorboard)")
    group.add_argument("--evaluate", action="store_true", help="only evaluate the model on the validation set")
    group.add_argument("--training-only", action="store_true", help="skip validation")
    group.add_argument("--eval-every", default=1, type=positive_int, metavar="N",
                       help="validate every N epochs (and after the last); MLPerf evaluates every 4 (default: 1)")
    group.add_argument("--eval-offset", default=0, type=int, metavar="K",
                       help="with --eval-every N: validate after epochs K, K+N, K+2N, ... counted from 1 "
                            "(default: 0, i.e. N, 2N, ...)")
    group.add_argument("--target-top1", default=None, type=float, metavar="X",
                       help="end the run at the first validation with val.top1 >= X %% and record the epoch in the "
                            "raport (MLPerf's ResNet-50 target is 75.9) (default: off)")
    group.add_argument("--no-checkpoints", action="store_false", dest="save_checkpoints",
                       help="do not write checkpoints")
    group.add_argument("--checkpoint-filename", default="checkpoint.pth.tar", metavar="CHECKPOINT_FILENAME",
                       help="name of the latest-checkpoint copy (default: checkpoint.pth.tar)")
    group.add_argument("--workspace", default="./", metavar="DIR", help="output directory (default: ./)")
    group.add_argument("--topk", default=None, type=positive_int, metavar="K",
                       help=f"second accuracy metric, reported as val.top{{K}} (default: {DEFAULT_TOPK}, or the "
                            "number of classes when there are fewer)")


def _add_quantization_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quantization-aware training (quant_main.py turns --quantize on)")
    group.add_argument("--quantize", action="store_true",
                       help="INT8 quantization-aware training with NVIDIA Model Optimizer: fake-quantize the "
                            "--pretrained-from-file model (weights per channel, activations per tensor), calibrate "
                            "on training batches, then fine-tune (default: off; on for the *-quant archs)")
    group.add_argument("--calib-batches", default=16, type=positive_int, metavar="N",
                       help="--quantize: training batches used to calibrate the activation ranges (default: 16)")


def add_onnx_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--onnx", default=None, metavar="FILE",
                        help="run this exported ONNX model with ONNX Runtime instead of a PyTorch model "
                             "(e.g. the INT8 export of a QAT checkpoint)")


def add_model_flags(parser: argparse.ArgumentParser, helps: Mapping[str, str] | None = None) -> None:
    """The model flags; ``helps``: another tool's wording of some of them, by dest."""
    helps = helps or {}
    group = parser.add_argument_group("model (defaults come from --arch)")
    group.add_argument("--num-classes", "--num_classes", dest="num_classes", default=None, type=positive_int,
                       metavar="N", help=helps.get("num_classes", "output classes (default: the dataset's; 1000 for "
                                                                  "synthetic data)"))
    group.add_argument("--pretrained-from-file", default=None, metavar="PATH",
                       help=helps.get("pretrained_from_file",
                                      "initialise from this weights file (our, NGC or torchvision format)"))
    group.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="NAME",
                       help="start from published ImageNet weights, downloaded once into torch.hub's cache (needs "
                            "network access): NAME is ARCH:TAG, e.g. resnet50:IMAGENET1K_V2 (list them: python -m "
                            "image_classification.models.catalogue); bare, the arch's NVIDIA NGC weights, else "
                            "torchvision's DEFAULT. Their evaluation preprocessing becomes the default")
    flag = dict(nargs="?", const=True, default=None, type=str2bool, metavar="BOOL")
    group.add_argument("--last-bn-0-init", "--last_bn_0_init", dest="last_bn_0_init",
                       help="ResNet: zero-init the last BN of each block", **flag)
    group.add_argument("--trt", help="SE as 1x1 convolutions (TensorRT-friendly export)", **flag)
    group.add_argument("--fused-se", "--fused_se", dest="fused_se",
                       help="ResNet: fuse the SE multiply with the residual add", **flag)
    group.add_argument("--conv-init", "--conv_init", dest="conv_init", default=None,
                       choices=("fan_in", "fan_out"), help="Kaiming init mode of convolutions (default: fan_in)")
    group.add_argument("--bn-momentum", "--bn_momentum", dest="bn_momentum", default=None, type=float,
                       metavar="M", help="EfficientNet: BatchNorm momentum (default: 0.01)")
    group.add_argument("--bn-epsilon", "--bn_epsilon", dest="bn_epsilon", default=None, type=float,
                       metavar="EPS", help="EfficientNet: BatchNorm epsilon (default: 1e-3)")
    group.add_argument("--dropout", default=None, type=float, metavar="P",
                       help="EfficientNet: dropout before the classifier (default: per variant, B0 0.2, B4 0.4)")
    group.add_argument("--survival-prob", "--survival_prob", dest="survival_prob", default=None, type=float,
                       metavar="P", help="EfficientNet: stochastic depth survival probability of the last "
                                         "block (default: per variant; 1.0 = off)")
    group.add_argument("--stochastic-depth-mode", "--stochastic_depth_mode", dest="stochastic_depth_mode",
                       default=None, choices=("row", "batch"),
                       help="EfficientNet: drop each sample's residual branch independently (row) or the "
                            "whole batch's at once, as the reference (batch) (default: row)")


# Model flags forwarded to ModelSpec.build. They default to None ("the architecture's default");
# the ModelSpec decides which of them a family accepts.
MODEL_OPTION_DESTS = ("last_bn_0_init", "trt", "fused_se", "conv_init", "bn_momentum", "bn_epsilon",
                      "dropout", "survival_prob", "stochastic_depth_mode")


def build_parser(prog: str = "main.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train or evaluate an image classifier (ResNet v1.5 / EfficientNet family).",
        formatter_class=argparse.HelpFormatter)
    _add_data_flags(parser)
    _add_optimization_flags(parser)
    _add_precision_flags(parser)
    _add_run_flags(parser)
    _add_quantization_flags(parser)
    add_onnx_flag(parser)
    add_model_flags(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None, defaults: dict[str, Any] | None = None) -> argparse.Namespace:
    """Parse ``argv``; ``defaults`` (from launch.py presets) replace the built-in defaults only."""
    parser = build_parser()
    if defaults:
        _check_presets(parser, defaults)
        parser.set_defaults(**defaults)
    return _bare_pretrained(parser, _bare_gather_checkpoints(parser, parser.parse_args(argv)))


def _bare_gather_checkpoints(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The seed's bare switch right before DIR (``--gather-checkpoints /data``): argparse hands DIR
    to the optional value, so give it back to ``data`` and keep every per-epoch file."""
    value = args.gather_checkpoints
    if isinstance(value, str):
        if args.data is not None:
            parser.error(f"argument --gather-checkpoints: invalid int value: {value!r}")
        args.data, args.gather_checkpoints = value, -1
    return args


def _bare_pretrained(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The reference's bare ``--pretrained`` right before DIR: argparse hands DIR to the optional
    NAME, so a value that is no ``ARCH:TAG`` name goes back to ``data``."""
    from image_classification.models.catalogue import NAME_PATTERN
    value = args.pretrained
    if isinstance(value, str) and not NAME_PATTERN.match(value):
        if args.data is not None:
            parser.error(f"argument --pretrained: {value!r} is not a weights name ARCH:TAG, e.g. resnet50:IMAGENET1K_V2")
        args.data, args.pretrained = value, True
    return args


def _check_presets(parser: argparse.ArgumentParser, presets: dict[str, Any]) -> None:
    """Check preset values as command-line values are checked (argparse checks neither the
    choices nor the types of defaults), so a typo in configs.yml is one clear line."""
    actions = {action.dest: action for action in parser_actions(parser)}
    unknown = set(presets) - set(actions)
    if unknown:
        raise UserError(f"unknown preset key(s): {', '.join(sorted(unknown))}")
    for key, value in presets.items():
        action = actions[key]
        if value is None:
            continue
        if action.type is not None and not isinstance(value, (list, bool)):
            try:
                value = action.type(str(value))
            except (argparse.ArgumentTypeError, ValueError) as error:
                raise UserError(f"preset {key}: {presets[key]!r} is invalid ({error})") from None
        if action.choices is not None and value not in action.choices:
            raise UserError(f"preset {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")


def parser_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every option and positional of ``parser``. argparse has no public way to list them (its
    ``add_argument`` returns each one, but the flags are added in many groups); this is the one
    place that reads the private list."""
    return list(parser._actions)
