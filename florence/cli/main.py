"""The ``florence`` command: train, eval, classify, models."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib import resources
from pathlib import Path

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
    parser.add_argument("--device", default="cpu", help="torch device for the model, e.g. cpu or cuda (default: cpu)")
    parser.set_defaults(func=_run_benchmark, parser=parser)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="florence", description="Florence vision foundation model toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_classify(subparsers)
    _add_models(subparsers)
    _add_benchmark(subparsers)
    return parser


def _run_train(args) -> int:
    from florence.config import load_config
    from florence.evaluation.tasks import build_evaluator
    from florence.training.trainer import Trainer

    config_path = args.config
    if config_path is None:
        config_path = builtin_config("quickstart")
        _logger.info("no --config given; using the built-in quickstart config %s", config_path)
    overrides = list(args.overrides) + (["resume=true"] if args.resume else [])
    config = load_config(config_path, overrides)

    trainer = Trainer(config)
    results = trainer.fit(evaluate=build_evaluator(config, trainer.tokenizer))
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


def _run_models(args) -> int:
    from florence.models import count_parameters, create_model, list_models

    print(f"{'model':<16}{'image':>10}{'text':>10}{'total':>10}  (parameters, millions)")
    for name in list_models():
        model = create_model(name, device="meta")
        image = count_parameters(model.visual) + model.image_projection.weight.numel()
        text = count_parameters(model.text) + model.text_projection.weight.numel()
        print(f"{name:<16}{image / 1e6:>10.1f}{text / 1e6:>10.1f}{count_parameters(model) / 1e6:>10.1f}")
    return 0


def _run_benchmark(args) -> int:
    from florence.evaluation.models import load_eval_model
    from florence.evaluation.report import write_reports
    from florence.evaluation.runner import run_suite
    from florence.evaluation.suite import load_suite

    suite = load_suite(args.suite)
    model = load_eval_model(args.model, seed=suite.seed).to(args.device)
    output = Path(args.output) if args.output else Path("runs") / "benchmark" / suite.name
    run_suite(suite, model, output, rerun=args.rerun)
    for path in write_reports(output):
        print(f"wrote {path}")
    print((output / "results.md").read_text(encoding="utf-8"), end="")
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
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        _logger.debug("command failed", exc_info=True)
        print(f"florence: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "benchmark":
            print("florence: interrupted; run the same command again to resume the suite", file=sys.stderr)
            return 130
        print("florence: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
