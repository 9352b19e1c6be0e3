"""The `star-serve` command line."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import Settings


def _read_records(path: Path) -> list[dict[str, Any]]:
    """JSON Lines records, or a plain-text file read as one `{"text": ...}` document."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"text": path.read_text()}]


def _split(records: list[dict[str, Any]], eval_path: Path | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The held-out set: `--eval-data`, or else a stable ~5% of the records chosen by hash."""
    if eval_path is not None:
        return records, _read_records(eval_path)
    if len(records) < 2:
        raise SystemExit("one document only: pass --eval-data, or give a .jsonl file of several records")

    def held_out(record: dict[str, Any]) -> bool:
        return hashlib.sha1(record["text"].encode()).digest()[0] < 13  # ~5% of 256

    train = [r for r in records if not held_out(r)]
    heldout = [r for r in records if held_out(r)] or train[-1:]
    return train, heldout


def cmd_train(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from .training.presets import get_preset
    from .training.trainer import train_classifier, train_lm

    preset = get_preset(args.preset)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
    train, heldout = _split(_read_records(args.data), args.eval_data)
    if args.task == "lm":
        result = train_lm(
            [r["text"] for r in train], [r["text"] for r in heldout], args.out, preset, tokenizer, args.seed
        )
    else:
        labels = sorted({str(r["label"]) for r in train})
        index = {name: i for i, name in enumerate(labels)}
        unknown = {str(r["label"]) for r in heldout} - index.keys()
        if unknown:
            raise SystemExit(f"held-out labels not seen in training: {sorted(unknown)}")

        def examples(rs: list[dict[str, Any]]) -> list[tuple[str, int]]:
            return [(r["text"], index[str(r["label"])]) for r in rs]

        result = train_classifier(examples(train), examples(heldout), labels, args.out, preset, tokenizer, args.seed)
    print(json.dumps(result.summary, indent=2))


def cmd_calibrate(args: argparse.Namespace) -> None:
    from .training.calibrate import CalibrationConfig
    from .training.trainer import calibrate_checkpoint

    train, heldout = _split(_read_records(args.data), args.eval_data)
    config = CalibrationConfig(**_given(args, "tolerance", "rounds", "finetune_steps"))
    try:
        result = calibrate_checkpoint(
            args.model, train, heldout, args.out, config, args.seq_len, args.batch_size, args.seed
        )
    except (FileNotFoundError, ValueError) as error:  # not a model directory, too little data, unknown labels
        raise SystemExit(f"star-serve calibrate: {error}") from None
    print(json.dumps(result.summary, indent=2))


def cmd_convert(args: argparse.Namespace) -> None:
    from .convert import UnmappableCheckpoint, convert_megatron

    try:
        summary = convert_megatron(args.load, args.vocab_file, args.merge_file, args.out)
    except (UnmappableCheckpoint, FileNotFoundError) as error:
        raise SystemExit(f"star-serve convert megatron: {error}") from None
    print(json.dumps(summary, indent=2))


def cmd_demo(args: argparse.Namespace, settings: Settings) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    from .model.loading import load_model, resolve_device, resolve_dtype
    from .training.demo import ensure_demo_models

    demo = ensure_demo_models(settings.cache_dir, settings.demo_preset)
    hf_logging.disable_progress_bar()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    summaries = demo.summaries()
    lm_summary, clf_summary = summaries.values()

    lm, tokenizer = load_model(demo.lm_dir, "generate", device, dtype)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    torch.manual_seed(settings.seed)
    output = lm.generate(**inputs, max_new_tokens=args.max_tokens, do_sample=False)
    continuation = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(
        f"LM held-out loss {lm_summary['heldout_loss']:.3f} nats/token (unigram baseline "
        f"{lm_summary['unigram_heldout_loss']:.3f})"
    )
    print(f"prompt:       {args.prompt!r}\ncontinuation: {continuation!r}\n")

    classifier, tokenizer = load_model(demo.classifier_dir, "classify", device, dtype)
    with torch.no_grad():
        logits = classifier(**tokenizer(args.text, return_tensors="pt").to(device)).logits[0]
    probs = logits.float().softmax(-1)
    label = classifier.config.id2label[int(probs.argmax())]
    print(
        f"classifier held-out accuracy {clf_summary['heldout_accuracy']:.3f} (majority baseline "
        f"{clf_summary['majority_baseline_accuracy']:.3f})"
    )
    print(f"text:  {args.text!r}\nlabel: {label} ({probs.max():.2f})")


def cmd_serve(settings: Settings) -> None:
    import uvicorn

    from .api.app import create_app
    from .api.server import DrainingServer, HeadTimeoutProtocol

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=5,
        http=HeadTimeoutProtocol,
        timeout_keep_alive=settings.connection_idle_timeout,
        limit_concurrency=settings.max_connections,
    )
    DrainingServer(config, app.state.star, settings.drain_timeout).run()


def cmd_bench(args: argparse.Namespace, settings: Settings) -> None:
    from .bench.serving import ServingBenchConfig, run_serving_bench

    others: dict[str, Callable[[argparse.Namespace, Settings], None]] = {
        "adaptation": cmd_bench_adaptation,
        "calibration": cmd_bench_calibration,
        "domains": cmd_bench_domains,
        "synthetic": lambda args, settings: cmd_bench_synthetic(args),
        "lm-eval": cmd_bench_harness,
        "tenants": cmd_bench_tenants,
        "prefix": cmd_bench_prefix,
        "peers": cmd_bench_peers,
    }
    if args.name in others:
        others[args.name](args, settings)
        return
    args.model = args.model or _demo_lm(settings)
    config = ServingBenchConfig(
        model_dir=args.model,
        out_dir=args.out,
        device=settings.device,
        dtype=settings.dtype,
        **_given(args, "requests", "max_tokens", "repeats", "shape"),
    )
    run_serving_bench(config)
    print((args.out / "serving.md").read_text())


def cmd_bench_adaptation(args: argparse.Namespace, settings: Settings) -> None:
    from .bench.adaptation import AdaptationBenchConfig, run_adaptation_bench

    if args.model is None or args.classifier is None:
        from .training.demo import ensure_demo_models

        demo = ensure_demo_models(settings.cache_dir, settings.demo_preset)
        args.model = args.model or demo.lm_dir
        args.classifier = args.classifier or demo.classifier_dir
    given = _given(args, "requests", "max_tokens", "repeats", "rounds", "passes", "tenants", "angles", "severities")
    if args.tokens is not None:  # the adaptation slice is twice the evaluation slice
        given |= {"eval_tokens": args.tokens, "adapt_tokens": 2 * args.tokens}
    config = AdaptationBenchConfig(lm_dir=args.model, classifier_dir=args.classifier, out_dir=args.out, **given)
    run_adaptation_bench(config)
    print((args.out / "adaptation.md").read_text())


def cmd_bench_calibration(args: argparse.Namespace, settings: Settings) -> None:
    from .bench.calibration import CalibrationBenchConfig, run_calibration_bench

    args.model = args.model or _demo_lm(settings)
    given = _given(args, "learning_rates")
    models = (args.model, *(args.compare or ()))
    align = settings.adaptation_align_linear_gate
    config = CalibrationBenchConfig(models=models, out_dir=args.out, align_linear_gate=align, **given)
    run_calibration_bench(config)
    print((args.out / "calibration.md").read_text())


def cmd_bench_domains(args: argparse.Namespace, settings: Settings) -> None:
    from .bench.domains import DomainBenchConfig, run_domain_bench

    args.model = args.model or _demo_lm(settings)
    config = DomainBenchConfig(model=args.model, out_dir=args.out, **_given(args, "seeds", "traffic_tokens"))
    run_domain_bench(config)
    print((args.out / "domains.md").read_text())


def cmd_bench_synthetic(args: argparse.Namespace) -> None:
    from .bench.synthetic import SyntheticBenchConfig, run_synthetic_bench

    run_synthetic_bench(SyntheticBenchConfig(out_dir=args.out, **_given(args, "seeds", "shifts", "weight_decay")))
    print((args.out / "synthetic.md").read_text())


def cmd_bench_harness(args: argparse.Namespace, settings: Settings) -> None:
    from .bench.harness import HarnessBenchConfig, run_harness_bench

    args.model = args.model or _demo_lm(settings)
    run_harness_bench(HarnessBenchConfig(model=args.model, out_dir=args.out, **_given(args, "docs")))
    print((args.out / "lm-eval.md").read_text())


def cmd_bench_prefix(args: argparse.Namespace, settings: Settings) -> None:
    from .bench.prefix import PrefixBenchConfig, run_prefix_bench

    args.model = args.model or _demo_lm(settings)
    given = _given(args, "requests", "max_tokens", "repeats")
    run_prefix_bench(PrefixBenchConfig(model=args.model, out_dir=args.out, **given))
    print((args.out / "prefix.md").read_text())


def cmd_bench_peers(args: argparse.Namespace, settings: Settings) -> None:
    from .bench.peers import PeersBenchConfig, run_peers_bench

    args.model = args.model or _demo_lm(settings)
    given = _given(args, "shape", "requests", "max_tokens", "repeats", "vllm_env", "clients", "dtype")
    run_peers_bench(PeersBenchConfig(model=args.model, out_dir=args.out, **given))
    print((args.out / "peers.md").read_text())


def cmd_bench_tenants(args: argparse.Namespace, settings: Settings) -> None:
    from .bench.tenants import TenantsBenchConfig, run_tenants_bench

    args.model = args.model or _demo_lm(settings)
    given = _given(args, "engine_tenants", "http_tenants")
    run_tenants_bench(TenantsBenchConfig(model=args.model, out_dir=args.out, **given))
    print((args.out / "tenants.md").read_text())


def _demo_lm(settings: Settings) -> Path:
    """The demo LM's directory, built first if it is not in the cache: what benchmarks run without --model."""
    from .training.demo import ensure_demo_models

    return ensure_demo_models(settings.cache_dir, settings.demo_preset).lm_dir


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The named options that were given on the command line (lists as tuples); the rest keep their defaults."""
    values = {name: getattr(args, name) for name in names}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="JSON file of settings (overridden by STAR_* and flags)")
    parser = argparse.ArgumentParser(prog="star-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a STAR MoE model on a small corpus")
    train.add_argument("task", choices=("lm", "classifier"))
    train.add_argument("--data", type=Path, required=True, help=".jsonl of {text[, label]} or a .txt file")
    train.add_argument("--eval-data", type=Path, help="held-out data (default: a stable 5%% of --data)")
    train.add_argument("--out", type=Path, required=True, help="output directory (resumes if interrupted)")
    train.add_argument("--preset", default="tiny", help="tiny, demo, star-182m, star-469m")
    train.add_argument("--tokenizer", type=Path, help="reuse this tokenizer directory instead of training one")
    train.add_argument("--seed", type=int, default=0)

    calibrate = sub.add_parser(
        "calibrate", help="move a checkpoint's GHA bases to their fixed point on its data, then fine-tune to them"
    )
    calibrate.add_argument("--model", type=Path, required=True, help="star_moe checkpoint directory (LM or classifier)")
    calibrate.add_argument("--data", type=Path, required=True, help=".jsonl of {text[, label]} or a .txt file")
    calibrate.add_argument("--eval-data", type=Path, help="held-out data (default: a stable 5%% of --data)")
    calibrate.add_argument("--out", type=Path, required=True, help="output directory")
    calibrate.add_argument("--tolerance", type=float, help="projection distance between passes to stop at (0.01)")
    calibrate.add_argument("--rounds", type=int, help="solve + fine-tune rounds (default: 2; 0: bases only)")
    calibrate.add_argument("--finetune-steps", type=int, help="fine-tuning steps per round (default: 150)")
    calibrate.add_argument("--seq-len", type=int, default=128)
    calibrate.add_argument("--batch-size", type=int, default=16)
    calibrate.add_argument("--seed", type=int, default=0)

    convert = sub.add_parser("convert", help="convert another framework's checkpoint to a star-serve model")
    source = convert.add_subparsers(dest="source", required=True)
    megatron = source.add_parser(
        "megatron", help="a Megatron-LM STAR checkpoint (torch_dist or legacy), with its GPT-2 BPE tokenizer files"
    )
    megatron.add_argument("--load", type=Path, required=True, help="the run's checkpoint directory, or one iter_*")
    megatron.add_argument("--vocab-file", type=Path, required=True, help="gpt2-vocab.json")
    megatron.add_argument("--merge-file", type=Path, required=True, help="gpt2-merges.txt")
    megatron.add_argument("--out", type=Path, required=True, help="the star-serve model directory to write")

    serve = sub.add_parser(
        "serve", parents=[common], help="serve models over HTTP (the demo models when no --model is given)"
    )
    serve.add_argument("--model", action="append", dest="models", metavar="[NAME=]DIR", help="repeatable")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--device")
    serve.add_argument("--dtype")

    bench = sub.add_parser(
        "bench", parents=[common], help="run a benchmark; writes JSON, a Markdown table and a PNG plot"
    )
    bench.add_argument(
        "name",
        choices=(
            "serving",
            "adaptation",
            "calibration",
            "domains",
            "synthetic",
            "lm-eval",
            "tenants",
            "prefix",
            "peers",
        ),
    )
    bench.add_argument("--model", type=Path, help="causal-LM checkpoint (default: the demo LM)")
    bench.add_argument(
        "--compare", type=Path, action="append", help="calibration: another checkpoint, measured side by side"
    )
    bench.add_argument(
        "--learning-rates", type=float, nargs="+", help="calibration: the tenant learning rates to measure"
    )
    bench.add_argument("--out", type=Path, default=Path("bench-results"))
    bench.add_argument("--requests", type=int, help="requests per run (default: serving 32, adaptation, prefix 128)")
    bench.add_argument("--max-tokens", type=int, help="tokens per request (default: 64; prefix 16)")
    bench.add_argument("--repeats", type=int, help="runs per configuration (default: serving 3, adaptation 9)")
    bench.add_argument("--device", help="where the models run (default: CUDA when present)")
    bench.add_argument(
        "--shape", help="serving, peers: a preset's shape (such as star-182m), random weights, the model's tokenizer"
    )
    bench.add_argument(
        "--vllm-env",
        type=Path,
        help="peers: vLLM's virtual environment (default: .peers/vllm, bench/peers/install-vllm)",
    )
    bench.add_argument(
        "--clients", type=int, nargs="+", help="peers: concurrent clients of each load (default: 1 8 32)"
    )
    bench.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on CUDA)")
    adaptation = bench.add_argument_group(
        "adaptation", "options of `bench adaptation` (defaults: a few minutes on CPU)"
    )
    adaptation.add_argument("--classifier", type=Path, help="classifier checkpoint (default: the demo classifier)")
    adaptation.add_argument("--angles", type=float, nargs="+", metavar="DEG", help="rotation angles (default: 0-180)")
    adaptation.add_argument("--tokens", type=int, help="rotation evaluation tokens; twice as many adapt (2048)")
    adaptation.add_argument("--rounds", type=int, help="GHA steps per rotated tenant (default: 100)")
    adaptation.add_argument("--severities", type=int, nargs="+", choices=range(1, 6), help="(default: 1 3 5)")
    adaptation.add_argument("--passes", type=int, help="passes over each corrupted tenant's traffic (default: 2)")
    adaptation.add_argument("--tenants", type=int, help="tenants of the throughput load (default: 32)")

    domains = bench.add_argument_group("domains", "options of `bench domains` (defaults: about 5 minutes on CPU)")
    domains.add_argument("--seeds", type=int, nargs="+", help="domains, synthetic: seeds (default: 0 1 2)")
    domains.add_argument("--traffic-tokens", type=int, help="each tenant's traffic (default: 20480)")
    synthetic = bench.add_argument_group("synthetic", "options of `bench synthetic` (defaults: a few minutes on CPU)")
    synthetic.add_argument("--shifts", type=float, nargs="+", metavar="T", help="(default: 0.25 0.5 0.75 0.9)")
    many = bench.add_argument_group("tenants", "options of `bench tenants` (defaults: about an hour on 2 CPU cores)")
    many.add_argument("--engine-tenants", type=int, help="tenants sent through the engine (default: 1000000)")
    many.add_argument("--http-tenants", type=int, help="tenants sent through HTTP (default: 100000)")
    harness = bench.add_argument_group("lm-eval", "options of `bench lm-eval` (needs lm_eval[hf])")
    harness.add_argument("--docs", type=int, help="documents of the continuation task (default: 200)")
    synthetic.add_argument("--weight-decay", type=float, help="AdamW's, training the classifiers (default: 2)")

    demo = sub.add_parser(
        "demo", parents=[common], help="build the demo models if needed, then generate and classify once"
    )
    demo.add_argument("--prompt", default="Return a list of the words in the string")
    demo.add_argument("--text", default="Send the request to the server and wait for the HTTP response.")
    demo.add_argument("--max-tokens", type=int, default=40)
    demo.add_argument("--device")
    demo.add_argument("--dtype")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command in ("train", "calibrate", "convert"):
        {"train": cmd_train, "calibrate": cmd_calibrate, "convert": cmd_convert}[args.command](args)
        return
    overrides = {k: getattr(args, k, None) for k in ("device", "dtype", "host", "port", "models")}
    settings = Settings.load(args.config, **overrides)
    if args.command == "demo":
        cmd_demo(args, settings)
    elif args.command == "serve":
        cmd_serve(settings)
    elif args.command == "bench":
        cmd_bench(args, settings)


if __name__ == "__main__":
    main(sys.argv[1:])
