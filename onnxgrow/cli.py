"""The `onnxgrow` command line: it parses options, calls the API (onnxgrow/api.py) and prints.

Errors end here, in one line on stderr. An OnnxgrowError is a problem with the input or a check that
failed: its message and its exit code (onnxgrow/errors.py: 2 bad input, 1 not preserved, 3 onnxgrow's
own output failed a check). Any other exception is a bug in onnxgrow: "internal error", a request to
report it, and exit code 3. `--verbose` (or ONNXGROW_DEBUG=1) logs at debug level and adds the
traceback after the line.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import api, genai, modelio, progress
from .runtime import parse_provider
from .errors import INTERNAL, NOT_PRESERVED, InternalError, OnnxgrowError, RuntimeRefused, first_line

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Grow and shrink pretrained transformers at the ONNX graph level.")
out = Console()
err = Console(stderr=True)

PROVIDER_HELP = "ONNX Runtime provider: auto | cpu | cuda | cuda:N"
BLOCKWISE_HELP = ("compare block by block, in the memory of one block (the default when the two models hold over "
                  "2 GB of weights, or a third of free memory); --whole-model runs each model whole")
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default" / "tiny-gpt2.onnx"
verbose_mode = False  # set by --verbose, or ONNXGROW_DEBUG=1


@app.callback()
def main_options(verbose: bool = typer.Option(False, "--verbose", "-v",
                                              help="log details and show tracebacks of internal errors"),
                 quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display")):
    """Grow and shrink pretrained transformers at the ONNX graph level."""
    global verbose_mode
    progress.QUIET = quiet
    verbose_mode = verbose or os.environ.get("ONNXGROW_DEBUG", "") not in ("", "0")
    configure_logging(verbose_mode)


class StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record is logged (test runners swap it per command)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(verbose: bool) -> None:
    """onnxgrow's loggers to stderr: debug when verbose, warnings otherwise."""
    logger = logging.getLogger("onnxgrow")
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def one_line_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OnnxgrowError as e:
            err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            if verbose_mode and e.__cause__ is not None:
                print_traceback(e)
            raise typer.Exit(e.exit_code)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except BrokenPipeError:  # stdout's reader went away (`onnxgrow inspect m.onnx | head -3`)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exiting flushes nowhere
            raise typer.Exit(1)
        except Exception as e:  # not raised on purpose: a bug in onnxgrow, reported as one
            err.print(f"[red]error:[/red] internal error ({type(e).__name__}): {first_line(e)} — this is a bug "
                      "in onnxgrow; please report it (run with --verbose for the traceback)",
                      highlight=False, soft_wrap=True)
            if verbose_mode:
                print_traceback(e)
            raise typer.Exit(INTERNAL)
    return wrapper


def print_traceback(e: BaseException) -> None:
    sys.stderr.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))


def config_table(title: str, *configs: dict, headers=("value",)) -> Table:
    table = Table(title=title)
    table.add_column("property")
    for h in headers:
        table.add_column(h, justify="right")
    for key in configs[0]:
        table.add_row(key, *(str(c.get(key)) for c in configs))
    return table


JSON_HELP = "print one JSON object on stdout: paths and sizes written, configurations, verification"
DEQUANTIZE_HELP = "turn quantized weights (MatMulNBits, MatMulInteger, QDQ, GatherBlockQuantized) into float first"


@app.command()
@one_line_errors
def inspect(model: Path = typer.Argument(..., help="ONNX model"),
            as_json: bool = typer.Option(False, "--json", help="print JSON"),
            dequantize: bool = typer.Option(False, help=DEQUANTIZE_HELP)):
    """Show the transformer configuration found in MODEL's graph."""
    config = api.inspect(load_source(model, dequantize, verify=False)[0] if dequantize else model)
    if as_json:
        print(json.dumps(config, indent=2))
    else:
        out.print(config_table(str(model), config))


@app.command()
@one_line_errors
def validate(source: Path, target: Path,
             provider: str = typer.Option("auto", help=PROVIDER_HELP),
             inputs: Optional[Path] = typer.Option(None, help=".npz of named input arrays"),
             text: Optional[str] = typer.Option(None, help="text to feed (with --tokenizer)"),
             tokenizer: Optional[Path] = typer.Option(None, help="tokenizer.json"),
             tolerance: Optional[float] = typer.Option(None, help="max abs diff allowed"),
             blockwise: Optional[bool] = typer.Option(None, "--blockwise/--whole-model", help=BLOCKWISE_HELP),
             as_json: bool = typer.Option(False, "--json")):
    """Run SOURCE and TARGET in ONNX Runtime on the same inputs and compare every output."""
    from .verify import validate as run_validation
    report = run_validation(source, target, provider=provider, inputs=inputs, tolerance=tolerance,
                            text=text, tokenizer=tokenizer, blockwise=blockwise)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        report.print(out)
    raise typer.Exit(report.exit_code)


def load_source(model: Path, dequantize: bool, verify: bool = True, provider: str = "auto"):
    """(the model, the absolute tolerance its checks need): None, or, for a quantized model turned into
    float, twice what dequantizing alone changes in its outputs plus 1e-4 (measured here, said on stderr)."""
    source = modelio.load(model)
    if not dequantize:
        return source, None
    from .quantized import dequantize as to_float
    done = to_float(source)
    if not done:
        return source, None
    what = ", ".join(f"{op} x{n}" for op, n in done.items())
    if not verify:
        err.print(f"dequantized {what}: the output is a float model")
        return source, None
    import tempfile

    from .verify import validate as run_validation
    with tempfile.TemporaryDirectory(prefix="onnxgrow-dequantized-") as tmp:
        path = modelio.save(modelio.as_ir(source), Path(tmp) / "float.onnx")
        report = run_validation(model, path, provider=provider, tolerance=float("inf"))
    change = max(o.max_abs_diff for o in report.outputs)
    tolerance = 2 * change + 1e-4
    err.print(f"dequantized {what}: the output is a float model; its float weights change the quantized "
              f"source's outputs by up to {change:.2g}, so outputs are checked at max abs diff <= {tolerance:.2g}")
    return source, tolerance


def write_checked(model, source: Path, output: Path, force: bool, exact: bool, verify: bool,
                  provider: str = "auto", tolerance: float | None = None, blockwise: bool | None = None):
    """Save atomically; for exact methods refuse (exit 1, nothing written) unless outputs match."""
    from .verify import validate as run_validation
    reports = []

    def check(tmp_path: Path):
        if not verify:
            return
        try:
            with progress.task("verifying in ONNX Runtime"):
                report = run_validation(source, tmp_path, provider=provider, tolerance=tolerance,
                                        blockwise=blockwise)
        except RuntimeRefused as e:
            if e.path is not None and Path(e.path) == Path(tmp_path):  # the source ran: ours did not
                raise InternalError(f"ONNX Runtime cannot run the model written ({e}); nothing written") from e
            raise
        reports.append(report)
        if exact and not report.passed:
            report.print(err)
            raise OnnxgrowError("outputs are not preserved; nothing written", NOT_PRESERVED)

    modelio.save(model, output, input_paths=(source,), force=force, verify=check)
    return reports[0] if reports else None


WIDEN_NOISE_HELP = ("symmetry-breaking noise on copied weights, fraction of each weight's std; it cancels, "
                    "so exact methods stay exact (default: "
                    f"{api.WIDTH_PASSES['hypercloning'].default_noise:g} for hypercloning, else 0)")


@app.command()
@one_line_errors
def widen(model: Path = typer.Argument(..., help="source ONNX model"),
          factor: Optional[float] = typer.Option(None, "--factor", "-k", help="width multiplier"),
          hidden: Optional[int] = typer.Option(None, help="target hidden size"),
          heads: Optional[int] = typer.Option(None, help="target attention heads (head_dim is kept)"),
          kv_heads: Optional[int] = typer.Option(None, "--kv-heads", help="target key/value heads"),
          ffn: Optional[int] = typer.Option(None, help="target FFN size"),
          method: str = typer.Option("hypercloning", help="hypercloning | fpi | aki | pad"),
          noise: Optional[float] = typer.Option(None, help=WIDEN_NOISE_HELP),
          seed: int = typer.Option(0),
          output: Optional[Path] = typer.Option(None, "--output", "-o"),
          force: bool = typer.Option(False, help="replace an existing output"),
          verify: bool = typer.Option(True, help="run both models in ONNX Runtime and compare"),
          blockwise: Optional[bool] = typer.Option(None, "--blockwise/--whole-model", help=BLOCKWISE_HELP),
          provider: str = typer.Option("auto", help=PROVIDER_HELP),
          dequantize: bool = typer.Option(False, help=DEQUANTIZE_HELP),
          as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Make MODEL wider, starting from what it knows."""
    if noise is None:
        noise = api.WIDTH_PASSES[method].default_noise if method in api.WIDTH_PASSES else 0.0
    parse_provider(provider)  # a misspelt provider is refused before the rewrite, not after it
    source, tolerance = load_source(model, dequantize, verify, provider)
    with progress.task("analysing the graph"):
        spec = api.load_structure(source)
    before = spec.config()  # the rewrite happens in place: one copy of the weights in memory
    wide = api.widen_ir(source, factor, hidden=hidden, heads=heads, kv_heads=kv_heads, ffn=ffn,
                        method=method, noise=noise, seed=seed, spec=spec)
    label = f"widen{api.factor_label(factor)}x" if factor else f"widen-h{hidden}"
    output = output or api.default_output(model, label)
    exact = api.WIDTH_PASSES[method].exact
    report = write_checked(wide, model, output, force, exact, verify, provider, tolerance, blockwise)
    after = api.load_structure(wide).config()
    genai.write_genai_folder(model, output, after)
    if as_json:
        return print_result("widen", model, output, method, before, after, report)
    out.print(config_table(f"{model} -> {output} ({method})", before, after, headers=("source", "target")))
    finish(report, output)


@app.command()
@one_line_errors
def deepen(model: Path = typer.Argument(..., help="source ONNX model"),
           layers: Optional[int] = typer.Option(None, help="target number of blocks"),
           factor: Optional[int] = typer.Option(None, "--factor", "-k", help="depth multiplier"),
           method: str = typer.Option("identity", help="identity | stack | interleave"),
           at: Optional[str] = typer.Option(None, help="insert after these blocks (0-based, comma-separated)"),
           noise: float = typer.Option(0.0, help="noise on the copied blocks, fraction of each weight's std"),
           seed: int = typer.Option(0),
           output: Optional[Path] = typer.Option(None, "--output", "-o"),
           force: bool = typer.Option(False, help="replace an existing output"),
           verify: bool = typer.Option(True, help="run both models in ONNX Runtime and compare"),
           blockwise: Optional[bool] = typer.Option(None, "--blockwise/--whole-model", help=BLOCKWISE_HELP),
           provider: str = typer.Option("auto", help=PROVIDER_HELP),
           dequantize: bool = typer.Option(False, help=DEQUANTIZE_HELP),
           as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Make MODEL deeper: identity blocks (exact), or stacked / interleaved copies of its blocks."""
    parse_provider(provider)
    source, tolerance = load_source(model, dequantize, verify, provider)
    with progress.task("analysing the graph"):
        spec = api.load_structure(source)
    before = spec.config()
    positions = parse_list(at, "--at")
    deep = api.deepen_ir(source, layers, factor=factor, method=method, at=positions, noise=noise, seed=seed,
                         spec=spec)
    after = api.load_structure(deep).config()
    output = output or api.default_output(model, f"deepen-l{after['num_layers']}")
    exact = api.DEPTH_PASSES[method].exact and noise == 0
    report = write_checked(deep, model, output, force, exact, verify, provider, tolerance, blockwise)
    genai.write_genai_folder(model, output, after)
    if as_json:
        return print_result("deepen", model, output, method, before, after, report)
    out.print(config_table(f"{model} -> {output} ({method})", before, after, headers=("source", "target")))
    finish(report, output)


@app.command(name="dequantize")
@one_line_errors
def dequantize_command(model: Path = typer.Argument(..., help="quantized ONNX model"),
                       output: Optional[Path] = typer.Option(None, "--output", "-o"),
                       force: bool = typer.Option(False, help="replace an existing output"),
                       verify: bool = typer.Option(True, help="compare with the quantized model in ONNX Runtime"),
                       provider: str = typer.Option("auto", help=PROVIDER_HELP)):
    """Turn MODEL's quantized weights into float (then grow, subclone or train the float model)."""
    parse_provider(provider)
    source, tolerance = load_source(model, True, verify, provider)
    output = output or api.default_output(model, "float")
    report = write_checked(source, model, output, force, True, verify, provider, tolerance)
    finish(report, output)


def written(output: Path) -> dict:
    """The files a model was written to, and their size in bytes."""
    files = [output] + [p for p in (output.parent / (output.name + ".data"),) if p.exists()]
    return {"path": str(output), "files": [str(p) for p in files], "bytes": sum(p.stat().st_size for p in files)}


def print_result(command: str, source: Path, output: Path, method: str, before: dict, after: dict, report,
                 **extra) -> None:
    """The --json result: one object on stdout (progress and logs go to stderr)."""
    result = {"command": command, "source": str(source), "output": written(output), "method": method,
              "config_before": before, "config_after": after,
              "verification": report.to_dict() if report is not None else None, **extra}
    print(json.dumps(result, indent=2))


def finish(report, output: Path):
    if report is not None:
        report.print(out)
        verdict = "preserved" if report.passed else "changed (expected for this method)"
        out.print(f"outputs {verdict}; wrote {output}")
    else:
        out.print(f"wrote {output} (not verified)")


def parse_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError as e:
        raise OnnxgrowError(f"{option} takes comma-separated integers, got {text!r}") from e


@app.command()
@one_line_errors
def subclone(model: Path = typer.Argument(..., help="source ONNX model (the larger one)"),
             hidden: Optional[int] = typer.Option(None, help="target hidden size"),
             heads: Optional[int] = typer.Option(None, help="target heads (head_dim is kept)"),
             kv_heads: Optional[int] = typer.Option(None, "--kv-heads", help="target key/value heads"),
             ffn: Optional[int] = typer.Option(None, help="target FFN size"),
             layers: Optional[int] = typer.Option(None, help="target number of blocks"),
             keep_layers: Optional[str] = typer.Option(None, help="blocks to keep, e.g. 0,2,5 (default: by calibration)"),
             calib: Optional[Path] = typer.Option(None, help="calibration data: text, raw bytes or .npy of token ids"),
             tokenizer: Optional[Path] = typer.Option(None, help="tokenizer.json for a text --calib"),
             use_bytes: bool = typer.Option(False, "--bytes", help="read --calib as bytes (id = byte)"),
             samples: int = typer.Option(64, help="calibration windows"),
             seq: Optional[int] = typer.Option(None, help="tokens per window (default 64, or the model's static "
                                                          "sequence length)"),
             allow_random_calib: bool = typer.Option(False, help="calibrate on random ids when no data is given"),
             rescale: str = typer.Option("norm", help="norm (match norm statistics) | sqrt (paper's sqrt(D/d)) | none"),
             provider: str = typer.Option("auto", help=PROVIDER_HELP),
             report: bool = typer.Option(True, help="print the fidelity report (runs source, subclone and a "
                                                    "random model on held-out windows)"),
             output: Optional[Path] = typer.Option(None, "--output", "-o"),
             force: bool = typer.Option(False, help="replace an existing output"),
             dequantize: bool = typer.Option(False, help=DEQUANTIZE_HELP),
             as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Make a smaller model whose weights are chosen from MODEL's (Weight subcloning)."""
    from .subcloning import subclone_model
    source = load_source(model, dequantize, verify=False)[0]
    with progress.task("analysing the graph"):
        spec = api.load_structure(source)
    source_config = spec.config()  # now: the rewrite happens in place
    result = subclone_model(source, calib, tokenizer=tokenizer, use_bytes=use_bytes, samples=samples, seq=seq,
                            allow_random_calib=allow_random_calib, hidden=hidden, heads=heads, kv_heads=kv_heads,
                            ffn=ffn, layers=layers, keep_layers=parse_list(keep_layers, "--keep-layers"),
                            rescale=rescale, provider=provider, spec=spec)
    output = output or api.default_output(model, result.label)
    modelio.save(result.model, output, input_paths=(model,), force=force)
    genai.write_genai_folder(model, output)
    try:
        after = api.inspect(output)
        fidelity_report = subclone_fidelity(model, output, result, provider) if report else None
    except BaseException:
        output.unlink(missing_ok=True)  # a model we could not describe is not handed out
        raise
    if as_json:
        return print_result("subclone", model, output, "subclone", source_config, after, None,
                            removed_blocks=result.removed_blocks, block_updates=list(result.block_updates),
                            fidelity=fidelity_report)
    out.print(config_table(f"{model} -> {output} (subclone)", source_config, after,
                           headers=("source", "target")))
    if result.removed_blocks:
        out.print(f"removed blocks {result.removed_blocks} (relative updates of the stream: "
                  + ", ".join(f"{u:.3f}" for u in result.block_updates) + ")")
    if fidelity_report is not None:
        print_fidelity(fidelity_report)
    if source_config.get("static_sequence"):
        out.print(f"calibrated on windows of {result.held_out.shape[1]} tokens: the model's static sequence length")
    elif seq is None and result.held_out.shape[1] == source_config.get("max_positions"):
        out.print(f"calibrated on windows of {result.held_out.shape[1]} tokens: the model's learned positions")
    out.print(f"wrote {output}")


def subclone_fidelity(model, output, result, provider) -> dict:
    """Next-token loss / embedding similarity of the subclone and of a random model of its size."""
    import tempfile

    from .subcloning import fidelity, randomized
    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "random.onnx"
        modelio.save(randomized(modelio.load(output)), baseline)
        return fidelity(model, output, baseline, result.held_out, result.kept_hidden, provider)


def print_fidelity(report: dict) -> None:
    table = Table(title="fidelity on held-out calibration windows")
    table.add_column("output")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, row in report.items():
        for key, value in row.items():
            table.add_row(name, key, f"{value:.4f}")
    out.print(table)


@app.command()
@one_line_errors
def train(model: Path = typer.Argument(..., help="ONNX model to continue training"),
          data: Path = typer.Option(..., help="training text (with --tokenizer or --bytes) or .npy of token ids"),
          tokenizer: Optional[Path] = typer.Option(None, help="tokenizer.json"),
          use_bytes: bool = typer.Option(False, "--bytes", help="token id = byte value"),
          steps: int = typer.Option(..., help="optimizer steps"),
          batch: Optional[int] = typer.Option(None, help="windows per step, over all ranks under torchrun "
                                                         "(default 8, or the model's static batch)"),
          micro_batch: Optional[int] = typer.Option(None, help="windows per forward on one rank; gradients "
                                                               "accumulate over a rank's share of --batch"),
          fsdp: bool = typer.Option(False, "--fsdp", help="under torchrun, shard weights, gradients and "
                                                          "optimizer state over the ranks (FSDP2)"),
          seq: Optional[int] = typer.Option(None, help="tokens per window (default 128, or the model's static "
                                                       "sequence length, or its learned positions if fewer)"),
          lr: float = typer.Option(3e-4),
          device: str = typer.Option("auto", help="auto | cuda | cpu"),
          distill_from: Optional[Path] = typer.Option(None, help="source ONNX model whose predictions to match"),
          alpha: float = typer.Option(0.5, help="weight of the distillation term"),
          objective: str = typer.Option("auto", help="auto | clm | mlm"),
          recipe: str = typer.Option("auto", help="how to continue a grown model: auto (chosen from the "
                                     "model's onnxgrow.history) | none (the plain schedule) | grown (matrices "
                                     "whose inputs were copied n times at lr/n, warmup from the source's final "
                                     "rate lr/10) | mup (the lr/n part only) | warm (the warmup part only)"),
          schedule: str = typer.Option("cosine", help="after the warmup: cosine (to lr/10) | constant"),
          resume: bool = typer.Option(False, help="continue from OUT.ckpt"),
          output: Optional[Path] = typer.Option(None, "--output", "-o"),
          force: bool = typer.Option(False, help="replace an existing output"),
          as_json: bool = typer.Option(False, "--json", help="print the run's summary as one JSON object")):
    """Continue training MODEL in torch and write the trained weights back to ONNX.

    Under torchrun it trains data-parallel: `torchrun --nproc-per-node N -m onnxgrow train ...`."""
    from . import training
    summary = training.train(model, data, tokenizer=tokenizer, use_bytes=use_bytes, steps=steps, batch=batch,
                             seq=seq, lr=lr, device=device, distill_from=distill_from, alpha=alpha,
                             output=output, resume=resume, objective=objective, force=force,
                             console=err if as_json else out, micro_batch=micro_batch, fsdp=fsdp,
                             recipe=recipe, schedule=schedule)
    if summary["rank"] != 0:
        return  # under torchrun, rank 0 reports
    if as_json:
        output = Path(summary["output"])
        print(json.dumps(dict(summary, command="train", source=str(model), output=written(output)), default=str,
                         indent=2))
        return
    out.print(f"held-out loss {summary['val_loss_start']:.4f} -> {summary['val_loss_end']:.4f} "
              f"({summary['tokens_per_s']:.0f} tokens/s); wrote {summary['output']}, loss curve {summary['plot']}")


@app.command("export-weights")
@one_line_errors
def export_weights(model: Path, output: Path = typer.Option(..., "--output", "-o", help="weights.safetensors"),
                   force: bool = typer.Option(False, help="replace an existing output"),
                   as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Write MODEL's weights to safetensors, named by structural role (layers.3.attn.q, ...)."""
    from .weights import export_weights as run_export
    path = run_export(model, output, force=force)
    if as_json:
        return print(json.dumps({"command": "export-weights", "source": str(model), "output": written(path)},
                                indent=2))
    out.print(f"wrote {path}")


@app.command("import-weights")
@one_line_errors
def import_weights(model: Path, weights: Path,
                   output: Path = typer.Option(..., "--output", "-o"),
                   strict: bool = typer.Option(True, help="every tensor in WEIGHTS must fit MODEL"),
                   force: bool = typer.Option(False, help="replace an existing output"),
                   as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Put role-named safetensors weights (from export-weights or a torch run) back into MODEL."""
    from .weights import load_weights
    import onnx_ir as ir
    updated = load_weights(model, weights, strict=strict)
    modelio.save(ir.from_proto(updated), output, input_paths=(model,), force=force)
    if as_json:
        return print(json.dumps({"command": "import-weights", "source": str(model), "weights": str(weights),
                                 "output": written(output), "config": api.inspect(output)}, indent=2))
    out.print(f"wrote {output}")


@app.command("export-hf")
@one_line_errors
def export_hf(model: Path, output: Path = typer.Option(..., "--output", "-o", help="the folder to write"),
              tokenizer: Optional[Path] = typer.Option(None, help="tokenizer file or folder to copy in "
                                                       "(default: tokenizer files beside MODEL)"),
              force: bool = typer.Option(False, help="replace an existing folder")):
    """Write MODEL as a Hugging Face transformers folder (config.json, model.safetensors) that
    from_pretrained loads with no custom code."""
    folder = api.export_hf(model, output, tokenizer=tokenizer, force=force)
    config = json.loads((folder / "config.json").read_text())
    out.print(f"wrote {folder} ({config['architectures'][0]})")


@app.command("import-hf")
@one_line_errors
def import_hf(folder: Path, model: Path, output: Path = typer.Option(..., "--output", "-o"),
              force: bool = typer.Option(False, help="replace an existing output")):
    """Put the weights of a Hugging Face folder (from export-hf, trained anywhere) back into MODEL,
    the ONNX graph it was exported from."""
    from . import hf
    hf.import_hf(folder, model, output, force=force)
    out.print(f"wrote {output}")


@app.command()
@one_line_errors
def demo(output_dir: Path = typer.Option(Path("out"), help="where to write the grown model")):
    """The main job on the embedded tiny GPT-2: inspect, widen x2 by HyperCloning, validate."""
    out.print(f"[bold]source[/bold] {DEFAULT_MODEL}")
    inspect(DEFAULT_MODEL, as_json=False, dequantize=False)
    target = output_dir / "tiny-gpt2.widen2x.onnx"
    # every option given: called as a function, typer's defaults would be its Option objects
    widen(DEFAULT_MODEL, factor=2, hidden=None, heads=None, kv_heads=None, ffn=None,
          method="hypercloning", noise=0.01, seed=0, output=target, force=True, verify=True, blockwise=None,
          provider="auto", dequantize=False, as_json=False)


def main():
    # a terminated run (a job scheduler, a container stop) cleans up like an interrupted one: nothing
    # half-written is left beside the output
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    app()


if __name__ == "__main__":
    sys.exit(main())
