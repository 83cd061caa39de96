"""The ``florence`` command: train, eval, classify, models, data, embed, index, search, serve, export."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path

from florence.config import STRATEGIES

_logger = logging.getLogger("florence.cli")

DEFAULT_CHECKPOINT = "runs/quickstart/model.safetensors"


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors list the valid options of the failing command."""

    def error(self, message: str) -> None:  # type: ignore[override]
        options = sorted({flag for action in self._actions for flag in action.option_strings if flag.startswith("--")})
        # An unknown subcommand's message already lists the valid choices.
        hint = f"\nvalid options: {', '.join(options)}" if options and "invalid choice" not in message else ""
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


def _verbose_parent() -> argparse.ArgumentParser:
    """Return a parent parser that accepts -v/--verbose after a subcommand too.

    SUPPRESS keeps a subcommand from resetting a -v given before it.
    """
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return parent


def builtin_config(name: str) -> Path:
    return Path(str(resources.files("florence") / "configs" / f"{name}.yaml"))


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        parents=[_verbose_parent()],
        help="pretrain a model with the UniCL loss",
        description="Pretrain with UniCL. Without --config, trains the built-in quickstart config on "
        "data/cifar10_quickstart (run from the repository root).",
    )
    parser.add_argument("--config", help="YAML training config (default: the built-in quickstart config)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        help="data parallelism under torchrun: ddp replicates the model on every process, fsdp shards its "
        "parameters, gradients and optimizer state (same as strategy=...; default: the config's strategy, ddp "
        "unless set); a single-process run ignores it",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-3 steps=200")
    parser.set_defaults(func=_run_train, parser=parser)


def _add_eval(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint")
    tasks = parser.add_subparsers(dest="task", required=True, parser_class=ArgumentParser)

    zeroshot = tasks.add_parser("zeroshot", parents=[_verbose_parent()], help="zero-shot classification (top-1, top-5)")
    zeroshot.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"model.safetensors (default: {DEFAULT_CHECKPOINT})")
    zeroshot.add_argument("--data", required=True, help="a folder per class, or a CSV of path,label[,class_name]")
    zeroshot.add_argument("--archive", help="zip archive that the CSV paths point into")
    zeroshot.add_argument("--classes", help="classes.txt with one class name per line, in label order")
    zeroshot.add_argument("--templates", default="heldout", help="template set (heldout, imagenet, simple) or a text file, one template per line")
    zeroshot.add_argument("--max-images", type=int, help="evaluate only N images, a seeded random subset")
    zeroshot.add_argument("--batch-size", type=int, default=256)
    zeroshot.add_argument("--json", help="also write the metrics to this JSON file")
    zeroshot.set_defaults(func=_run_eval_zeroshot, parser=zeroshot)

    retrieval = tasks.add_parser("retrieval", parents=[_verbose_parent()], help="image-text retrieval (R@1/5/10 both ways)")
    retrieval.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"model.safetensors (default: {DEFAULT_CHECKPOINT})")
    retrieval.add_argument("--captions", required=True, help="captions TSV (image, caption_idx, caption) or COCO caption JSON")
    retrieval.add_argument("--image-root", help="folder the image paths are relative to (default: the captions file's folder)")
    retrieval.add_argument("--split", choices=["train", "test"], help="search only this part of a seeded image split")
    retrieval.add_argument("--split-sizes", help="N_TRAIN,N_TEST for --split, e.g. 600,200")
    retrieval.add_argument("--split-seed", type=int, default=0, help="seed of the image split (default: 0)")
    retrieval.add_argument("--batch-size", type=int, default=256)
    retrieval.add_argument("--json", help="also write the metrics to this JSON file")
    retrieval.set_defaults(func=_run_eval_retrieval, parser=retrieval)


def _add_classify(subparsers) -> None:
    parser = subparsers.add_parser("classify", parents=[_verbose_parent()], help="rank your own labels for images (zero-shot)")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--labels", required=True, help='comma-separated labels, e.g. "cat,dog,rocket"')
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"model.safetensors (default: {DEFAULT_CHECKPOINT})")
    parser.add_argument("--templates", default="heldout", help="template set (heldout, imagenet, simple) or a text file")
    parser.add_argument("--top", type=int, default=5, help="labels to print per image")
    parser.set_defaults(func=_run_classify, parser=parser)


def _add_models(subparsers) -> None:
    parser = subparsers.add_parser("models", parents=[_verbose_parent()], help="list model names and parameter counts")
    parser.set_defaults(func=_run_models, parser=parser)


def _add_data(subparsers) -> None:
    parser = subparsers.add_parser("data", help="prepare training data")
    commands = parser.add_subparsers(dest="data_command", required=True, parser_class=ArgumentParser)
    shards = commands.add_parser(
        "shards",
        parents=[_verbose_parent()],
        help="write training sources to tar shards for streaming",
        description="Write tar shards in the img2dataset layout (<key>.jpg, <key>.txt, <key>.json) and an "
        "index of sample counts, from the data.train sources of --config or from one source given by "
        "--type and its path options. A rerun with the same settings keeps finished shards.",
    )

    shards.add_argument("--config", help="training config whose data.train sources are written")
    shards.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of --config, e.g. data.train.0.root=...")

    shards.add_argument("--type", choices=["classification", "captions", "coco"], help="type of a single source to write")
    shards.add_argument("--root", help="classification: folder with one subfolder per class")
    shards.add_argument("--path", help="captions: CSV/TSV/JSONL; coco: caption JSON; classification: CSV of path,class_name")
    shards.add_argument("--archive", help="classification: zip archive that the CSV paths point into")
    shards.add_argument("--classes-file", help="classification: class names, one per line, in label order")
    shards.add_argument("--image-root", help="captions/coco: folder the image paths are relative to")
    shards.add_argument("--split", choices=["train", "test"], help="captions/coco: keep this part of a seeded image split")
    shards.add_argument("--split-sizes", help="N_TRAIN,N_TEST for --split, e.g. 600,200")
    shards.add_argument("--split-seed", type=int, default=0, help="seed of the image split (default: 0)")

    shards.add_argument("--output", required=True, help="folder for the shards and the index")
    shards.add_argument("--pattern", default="train-%06d.tar", help="shard file name with a %%d field (default: train-%%06d.tar)")
    shards.add_argument("--index-name", default="index.json", help="file name of the index in --output (default: index.json)")
    shards.add_argument("--max-samples", type=int, default=10_000, help="maximum samples per shard (default: 10000)")
    shards.add_argument("--max-size-mb", type=float, default=1000.0, help="close a shard once it reaches this size in MB (default: 1000)")
    shards.add_argument("--limit", type=int, help="write only the first N samples of the shuffled order")
    shards.add_argument("--seed", type=int, default=0, help="seed of the sample order (default: 0)")
    shards.add_argument("--no-shuffle", action="store_true", help="keep the sources' sample order instead of shuffling")

    shards.set_defaults(func=_run_data_shards, parser=shards)


def _add_embed(subparsers) -> None:
    parser = subparsers.add_parser(
        "embed",
        parents=[_verbose_parent()],
        help="embed images (and texts) into a Parquet embeddings folder",
        description="Embed images from files, folders, globs, CSV/TSV files with a path column, or .tar "
        "shards, and texts from --texts, into Parquet parts in --out. A rerun with the same --out embeds "
        "only what is not there yet; unreadable images are listed and skipped.",
    )
    parser.add_argument("inputs", nargs="*", metavar="PATH", help="image files, folders, globs, CSV/TSV files or .tar shards")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"model.safetensors (default: {DEFAULT_CHECKPOINT})")
    parser.add_argument("--out", required=True, help="embeddings folder (created if missing, resumed if present)")
    parser.add_argument("--texts", help="text file with one text to embed per line")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument(
        "--rows-per-part",
        type=int,
        default=1024,
        help="rows per Parquet part, exact except for a run's last part; the unit of resuming (default: 1024)",
    )
    parser.add_argument("--max-pixels", type=int, help="skip images with more pixels than this (default: PIL's decompression-bomb limit)")
    parser.set_defaults(func=_run_embed, parser=parser)


def _add_index(subparsers) -> None:
    parser = subparsers.add_parser("index", help="build a FAISS index of embeddings")
    commands = parser.add_subparsers(dest="index_command", required=True, parser_class=ArgumentParser)
    build = commands.add_parser(
        "build",
        parents=[_verbose_parent()],
        help="build a FAISS index from an embeddings folder",
        description="Index the image embeddings of a 'florence embed' folder. --kind auto uses exact search "
        "(flat) up to --exact-max vectors and an HNSW graph above.",
    )
    build.add_argument("embeddings", help="embeddings folder written by 'florence embed'")
    build.add_argument("--out", required=True, help="index folder")
    build.add_argument("--kind", default="auto", choices=["auto", "flat", "hnsw", "ivf"], help="index kind (default: auto)")
    build.add_argument("--exact-max", type=int, help="largest collection that auto indexes exactly (default: 100000)")
    build.add_argument("--hnsw-m", type=int, default=32, help="hnsw: neighbours per node (default: 32)")
    build.add_argument("--ef-search", type=int, default=128, help="hnsw: candidate list size at search time (default: 128)")
    build.add_argument("--nlist", type=int, help="ivf: number of k-means cells (default: about 4 * sqrt(N))")
    build.add_argument("--nprobe", type=int, default=16, help="ivf: cells searched per query (default: 16)")
    build.set_defaults(func=_run_index_build, parser=build)


DEFAULT_SEARCH_K = 10


def _add_search(subparsers) -> None:
    parser = subparsers.add_parser(
        "search",
        parents=[_verbose_parent()],
        help="search an index by text or by image",
        description="Print the k indexed images most similar to a text query or to --image, with cosine scores.",
    )
    parser.add_argument("query", nargs="?", help='text query, e.g. "a dog on a beach"')
    parser.add_argument("--image", help="search with this image instead of a text")
    parser.add_argument("--index", required=True, help="index folder written by 'florence index build'")
    parser.add_argument(
        "-k",
        type=int,
        help=f"number of results, from 1 to the number of indexed images (default: {DEFAULT_SEARCH_K}, or all images of a smaller index)",
    )
    parser.add_argument("--checkpoint", help="model.safetensors (default: the checkpoint the index was built with)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON lines")
    parser.set_defaults(func=_run_search, parser=parser)


def _add_serve(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        parents=[_verbose_parent()],
        help="serve the HTTP API and web page",
        description="Serve embedding, zero-shot classification and (with --index) search over HTTP with "
        "FastAPI under uvicorn, and a web page at /. The API schema is at /openapi.json.",
    )
    parser.add_argument("--checkpoint", help=f"model.safetensors (default: the index's checkpoint, else {DEFAULT_CHECKPOINT})")
    parser.add_argument("--index", help="index folder; without it the search routes return 503")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind, 0 for any free port (default: 8000)")
    parser.add_argument("--templates", default="simple", help="prompt templates of /classify: heldout, imagenet, simple or a file (default: simple)")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body in MiB (default: 10)")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="largest uploaded image in pixels (default: 40000000)")
    parser.add_argument("--max-labels", type=int, default=100, help="maximum labels per /classify request (default: 100)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="maximum requests per model batch (default: 32)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests, in ms (default: 5)")
    parser.set_defaults(func=_run_serve, parser=parser)


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        parents=[_verbose_parent()],
        help="export the image and text towers to ONNX or TorchScript",
        description="Write image_tower and text_tower files with a dynamic batch axis, and export.json "
        "describing their inputs and outputs.",
    )
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"model.safetensors (default: {DEFAULT_CHECKPOINT})")
    parser.add_argument("--format", default="onnx", choices=["onnx", "torchscript"], help="export format (default: onnx)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.set_defaults(func=_run_export, parser=parser)


def _add_benchmark(subparsers) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        parents=[_verbose_parent()],
        help="run an evaluation suite (datasets x tasks) and write records, tables and a chart",
        description="Run every task of a suite YAML for one model. Each run writes a JSON record; runs "
        "with an up-to-date record are skipped, so an interrupted suite resumes. Then results.csv, "
        "results.md and results.png are written across all records in the output folder.",
    )
    parser.add_argument("--suite", required=True, help="suite YAML file, e.g. suites/shared_data.yaml")
    parser.add_argument(
        "--model",
        required=True,
        help="a florence checkpoint (model.safetensors or its folder), a florence model name "
        "(random init), or open_clip:ARCH[:/path/to/weights]",
    )
    parser.add_argument("--output", help="output folder (default: runs/benchmark/<suite name>)")
    parser.add_argument("--rerun", action="store_true", help="run every task again, even those with an up-to-date record")
    parser.add_argument(
        "--device", default="cpu", help="torch device for the model: cpu, cuda or cuda:N (default: cpu)"
    )
    parser.set_defaults(func=_run_benchmark, parser=parser)


def _positive_int(text: str) -> int:
    """Parse an integer option that must be at least 1; argparse reports the error with the option name."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range; pass an integer of 1 or more")
    return value


def _add_video(subparsers) -> None:
    parser = subparsers.add_parser("video", help="video models: action recognition (zero-shot or fine-tuned), embedding and search")
    commands = parser.add_subparsers(dest="video_command", required=True, parser_class=ArgumentParser)
    classify = commands.add_parser(
        "classify", parents=[_verbose_parent()], help="rank action labels for video clips (zero-shot)"
    )
    classify.add_argument("clips", nargs="+", help="video files (mp4, mkv, avi, webm, gif, ...)")
    labels = classify.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help='comma-separated labels, e.g. "playing guitar,yoga"')
    labels.add_argument("--label-map", help="kinetics400, ucf101, ntu60, or a text file with one label per line")
    classify.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"model.safetensors (default: {DEFAULT_CHECKPOINT})")
    classify.add_argument("--templates", default="video", help="template set (video, heldout, imagenet, simple) or a text file")
    classify.add_argument("--tower", choices=("frames", "video"), default="frames",
                          help="frames: mean of per-frame image embeddings; video: inflated Video CoSwin")
    classify.add_argument("--num-frames", type=_positive_int, default=8, help="frames per clip (default: 8)")
    classify.add_argument("--sampling", choices=("uniform", "dense"), default="uniform", help="frame sampling (default: uniform)")
    classify.add_argument("--frame-interval", type=_positive_int, default=2, help="frames between samples in dense sampling")
    classify.add_argument("--num-clips", type=_positive_int, default=1, help="temporal test clips per video")
    classify.add_argument("--num-crops", type=int, choices=(1, 3), default=1, help="spatial test crops per clip")
    classify.add_argument("--image-size", type=_positive_int, help="crop size in pixels (default: the model's input size)")
    classify.add_argument("--top", type=_positive_int, default=5, help="labels to print per clip")
    classify.set_defaults(func=_run_video_classify, parser=classify)

    train = commands.add_parser(
        "train", parents=[_verbose_parent()], help="fine-tune a Video CoSwin classifier inflated from a checkpoint"
    )
    train.add_argument("data", help="CSV with path and label columns, or a folder with one subfolder per class")
    train.add_argument("--output-dir", required=True, help="folder for checkpoints and metrics.jsonl (resumed if present)")
    train.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"image model to inflate (default: {DEFAULT_CHECKPOINT})")
    train.add_argument("--label-column", default="label", help="CSV column with the class name (default: label)")
    train.add_argument("--epochs", type=_positive_int, default=30, help="maximum epochs (default: 30)")
    train.add_argument("--clips-per-video", type=_positive_int, default=3, help="random temporal crops of each video per epoch (default: 3)")
    train.add_argument("--batch-size", type=_positive_int, default=4,
                       help="clips per process and forward pass (default: 4); the global batch is "
                            "batch size x --accum-steps x processes")
    train.add_argument("--accum-steps", type=_positive_int, default=1, help="forward passes per optimizer step (default: 1)")
    train.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: 0.001)")
    train.add_argument("--grad-clip", type=float, default=1.0, help="maximum gradient norm; 0 turns clipping off (default: 1.0)")
    train.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="fp32",
                       help="autocast precision; fp16 adds loss scaling, auto picks bf16 where the device "
                            "has bfloat16 matrix instructions and fp32 elsewhere (default: fp32)")
    train.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda:LOCAL_RANK if available, else cpu)")
    train.add_argument("--workers", type=int, default=0, help="data loading processes per training process (default: 0)")
    train.add_argument("--checkpoint-every", type=int, default=0,
                       help="also checkpoint every N steps; 0 checkpoints after each epoch only (default: 0)")
    train.add_argument("--seed", type=int, default=0,
                       help="seed of the new classifier head, the data order and augmentation (default: 0)")
    train.add_argument("--num-frames", type=_positive_int, default=8, help="frames per clip (default: 8)")
    train.add_argument("--sampling", choices=("uniform", "dense"), default="uniform", help="frame sampling (default: uniform)")
    train.add_argument("--image-size", type=_positive_int, help="crop size in pixels (default: the model's input size)")
    train.add_argument("--temporal-window", type=_positive_int, default=2, help="attention window length in temporal tokens (default: 2)")
    train.set_defaults(func=_run_video_train, parser=train)

    embed = commands.add_parser(
        "embed",
        parents=[_verbose_parent()],
        help="embed videos into a 'florence embed' folder for 'florence index build' and 'florence search'",
    )
    embed.add_argument("clips", nargs="+", help="video files")
    embed.add_argument("--out", required=True, help="embeddings folder (created if missing, resumed if present)")
    embed.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"model.safetensors (default: {DEFAULT_CHECKPOINT})")
    embed.add_argument("--num-frames", type=_positive_int, default=8, help="frames sampled per video (default: 8)")
    embed.add_argument("--tower", choices=("frames", "video"), default="frames",
                       help="frames: mean of per-frame image embeddings; video: inflated Video CoSwin")
    embed.set_defaults(func=_run_video_embed, parser=embed)
    _add_video_eval(commands)
    _add_video_search(commands)


def _add_video_eval(commands) -> None:
    evaluate = commands.add_parser(
        "eval",
        parents=[_verbose_parent()],
        help="action recognition accuracy of a fine-tuned classifier or of zero-shot labels on labelled videos",
        description="Score every video of DATA over num-clips x num-crops test views, average the scores, and "
        "print top-1, top-5 and mean per-class recall in percent with 95% bootstrap intervals over the videos.",
    )
    evaluate.add_argument("data", help="CSV with path and label columns, or a folder with one subfolder per class")
    evaluate.add_argument("--checkpoint", help="the --output-dir of 'florence video train' or one of its "
                          f"checkpoints/step_* folders; with --zero-shot, a Florence model.safetensors (default: {DEFAULT_CHECKPOINT})")
    evaluate.add_argument("--zero-shot", action="store_true", help="rank class names by image-text similarity instead of a trained head")
    labels = evaluate.add_mutually_exclusive_group()
    labels.add_argument("--labels", help="--zero-shot: comma-separated class names (default: the labels in DATA)")
    labels.add_argument("--label-map", help="--zero-shot: kinetics400, ucf101, ntu60, or a text file with one class per line")
    evaluate.add_argument("--label-column", default="label", help="CSV column with the class name (default: label)")
    evaluate.add_argument("--templates", help="--zero-shot: template set (video, heldout, imagenet, simple) or a text file (default: video)")
    evaluate.add_argument("--tower", choices=("frames", "video"), help="--zero-shot: frames (mean of per-frame image "
                          "embeddings, the default) or video (inflated Video CoSwin)")
    evaluate.add_argument("--num-frames", type=_positive_int, help="frames per clip (default: the classifier's, or 8 with --zero-shot)")
    evaluate.add_argument("--sampling", choices=("uniform", "dense"), help="frame sampling (default: the classifier's, or uniform)")
    evaluate.add_argument("--frame-interval", type=_positive_int, help="frames between samples in dense sampling (default: the classifier's, or 2)")
    evaluate.add_argument("--num-clips", type=_positive_int, default=1, help="temporal test clips per video (default: 1)")
    evaluate.add_argument("--num-crops", type=int, choices=(1, 3), default=1, help="spatial test crops per clip (default: 1)")
    evaluate.add_argument("--image-size", type=_positive_int, help="crop size in pixels (default: the classifier's or the model's input size)")
    evaluate.add_argument("--bootstrap-samples", type=_positive_int, default=1000, help="resamples behind the 95%% intervals (default: 1000)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default: 0)")
    evaluate.add_argument("--per-video", action="store_true", help="also print each video's label and top-1 prediction")
    evaluate.add_argument("--out", help="write the metrics, settings and per-video predictions to this JSON file")
    evaluate.set_defaults(func=_run_video_eval, parser=evaluate)


def _add_video_search(commands) -> None:
    search = commands.add_parser(
        "search",
        parents=[_verbose_parent()],
        help="search a video index by text, or rank candidate captions for a video",
        description="With --index: print the videos of an index (from 'florence video embed' and 'florence index "
        "build') most similar to QUERY. With --captions-json: rank each listed video's candidate captions.",
    )
    search.add_argument("query", nargs="?", help='text query, e.g. "a dog playing in the snow"')
    search.add_argument("--index", help="index folder built from 'florence video embed' output")
    search.add_argument("--top", type=_positive_int, help=f"number of videos (default: {DEFAULT_SEARCH_K}, or all of a smaller index)")
    search.add_argument("--captions-json", help="JSON file with 'video', 'candidates' and optional 'intended_match_index' "
                        "(one object or a list); ranks the candidates for each video instead of searching an index")
    search.add_argument("--checkpoint", help=f"model.safetensors (default: the index's checkpoint, else {DEFAULT_CHECKPOINT})")
    search.add_argument("--num-frames", type=_positive_int, default=8, help="--captions-json: frames sampled per clip (default: 8)")
    search.add_argument("--num-clips", type=_positive_int, default=1, help="--captions-json: temporal clips per video, embeddings averaged (default: 1)")
    search.add_argument("--tower", choices=("frames", "video"), default="frames",
                        help="--captions-json: frames (mean of per-frame image embeddings) or video (inflated Video CoSwin)")
    search.add_argument("--json", action="store_true", help="print the results as JSON lines")
    search.set_defaults(func=_run_video_search, parser=search)
DETECT_USAGE = """florence detect train --data ROOT [options]
       florence detect eval --checkpoint CKPT --data ROOT [ROOT ...] [--zero-shot] [options]
       florence detect IMAGE --classes "person,dog" --checkpoint CKPT --out FILE.png"""


def _add_detect(subparsers) -> None:
    parser = subparsers.add_parser(
        "detect",
        parents=[_verbose_parent()],
        help="object detection: train, eval, or detect classes in an image",
        usage=DETECT_USAGE,
        description="Train and evaluate the Dynamic Head detector, or draw detections on IMAGE. "
        "Run 'florence detect train -h' or 'florence detect eval -h' for their options.",
    )
    parser.add_argument("target", help="train, eval, or an image file")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="options of that command")
    parser.set_defaults(func=_run_detect, parser=parser)


def _detect_train_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="florence detect train", parents=[_verbose_parent()], description="Train a detector on a COCO-format split.")
    parser.add_argument("--data", required=True, help="dataset folder: instances.json + images/, or annotations/instances_SPLIT.json + images/SPLIT/")
    parser.add_argument("--split", help="split name for the annotations/ layout, e.g. train")
    parser.add_argument("--images", help="START:STOP range of the images sorted by id, e.g. 0:32 (default: all)")
    parser.add_argument("--output-dir", default="runs/detect", help="checkpoints, metrics.jsonl and model.safetensors go here")
    parser.add_argument("--backbone", default="florence-t", help="florence model whose CoSwin and text tower to use (default: florence-t)")
    parser.add_argument("--backbone-overrides", default="{}", help="JSON merged into the backbone model config, e.g. a smaller vision_cfg")
    parser.add_argument("--init-from", help="Florence model.safetensors to initialise CoSwin and the text tower from")
    parser.add_argument("--classifier", choices=["text", "linear"], default="text", help="text: dot product with prompt embeddings; linear: closed set")
    parser.add_argument("--channels", type=int, default=256, help="FPN and Dynamic Head channels")
    parser.add_argument("--blocks", type=int, default=6, help="Dynamic Head blocks")
    parser.add_argument("--image-size", type=int, default=640, help="longer image side in pixels")
    parser.add_argument("--no-flip", action="store_true", help="turn off random horizontal flips")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    parser.add_argument("--max-seconds", type=float, default=0.0, help="stop after this many seconds of training (0: no limit)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    return parser


def _detect_eval_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="florence detect eval", parents=[_verbose_parent()], description="COCO AP of a detector on COCO-format splits.")
    parser.add_argument("--checkpoint", required=True, help="detector model.safetensors from 'florence detect train'")
    parser.add_argument("--data", required=True, nargs="+", help="one or more dataset folders")
    parser.add_argument("--split", help="split name for the annotations/ layout, e.g. valid; a list such as test,val,valid takes the first that exists")
    parser.add_argument("--images", help="START:STOP range of the images sorted by id (default: all)")
    parser.add_argument("--zero-shot", action="store_true", help="prompt with each dataset's own class names and write a table across datasets")
    parser.add_argument("--table", help="with --zero-shot, also write the Markdown table to this file")
    parser.add_argument("--label", help="model column name in the table (default: the folder of --checkpoint)")
    parser.add_argument("--image-size", type=int, default=640, help="longer image side in pixels")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    return parser


def _detect_image_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="florence detect IMAGE", parents=[_verbose_parent()], description="Detect the named classes in one image and draw them.")
    parser.add_argument("--classes", required=True, help='comma-separated class names, e.g. "person,dog"')
    parser.add_argument("--checkpoint", required=True, help="detector model.safetensors")
    parser.add_argument("--out", required=True, help="output image with the boxes drawn, e.g. boxes.png")
    parser.add_argument("--min-score", type=float, default=0.3, help="draw detections scoring at least this (0-1)")
    parser.add_argument("--image-size", type=int, default=640, help="longer image side in pixels")
    return parser


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="florence", description="Florence vision foundation model toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_classify(subparsers)
    _add_models(subparsers)
    _add_data(subparsers)
    _add_embed(subparsers)
    _add_index(subparsers)
    _add_search(subparsers)
    _add_serve(subparsers)
    _add_export(subparsers)
    _add_benchmark(subparsers)
    _add_video(subparsers)
    _add_detect(subparsers)
    return parser


def _run_train(args) -> int:
    from florence.config import load_config
    from florence.evaluation.tasks import build_evaluator
    from florence.training.distributed import leave_process_group
    from florence.training.trainer import Trainer

    config_path = args.config
    if config_path is None:
        config_path = builtin_config("quickstart")
        _logger.info("no --config given; using the built-in quickstart config %s", config_path)
    overrides = list(args.overrides) + (["resume=true"] if args.resume else [])
    if args.strategy is not None:
        overrides.append(f"strategy={args.strategy}")
    config = load_config(config_path, overrides)

    trainer = Trainer(config)
    results = trainer.fit(evaluate=build_evaluator(config, trainer.tokenizer))
    # Every rank waits for rank 0's final evaluation, then leaves the process group before
    # exiting: a Gloo group torn down by interpreter exit can abort under FSDP.
    leave_process_group(trainer.distributed)
    if trainer.distributed.is_main_process:
        _print_results(results)
        print(f"weights: {Path(config.output_dir) / 'model.safetensors'}")
    return 0


def _print_results(results: dict) -> None:
    for key, value in results.items():
        if isinstance(value, float):
            print(f"{key}: {value:.2f}")
        else:
            print(f"{key}: {value}")


def _write_json(path: str | None, results: dict) -> None:
    if path:
        from florence.checkpoint import atomic_write_bytes

        atomic_write_bytes(path, json.dumps(results, indent=2).encode())


def _run_eval_zeroshot(args) -> int:
    from florence.checkpoint import load_model
    from florence.evaluation.tasks import run_zero_shot
    from florence.tokenizer import get_tokenizer

    model = load_model(args.checkpoint)
    results = run_zero_shot(
        model,
        get_tokenizer(),
        root=args.data,
        archive=args.archive,
        classes_file=args.classes,
        templates=args.templates,
        max_images=args.max_images,
        batch_size=args.batch_size,
    )
    _print_results(results)
    _write_json(args.json, results)
    return 0


def _run_eval_retrieval(args) -> int:
    from florence.checkpoint import load_model
    from florence.evaluation.tasks import run_retrieval
    from florence.tokenizer import get_tokenizer

    model = load_model(args.checkpoint)
    results = run_retrieval(
        model,
        get_tokenizer(),
        path=args.captions,
        image_root=args.image_root,
        split=args.split,
        split_sizes=_parse_sizes(args.split_sizes),
        split_seed=args.split_seed,
        batch_size=args.batch_size,
    )
    _print_results(results)
    _write_json(args.json, results)
    return 0


def _parse_sizes(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--split-sizes {text!r} must be two integers, e.g. 600,200") from None


def _run_classify(args) -> int:
    from florence.checkpoint import load_model
    from florence.evaluation.tasks import classify_files
    from florence.tokenizer import get_tokenizer

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if len(labels) < 2:
        raise ValueError(f"--labels {args.labels!r} must name at least two comma-separated labels")
    model = load_model(args.checkpoint)
    for path, ranking in classify_files(model, get_tokenizer(), args.images, labels, templates=args.templates):
        print(path)
        for label, probability in ranking[: args.top]:
            print(f"  {probability * 100:6.2f}%  {label}")
    return 0


def _shard_source_configs(args) -> list:
    """Return the SourceConfig entries that ``florence data shards`` writes."""
    from florence.config import SourceConfig, load_config

    single = args.type is not None
    if args.config is not None and single:
        raise ValueError("give either --config or --type with its path options, not both")
    if args.config is None and not single:
        raise ValueError("give --config (write its data.train sources) or --type with --root or --path (write one source)")
    if args.overrides and not args.config:
        raise ValueError(f"overrides {' '.join(args.overrides)} need --config")

    if single:
        return [
            SourceConfig(
                type=args.type,
                root=args.root,
                path=args.path,
                archive=args.archive,
                image_root=args.image_root,
                classes_file=args.classes_file,
                split=args.split,
                split_sizes=_parse_sizes(args.split_sizes),
                split_seed=args.split_seed,
            )
        ]
    config = load_config(args.config, args.overrides)
    streamed = [entry.urls for entry in config.data.train if entry.type == "webdataset"]
    if streamed:
        raise ValueError(f"{args.config} already trains from shards ({', '.join(map(str, streamed))}); there is nothing to write")
    return config.data.train


def _run_data_shards(args) -> int:
    from florence.data.shards import write_shards
    from florence.training.data import build_source

    sources = [build_source(entry) for entry in _shard_source_configs(args)]
    index = write_shards(
        sources,
        args.output,
        pattern=args.pattern,
        max_samples=args.max_samples,
        max_size_mb=args.max_size_mb,
        seed=args.seed,
        shuffle=not args.no_shuffle,
        limit=args.limit,
        index_name=args.index_name,
    )
    print(f"shards: {len(index.shards)}")
    print(f"samples: {index.total_samples}")
    print(f"skipped: {index.skipped}")
    print(f"index: {Path(args.output) / args.index_name}")
    return 0


def _run_models(args) -> int:
    from florence.models import count_parameters, create_model, list_models

    print(f"{'model':<16}{'image':>10}{'text':>10}{'total':>10}  (parameters, millions)")
    for name in list_models():
        model = create_model(name, device="meta")
        image = count_parameters(model.visual) + model.image_projection.weight.numel()
        text = count_parameters(model.text) + model.text_projection.weight.numel()
        print(f"{name:<16}{image / 1e6:>10.1f}{text / 1e6:>10.1f}{count_parameters(model) / 1e6:>10.1f}")
    return 0


def _quiet_faiss_loader(args) -> None:
    """Keep the INFO lines that faiss logs on import (which CPU build it loads) out of the log, unless -v."""
    if not args.verbose:
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def _run_embed(args) -> int:
    from florence.serving.collection import list_images
    from florence.serving.embed import (
        DEFAULT_MAX_PIXELS,
        Embedder,
        EmbeddingStore,
        build_manifest,
        embed_images,
        embed_texts,
    )

    _quiet_faiss_loader(args)
    if not args.inputs and not args.texts:
        raise ValueError("nothing to embed; pass image PATHs, --texts FILE, or both")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} is out of range; pass at least 1")
    if args.rows_per_part < 1:
        raise ValueError(f"--rows-per-part {args.rows_per_part} is out of range; pass at least 1")
    sources = list_images(args.inputs)
    texts = []
    if args.texts:
        texts = [line.strip() for line in Path(args.texts).read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.inputs and not sources:
        raise ValueError(f"no images found in {' '.join(args.inputs)}; image names must end in .jpg, .png, .webp or similar")

    embedder = Embedder.from_checkpoint(args.checkpoint)
    store = EmbeddingStore(args.out)
    store.open_for(build_manifest(embedder, args.checkpoint))
    images = embed_images(
        embedder,
        sources,
        store,
        batch_size=args.batch_size,
        rows_per_part=args.rows_per_part,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
    )
    embedded = images.embedded + images.already_embedded
    unreadable = len(images.failed) + images.already_failed
    print(
        f"images: {embedded + unreadable} listed, {embedded} embedded ({images.embedded} now, {images.already_embedded} earlier), "
        f"{unreadable} unreadable ({len(images.failed)} now, {images.already_failed} earlier, not retried)"
    )
    for source, error in images.failed:
        print(f"  unreadable: {source}: {error}")
    if texts:
        text_summary = embed_texts(embedder, texts, store, rows_per_part=args.rows_per_part)
        embedded = text_summary.embedded + text_summary.already_embedded
        print(f"texts: {embedded} embedded ({text_summary.embedded} now, {text_summary.already_embedded} earlier)")
    print(f"embeddings: {args.out}")
    return 0


def _run_index_build(args) -> int:
    from florence.serving.index import DEFAULT_EXACT_MAX, IndexParams, build_index

    _quiet_faiss_loader(args)
    params = IndexParams(hnsw_m=args.hnsw_m, ef_search=args.ef_search, nlist=args.nlist, nprobe=args.nprobe)
    exact_max = DEFAULT_EXACT_MAX if args.exact_max is None else args.exact_max
    index = build_index(args.embeddings, kind=args.kind, exact_max=exact_max, params=params)
    index.save(args.out)
    print(f"index: {args.out} ({index.kind}, {len(index)} images, size {index.dim})")
    return 0


def _serving_checkpoint(checkpoint: str | None, index) -> str:
    """Return the checkpoint to embed queries with, checking that it made the index's embeddings."""
    from florence.serving.embed import file_sha256

    if index is None:
        return checkpoint or DEFAULT_CHECKPOINT
    if checkpoint is None:
        checkpoint = index.meta.get("checkpoint") or DEFAULT_CHECKPOINT
    expected = index.meta.get("checkpoint_sha256")
    if expected and file_sha256(checkpoint) != expected:
        raise ValueError(
            f"checkpoint {checkpoint} is not the one the index was built with ({index.meta.get('checkpoint')}); "
            "query and index embeddings must come from the same weights"
        )
    return checkpoint


def _run_search(args) -> int:
    from florence.data.sources import IMAGE_LOAD_ERRORS
    from florence.serving.collection import (
        ImageTooLargeError,
        decode_image,
        describe_read_error,
    )
    from florence.serving.index import SearchIndex

    _quiet_faiss_loader(args)
    if (args.query is None) == (args.image is None):
        raise ValueError('give either a text query or --image FILE, e.g. florence search "a dog on a beach" --index DIR')
    index = SearchIndex.load(args.index)
    k = min(DEFAULT_SEARCH_K, len(index)) if args.k is None else args.k
    if not 1 <= k <= len(index):
        raise ValueError(f"k={k} is out of range; pass 1 <= k <= {len(index)}, the number of indexed images")

    image = None
    if args.image is not None:
        try:
            image = decode_image(Path(args.image).read_bytes())
        except (*IMAGE_LOAD_ERRORS, ImageTooLargeError) as error:
            raise ValueError(f"cannot read image {args.image}: {describe_read_error(error)}") from None

    _print_search_hits(index, args.checkpoint, k, args.json, text=args.query, image=image)
    return 0


def _print_search_hits(index, checkpoint: str | None, k: int, as_json: bool, text: str | None = None, image=None) -> None:
    """Embed a text or an image query with the index's checkpoint and print the ``k`` best rows."""
    from florence.serving.embed import Embedder

    embedder = Embedder.from_checkpoint(_serving_checkpoint(checkpoint, index))
    query = embedder.encode_images([image]) if image is not None else embedder.encode_texts([text])

    for rank, hit in enumerate(index.search(query, k)[0], start=1):
        if as_json:
            print(json.dumps({"rank": rank, "score": hit.score, "source": hit.source}))
        else:
            print(f"{rank:3d}  {hit.score:.4f}  {hit.source}")


def _run_serve(args) -> int:
    from florence.serving._optional import require
    from florence.serving.app import create_app
    from florence.serving.embed import Embedder
    from florence.serving.index import SearchIndex
    from florence.serving.service import BatchingSettings, ModelService, ServerLimits

    _quiet_faiss_loader(args)
    uvicorn = require("uvicorn")
    index = SearchIndex.load(args.index) if args.index else None
    embedder = Embedder.from_checkpoint(_serving_checkpoint(args.checkpoint, index))
    service = ModelService(
        embedder,
        index,
        templates=args.templates,
        batching=BatchingSettings(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms),
    )
    limits = ServerLimits(
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_labels=args.max_labels,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        _logger.warning("binding to %s makes the server reachable from other machines; it has no authentication", args.host)
    uvicorn.run(create_app(service, limits), host=args.host, port=args.port, log_config=None)
    return 0


def _run_export(args) -> int:
    from florence.checkpoint import load_model
    from florence.export import export_model

    paths = export_model(load_model(args.checkpoint), args.out, args.format)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _run_benchmark(args) -> int:
    from florence.evaluation.models import check_device, load_eval_model
    from florence.evaluation.report import write_reports
    from florence.evaluation.runner import run_suite
    from florence.evaluation.suite import load_suite

    suite = load_suite(args.suite)
    device = check_device(args.device)
    model = load_eval_model(args.model, seed=suite.seed).to(device)
    output = Path(args.output) if args.output else Path("runs") / "benchmark" / suite.name
    run_suite(suite, model, output, rerun=args.rerun)
    for path in write_reports(output):
        print(f"wrote {path}")
    print((output / "results.md").read_text(encoding="utf-8"), end="")
    return 0


def _run_video_classify(args) -> int:
    from florence.adapters.video.io import VideoDecodeError
    from florence.adapters.video.zeroshot import classify_videos
    from florence.checkpoint import load_model
    from florence.tokenizer import get_tokenizer

    labels = _video_labels(args)
    templates = _video_templates(args.templates)
    _check_video_files(args.clips)

    model = load_model(args.checkpoint)
    try:
        predictions = classify_videos(
            model,
            get_tokenizer(),
            args.clips,
            labels,
            templates=templates,
            num_frames=args.num_frames,
            image_size=args.image_size,
            mode=args.sampling,
            frame_interval=args.frame_interval,
            num_clips=args.num_clips,
            num_crops=args.num_crops,
            tower=args.tower,
            top=args.top,
        )
    except VideoDecodeError as error:
        raise ValueError(f"{error}; check that the file is a complete video") from error
    for prediction in predictions:
        print(prediction.path)
        for label, probability in zip(prediction.top_labels, prediction.top_probabilities):
            print(f"  {probability * 100:6.2f}%  {label}")
    return 0


def _check_video_files(clips: list[str]) -> None:
    """Raise for a clip argument that is a folder, a still image or a missing file."""
    folders = [clip for clip in clips if Path(clip).is_dir()]
    if folders:
        raise ValueError(f"{', '.join(folders)} is a folder; pass the video files in it, e.g. {folders[0]}/*.mp4")
    images = [clip for clip in clips if Path(clip).suffix.lower() in _STILL_IMAGE_EXTENSIONS]
    if images:
        raise ValueError(f"{', '.join(images)} is a still image, not a video; use 'florence embed' for images")
    missing = [clip for clip in clips if not Path(clip).is_file()]
    if missing:
        raise FileNotFoundError(f"video files not found: {', '.join(missing)}")


# GIF is missing on purpose because the video commands decode animated GIFs as videos.
_STILL_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _video_labels(args) -> list[str]:
    """Return the class names of --labels or --label-map."""
    from florence.adapters.video.zeroshot import read_label_map

    if args.labels is None:
        labels, option = read_label_map(args.label_map), f"--label-map {args.label_map}"
    else:
        labels, option = [label.strip() for label in args.labels.split(",") if label.strip()], f"--labels {args.labels!r}"
        if len(labels) < 2:
            raise ValueError(f"{option} must name at least two comma-separated labels")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"{option} names these labels more than once: {', '.join(map(repr, duplicates))}; list each label once")
    return labels


def _video_templates(spec: str) -> list[str]:
    from florence.adapters.video.zeroshot import VIDEO_TEMPLATES
    from florence.evaluation.templates import resolve_templates

    return list(VIDEO_TEMPLATES) if spec == "video" else resolve_templates(spec)


def _run_video_train(args) -> int:
    from florence.adapters.video.dataset import VideoDataset
    from florence.adapters.video.finetune import (
        VideoFinetuneConfig,
        build_video_classifier,
        finetune_video_classifier,
    )
    from florence.adapters.video.inflate import load_image_coswin
    from florence.training.distributed import init_distributed, leave_process_group

    # Building the config validates the arguments before the process group and the data are set up.
    config = VideoFinetuneConfig(
        output_dir=args.output_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        accum_steps=args.accum_steps,
        clips_per_video=args.clips_per_video,
        lr=args.lr,
        grad_clip=args.grad_clip,
        precision=args.precision,
        seed=args.seed,
        num_workers=args.workers,
        checkpoint_every=args.checkpoint_every,
    )
    distributed = init_distributed(args.device)
    image_model = load_image_coswin(args.checkpoint)
    image_size = args.image_size or image_model.img_size[0]
    options = {"num_frames": args.num_frames, "size": image_size, "mode": args.sampling, "label_column": args.label_column}
    train_dataset = VideoDataset(args.data, train=True, **options)
    eval_dataset = VideoDataset(args.data, train=False, classes=train_dataset.classes, **options)
    if len(train_dataset) == 0:
        raise ValueError(f"{args.data} has no readable videos; see the warnings above")

    model = build_video_classifier(
        image_model,
        len(train_dataset.classes),
        seed=args.seed,
        temporal_window=args.temporal_window,
        num_frames=args.num_frames,
        image_size=image_size,
    )
    metrics = finetune_video_classifier(model, train_dataset, eval_dataset, config, distributed=distributed)
    leave_process_group(distributed)
    if distributed.is_main_process:
        # Percent, as 'florence video eval' prints accuracy.
        if "eval_top1" in metrics:
            metrics = {**metrics, "eval_top1": f"{100 * metrics['eval_top1']:.1f}%"}
        _print_results(metrics)
        print(f"weights: {Path(args.output_dir) / 'model.safetensors'}; classes: {Path(args.output_dir) / 'classes.txt'}")
    return 0


def _run_video_embed(args) -> int:
    from florence.adapters.video.retrieval import embed_video_collection

    _check_video_files(args.clips)
    written, already_done, failed = embed_video_collection(
        args.checkpoint, args.clips, args.out, num_frames=args.num_frames, tower=args.tower
    )
    print(f"videos: {written} embedded now, {already_done} already in {args.out}, {len(failed)} unreadable")
    for path, error in failed:
        print(f"  unreadable: {path}: {error}")
    print(f"embeddings: {args.out}; next: florence index build {args.out} --out INDEX_DIR")
    return 0


def _run_video_eval(args) -> int:
    from florence.adapters.video.evaluate import evaluate_video_classification
    from florence.adapters.video.io import VideoDecodeError

    _check_video_eval_args(args)
    build = _zero_shot_video_eval if args.zero_shot else _classifier_video_eval
    score_views, dataset, views, settings = build(args)
    try:
        result = evaluate_video_classification(
            score_views, dataset, views, seed=args.seed, bootstrap_samples=args.bootstrap_samples
        )
    except VideoDecodeError as error:
        raise ValueError(f"{error}; check that the file is a complete video") from error
    _print_video_eval(args, dataset, views, result)
    if args.out:
        _write_video_eval_record(args, dataset, views, settings, result)
        print(f"wrote {args.out}")
    return 0


def _check_video_eval_args(args) -> None:
    if not Path(args.data).exists():
        raise FileNotFoundError(f"video data {args.data} not found; pass a CSV with path and label columns or a folder of class folders")
    if not args.zero_shot:
        for option in ("labels", "label_map", "templates", "tower"):
            if getattr(args, option) is not None:
                raise ValueError(f"--{option.replace('_', '-')} applies only with --zero-shot; a classifier uses the classes it was trained on")
        if args.checkpoint is None:
            raise ValueError("pass --checkpoint with the --output-dir of 'florence video train', or --zero-shot for an image-text model")


def _video_eval_dataset(args, classes: list[str] | None, class_source: str):
    """Read the labelled videos of DATA; with ``classes``, every label must be one of them."""
    from florence.adapters.video.dataset import VideoDataset

    try:
        return VideoDataset(args.data, classes=classes, label_column=args.label_column)
    except ValueError as error:
        if classes is None:
            raise
        raise ValueError(
            f"{error}. Here the classes come from {class_source}, so pick a --label-column whose values are among them"
        ) from None


def _zero_shot_video_eval(args):
    from florence.adapters.video.evaluate import ViewSampling
    from florence.adapters.video.zeroshot import zero_shot_scorer
    from florence.checkpoint import load_model
    from florence.tokenizer import get_tokenizer

    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    _reject_video_classifier(checkpoint)
    classes = _video_labels(args) if args.labels is not None or args.label_map is not None else None
    model = load_model(checkpoint)
    dataset = _video_eval_dataset(args, classes, "--labels" if args.labels else "--label-map")
    templates = _video_templates(args.templates or "video")
    tower = args.tower or "frames"
    views = ViewSampling(
        num_frames=args.num_frames or 8,
        image_size=args.image_size or model.visual.img_size[0],
        sampling=args.sampling or "uniform",
        frame_interval=args.frame_interval or 2,
        num_clips=args.num_clips,
        num_crops=args.num_crops,
    )
    score_views = zero_shot_scorer(model, get_tokenizer(), dataset.classes, templates, tower)
    settings = {"mode": "zero-shot", "checkpoint": str(Path(checkpoint).resolve()), "tower": tower, "templates": templates}
    return score_views, dataset, views, settings


def _reject_video_classifier(checkpoint: str) -> None:
    """Raise if ``checkpoint`` is a 'florence video train' classifier, which has no text tower for --zero-shot."""
    from florence.adapters.video.classifier import find_classifier_files

    try:
        find_classifier_files(checkpoint)
    except FileNotFoundError:
        return
    raise ValueError(
        f"{checkpoint} is a fine-tuned video classifier from 'florence video train', which --zero-shot cannot use; "
        "drop --zero-shot to score its trained classes, or pass an image-text model.safetensors"
    )


def _classifier_video_eval(args):
    import torch

    from florence.adapters.video.classifier import (
        CONFIG_NAME,
        find_classifier_files,
        load_video_classifier,
    )
    from florence.adapters.video.evaluate import ViewSampling

    model, config = load_video_classifier(args.checkpoint)
    dataset = _video_eval_dataset(args, config.classes, f"the classifier's {CONFIG_NAME}")
    views = ViewSampling(
        num_frames=args.num_frames or config.num_frames,
        image_size=args.image_size or config.image_size,
        sampling=args.sampling or config.sampling,
        frame_interval=args.frame_interval or config.frame_interval,
        num_clips=args.num_clips,
        num_crops=args.num_crops,
    )
    weights = find_classifier_files(args.checkpoint)[1]

    @torch.inference_mode()
    def score_views(clips):
        return model(clips).softmax(dim=-1)

    return score_views, dataset, views, {"mode": "classifier", "checkpoint": str(weights.resolve())}


def _print_video_eval(args, dataset, views, result) -> None:
    metrics = result.metrics
    print(
        f"{args.data}: {metrics['num_videos']} videos, {metrics['num_classes']} classes, {views.num_clips} clip(s) x "
        f"{views.num_crops} crop(s) of {views.num_frames} frames at {views.image_size} px"
    )
    print(f"{'metric':<24}{'value (%)':>10}  95% CI")
    for name in ("top1", "top5", "mean_per_class_recall"):
        print(f"{name:<24}{metrics[name]:>10.1f}  {metrics[name + '_ci_low']:.1f} to {metrics[name + '_ci_high']:.1f}")
    if len(dataset.classes) <= 5:
        print(f"(top5 covers all {len(dataset.classes)} classes, so it is 100)")
    for path, error in result.unreadable:
        print(f"  unreadable: {path}: {error}")
    if args.per_video:
        for prediction in result.predictions:
            print(f"  {prediction['path']}: label {prediction['label']!r} (rank {prediction['label_rank']}), "
                  f"top-1 {prediction['top_labels'][0]!r}")


def _write_video_eval_record(args, dataset, views, settings: dict, result) -> None:
    from dataclasses import asdict
    from datetime import UTC, datetime

    from florence.checkpoint import atomic_write_bytes
    from florence.version import __version__

    record = {
        "task": "video_classification",
        **settings,
        "data": str(Path(args.data).resolve()),
        "label_column": args.label_column,
        "classes": dataset.classes,
        "views": asdict(views),
        "seed": args.seed,
        "bootstrap_samples": args.bootstrap_samples,
        "metrics": result.metrics,
        "predictions": result.predictions,
        "unreadable": [{"path": path, "error": error} for path, error in result.unreadable],
        "florence_version": __version__,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_bytes(args.out, (json.dumps(record, indent=2) + "\n").encode())


def _run_video_search(args) -> int:
    from florence.serving.index import SearchIndex

    if args.captions_json is not None:
        if args.query is not None or args.index is not None:
            raise ValueError("--captions-json ranks the candidate captions of the videos in that file; drop QUERY and --index")
        return _rank_video_captions(args)
    if args.query is None or args.index is None:
        raise ValueError('give a text query and --index DIR, e.g. florence video search "a dog in the snow" --index DIR, '
                         "or --captions-json FILE")
    if not args.query.strip():
        raise ValueError(f"the text query {args.query!r} is empty; describe the video to find, e.g. \"a dog in the snow\"")

    _quiet_faiss_loader(args)
    index = SearchIndex.load(args.index)
    _check_video_index(index, args.index)
    k = min(DEFAULT_SEARCH_K, len(index)) if args.top is None else args.top
    if not 1 <= k <= len(index):
        raise ValueError(f"--top {k} is out of range; pass 1 <= --top <= {len(index)}, the number of indexed videos")
    _print_search_hits(index, args.checkpoint, k, args.json, text=args.query)
    return 0


def _check_video_index(index, folder: str) -> None:
    """Raise unless every source of ``index`` is a video file (as 'florence video embed' writes them)."""
    from florence.adapters.video.io import VIDEO_EXTENSIONS

    others = [source for source in index.sources if Path(source).suffix.lower() not in VIDEO_EXTENSIONS]
    if others:
        raise ValueError(
            f"{folder} is not a video index: {len(others)} of its {len(index)} sources are not videos (e.g. {others[0]}); "
            "build it from 'florence video embed' output, or use 'florence search' for image indexes"
        )


def _rank_video_captions(args) -> int:
    from florence.adapters.video.io import VideoDecodeError
    from florence.adapters.video.retrieval import (
        rank_caption_candidates,
        read_caption_candidates,
    )
    from florence.checkpoint import load_model
    from florence.tokenizer import get_tokenizer

    read_caption_candidates(args.captions_json)  # Checks the file before the model loads.
    model = load_model(args.checkpoint or DEFAULT_CHECKPOINT)
    options = {"num_frames": args.num_frames, "num_clips": args.num_clips, "tower": args.tower}
    try:
        rankings = rank_caption_candidates(model, get_tokenizer(), args.captions_json, **options)
    except VideoDecodeError as error:
        raise ValueError(f"{error}; check the 'video' path in {args.captions_json}") from error
    for ranking in rankings:
        if not args.json:
            print(ranking.video)
        for rank, caption_index in enumerate(ranking.order, start=1):
            intended = caption_index == ranking.intended_index
            score, caption = ranking.scores[caption_index], ranking.captions[caption_index]
            if args.json:
                print(json.dumps({"video": str(ranking.video), "rank": rank, "score": score, "candidate": caption_index,
                                  "caption": caption, "intended": intended}))
            else:
                print(f"{rank:3d}  {score:.4f}  [{caption_index}] {caption}{'  (intended)' if intended else ''}")
        if ranking.intended_rank is not None and not args.json:
            print(f"intended caption [{ranking.intended_index}] ranks {ranking.intended_rank} of {len(ranking.captions)}")
    return 0


def _run_detect(args) -> int:
    if args.target == "train":
        command_args, run = _detect_train_parser().parse_args(args.rest), _run_detect_train
    elif args.target == "eval":
        command_args, run = _detect_eval_parser().parse_args(args.rest), _run_detect_eval
    else:
        command_args, run = _detect_image_parser().parse_args(args.rest), _run_detect_image
        command_args.image = args.target
    if getattr(command_args, "verbose", False):
        logging.getLogger().setLevel(logging.DEBUG)
    return run(command_args)


def _run_detect_train(args) -> int:
    from florence.adapters.detection.train import DetectionTrainConfig, train_detector

    detector = {
        "backbone": args.backbone,
        "backbone_overrides": json.loads(args.backbone_overrides),
        "classifier": args.classifier,
        "channels": args.channels,
        "num_blocks": args.blocks,
    }
    config = DetectionTrainConfig(
        data=args.data, output_dir=args.output_dir, split=args.split, image_range=args.images,
        image_size=args.image_size, flip=not args.no_flip, detector=detector, init_from=args.init_from,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        checkpoint_every=args.checkpoint_every, max_seconds=args.max_seconds, resume=args.resume,
        seed=args.seed, device=args.device,
    )
    _print_results(train_detector(config))
    print(f"weights: {Path(args.output_dir) / 'model.safetensors'}")
    return 0


def _run_detect_eval(args) -> int:
    from florence.adapters.detection import load_detector
    from florence.adapters.detection.table import dataset_name, format_zero_shot_table
    from florence.adapters.detection.train import evaluate_detector

    model = load_detector(args.checkpoint, args.device)
    results, rows = {}, []
    for data in args.data:
        metrics = evaluate_detector(
            model, data, split=args.split, image_range=args.images, image_size=args.image_size,
            batch_size=args.batch_size, device=args.device,
        )
        name = dataset_name(Path(data).name)
        results[name] = metrics
        rows.append(
            {"dataset": name, "images": metrics["images"], "categories": metrics["categories"], "split": metrics["split"], "AP": metrics["AP"]}
        )
        # pycocotools reports -1 for a size class with no ground-truth box.
        print(f"{name} ({metrics['split']}): " + ", ".join(
            f"{key} {100 * metrics[key]:.1f}" if metrics[key] >= 0 else f"{key} n/a" for key in ("AP", "AP50", "AP75", "APs", "APm", "APl")
        ))
    if args.zero_shot:
        checkpoint = Path(args.checkpoint)
        label = args.label or (checkpoint.name if checkpoint.is_dir() else checkpoint.parent.name) or "this model"
        table = format_zero_shot_table(rows, label)
        print(table, end="")
        if args.table:
            from florence.checkpoint import atomic_write_bytes

            atomic_write_bytes(args.table, table.encode())
    _write_json(args.json, results)
    return 0


def _run_detect_image(args) -> int:
    from PIL import Image

    from florence.adapters.detection import load_detector
    from florence.adapters.detection.draw import detect_image, draw_detections

    class_names = [name.strip() for name in args.classes.split(",") if name.strip()]
    if not class_names:
        raise ValueError(f"--classes {args.classes!r} names no class; pass comma-separated names such as \"person,dog\"")
    if not Path(args.image).is_file():
        raise FileNotFoundError(f"image {args.image} not found; the first argument after 'detect' is train, eval or an image file")
    model = load_detector(args.checkpoint)
    with Image.open(args.image) as image:
        prediction = detect_image(model, image, class_names, args.image_size, args.min_score)
        draw_detections(image, prediction, class_names, args.out)
    for box, score, label in zip(prediction["boxes"].tolist(), prediction["scores"].tolist(), prediction["labels"].tolist()):
        print(f"{class_names[label]}\t{score:.3f}\t" + " ".join(f"{v:.1f}" for v in box))
    print(f"wrote {args.out} ({len(prediction['scores'])} boxes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Report unknown flags from the subcommand's parser so the message lists its options.
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Imported here, not at the top, so that `florence --help` does not load torch.
    from florence.data.dataset import ImageLoadError
    from florence.data.streaming import ShardReadError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImageLoadError, ShardReadError) as error:
        _logger.debug("command failed", exc_info=True)
        print(f"florence: error: {_error_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        command = f"video {args.video_command}" if args.command == "video" else args.command
        hint = _RESUME_HINTS.get(command)
        print("florence: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout left early (``florence search ... | head``). Point stdout at
        # /dev/null so that flushing it at exit does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


# The resume instruction printed after Ctrl-C, per command.
_RESUME_HINTS = {
    "train": "rerun with --resume to continue from the last checkpoint",
    "benchmark": "run the same command again to resume the suite",
    "data": "run the same command again to keep the finished shards and write the rest",
    "embed": "run the same command again to embed only what is missing",
    "video train": "run the same command again to resume from the last checkpoint",
    "video embed": "run the same command again to embed only what is missing",
}


def _error_message(error: Exception) -> str:
    """Return an error's message; for one re-raised from a DataLoader worker, its original last line."""
    message = str(error)
    if "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return message


if __name__ == "__main__":
    sys.exit(main())
